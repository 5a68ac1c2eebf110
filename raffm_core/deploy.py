"""Post-training deployment: the largest sub-model a device can run, and its export.

Inference needs far less memory than training (no gradients, no optimizer
state, and activations are freed layer by layer), so after federated training a
device can run a *larger* sub-model than the one it trained (paper §3.2).

Inference memory model (:meth:`InferenceProfile.memory_mb`), fp32::

    memory = runtime + 4 B x P  (weights)
                     + 4 B x batch x seq x (3 x hidden + q + 2 kv + ffn_in x ffn)
                     + 4 B x batch x heads x seq x seq (eager attention only)

The activation term is the widest single layer's live tensors, since without
autograd each layer's intermediates are freed before the next runs.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedModel

from .budget import RUNTIME_OVERHEAD_MB
from .errors import BudgetError
from .extract import extract_state_dict, extract_submodel, save_submodel, spec_of
from .layout import ModelLayout, describe
from .spec import SubnetSpec, width_count


@dataclass(frozen=True)
class InferenceProfile:
    """The forward pass a deployment ``memory-mb`` budget is checked against."""

    batch_size: int = 1
    seq_len: int = 128
    eager_attention: bool = False
    runtime_mb: float = RUNTIME_OVERHEAD_MB

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.seq_len < 1:
            raise BudgetError(f"batch_size and seq_len must be >= 1, got {self}")

    def memory_mb(self, layout: ModelLayout, spec: SubnetSpec) -> float:
        """Estimated peak memory, in MB, of one forward pass of ``spec``."""
        hidden = layout.shapes[layout.layers[0].heads[0].key][1]
        d, g = layout.head_dim, layout.group_size
        n_in = len(layout.family.ffn_in)
        widest = 0.0
        for kept in spec.layers:
            heads = width_count(kept.heads)
            live = 3 * hidden + heads * g * d + 2 * heads * d + n_in * width_count(kept.ffn)
            if self.eager_attention:
                live += heads * g * self.seq_len
            widest = max(widest, live)
        act = 4 * widest * self.batch_size * self.seq_len
        return self.runtime_mb + (4 * layout.count_params(spec) + act) / 2**20


def plain_config(model: PreTrainedModel, spec: SubnetSpec):
    """A stock ``transformers`` config describing ``spec``, or ``None`` if none can.

    A config can describe a sub-model when every layer keeps the same prefix
    widths and the architecture's config has a field for each: FFN width
    always; head counts only where ``head_dim`` is an explicit config field
    (the LLaMA family), since BERT-style configs derive it from the head count.
    """
    layout = describe(model)
    if not spec.is_prefix or len(set(spec.layers)) != 1:
        return None
    kept = spec.layers[0]
    config = copy.deepcopy(model.config)
    if hasattr(config, "raffm_subnet"):
        delattr(config, "raffm_subnet")
    if layout.family.name == "DistilBERT":
        config.hidden_dim = kept.ffn
    else:
        config.intermediate_size = kept.ffn
    if kept.heads != layout.num_groups:
        if layout.family.kv_heads_attr is None:
            return None
        config.head_dim = layout.head_dim
        config.num_key_value_heads = kept.heads
        config.num_attention_heads = kept.heads * layout.group_size
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
        raise BudgetError("export_submodel needs the full model, got a sub-model")
    path = Path(path)
    config = plain_config(model, spec)
    if config is None:
        save_submodel(extract_submodel(model, spec), path)
        return "raffm"
    layout = describe(model)
    state = extract_state_dict(model.state_dict(), layout, spec)
    small = type(model)(config)  # as small as the spec: building it for real is cheap
    small.load_state_dict(state, strict=True)
    small.save_pretrained(path)
    return "transformers"
