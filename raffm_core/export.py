"""Post-training deployment: the largest sub-model a device can run, and its export.

Inference needs far less memory than training (no gradients, no optimizer
state, and activations are freed layer by layer), so after federated training a
device can run a *larger* sub-model than the one it trained (paper §3.2).

The inference memory model is :class:`raffm_core.budget.InferenceProfile`.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

from transformers import PreTrainedModel

from .errors import SpecError
from .extract import (
    extract_state_dict,
    extract_submodel,
    save_submodel,
    spec_of,
    untie_weights,
    untied_keys,
)
from .layout import describe
from .spec import SubnetSpec


def plain_config(model: PreTrainedModel, spec: SubnetSpec):
    """A stock ``transformers`` config describing ``spec``, or ``None`` if none can.

    A config can describe a sub-model when every layer keeps the same prefix
    widths and the architecture's config has a field for each: FFN width
    always; head counts only where the head size is an explicit config field
    (``head_dim`` of the LLaMA family, ``d_kv`` of T5), since BERT-style
    configs derive it from the head count.
    """
    layout = describe(model)
    if not spec.is_prefix or len(set(spec.layers)) != 1:
        return None
    kept = spec.layers[0]
    config = copy.deepcopy(model.config)
    if hasattr(config, "raffm_subnet"):
        delattr(config, "raffm_subnet")
    setattr(config, layout.family.ffn_size_attr, kept.ffn)
    family = layout.family
    if kept.heads != layout.num_groups:
        if family.kv_heads_attr is not None:
            config.head_dim = layout.head_dim
            config.num_key_value_heads = kept.heads
            config.num_attention_heads = kept.heads * layout.group_size
        elif family.head_dim_attr is not None:
            setattr(config, family.head_dim_attr, layout.head_dim)
            setattr(config, family.heads_attr, kept.heads)
        else:
            return None
    config.architectures = [type(model).__name__]
    return config


def export_submodel(model: PreTrainedModel, spec: SubnetSpec, path: str | os.PathLike) -> str:
    """Write the sub-model ``spec`` of ``model`` to ``path`` for deployment.

    Returns ``"transformers"`` when the directory loads with plain
    ``AutoModel*.from_pretrained(path)`` (uniform widths the config can
    express), else ``"raffm"``. Either way ``raffm_core.load_submodel(path)``
    loads it.
    """
    if spec_of(model) is not None:
        raise SpecError("export_submodel needs the full model, got a sub-model")
    path = Path(path)
    config = plain_config(model, spec)
    if config is None:
        save_submodel(extract_submodel(model, spec), path)
        return "raffm"
    layout = describe(model)
    state = extract_state_dict(model.state_dict(), layout, spec)
    small = type(model)(config)  # as small as the spec: building it for real is cheap
    untie_weights(small, untied_keys(state, describe(small).tied))  # FLAN-T5's lm_head
    small.load_state_dict(state, strict=True)
    small.save_pretrained(path)
    return "transformers"
