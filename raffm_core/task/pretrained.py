"""Loading pretrained weights with one log line instead of transformers' load report."""

from __future__ import annotations

import logging
from typing import Any

from transformers import PreTrainedModel

logger = logging.getLogger(__name__)


def _drop_load_report(record: logging.LogRecord) -> bool:
    return "LOAD REPORT" not in str(record.msg)


def from_pretrained(auto: type, source: str, **kwargs: Any) -> PreTrainedModel:
    """``auto.from_pretrained(source, **kwargs)``, with one log line instead of the load report.

    transformers prints a table of every key it did not load; for a new task
    head that is expected (``classifier.weight MISSING``) and only noise. Here
    a new head is one INFO line; a missing weight outside the head (the model
    would run half untrained) is a WARNING that names the keys.
    """
    # Drop only the report: raising the logger's level instead makes transformers 5.23
    # run (and log) its tensor-parallel plan check, which it skips below WARNING.
    quiet = logging.getLogger("transformers.modeling_utils")
    quiet.addFilter(_drop_load_report)
    try:
        model, info = auto.from_pretrained(source, output_loading_info=True, **kwargs)
    finally:
        quiet.removeFilter(_drop_load_report)
    missing = sorted(info.get("missing_keys", ()))
    mismatched = sorted(
        str(m[0]) if isinstance(m, tuple | list) else str(m)
        for m in info.get("mismatched_keys", ())
    )
    prefix = f"{model.base_model_prefix}."
    in_base = [k for k in missing if k.startswith(prefix)]
    if in_base:
        logger.warning(
            "%s: %d weights of the base model are not in the checkpoint and start random: %s",
            source,
            len(in_base),
            ", ".join(in_base[:5]) + (" ..." if len(in_base) > 5 else ""),
        )
    new = [k for k in [*missing, *mismatched] if not k.startswith(prefix)]
    if new:
        logger.info("%s: new task head %s (seeded)", source, ", ".join(new))
    return model
