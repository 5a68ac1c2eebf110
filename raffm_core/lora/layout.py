"""LoRA adapters on sub-models: which adapter tensors share which elastic axis.

A LoRA adapter on ``W`` (``(out, in)``; GPT-2's ``Conv1D`` stores it as
``(in, out)``) adds ``B @ A`` with ``A`` of shape ``(r, in)`` and ``B`` of
shape ``(out, r)``, for either layout. When the sub-model keeps outputs ``I``
of ``W`` (Q, K, V or a fused QKV, up, gate), it keeps rows ``I`` of ``B`` and
all of ``A``; when it keeps inputs ``J`` (attention output, down projection),
it keeps columns ``J`` of ``A`` and all of ``B``. :func:`with_lora` adds exactly these
couplings to a :class:`ModelLayout`, so :meth:`ModelLayout.slices`,
:func:`raffm_core.permute_state` and :func:`raffm_core.aggregate` handle
adapter tensors like any other.

Adapter keys are the wrapped module's state-dict path plus ``.lora_A.weight`` /
``.lora_B.weight``: what ``peft.get_peft_model_state_dict`` returns, without
its ``base_model.model.`` prefix.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from ..errors import UnsupportedModelError
from ..layout import Coupled, LayerLayout, ModelLayout

PEFT_PREFIX = "base_model.model."
ROW_ROLES = ("query", "key", "value", "qkv")  # plus every "ffn_in.N"
COLUMN_ROLES = ("attn_out", "ffn_out")


def _targets(layer: LayerLayout, target_modules: Iterable[str]) -> dict[str, str]:
    """Role to module path for the modules of ``layer`` whose name is targeted."""
    names = set(target_modules)
    return {role: path for role, path in layer.modules.items() if path.rpartition(".")[2] in names}


def with_lora(layout: ModelLayout, target_modules: Iterable[str], rank: int) -> ModelLayout:
    """``layout`` plus LoRA tensors of rank ``rank`` on the named modules.

    Parameters
    ----------
    layout : ModelLayout
        The base model's layout.
    target_modules : iterable of str
        Module names as peft takes them (``"query"``, ``"q_proj"``, ...). Only
        elastic modules of the layout can be targeted.
    rank : int
        LoRA rank ``r``.

    Raises
    ------
    UnsupportedModelError
        If a target names no elastic module of the layout.
    """
    targets = list(target_modules)
    if rank < 1:
        raise UnsupportedModelError(f"LoRA rank must be >= 1, got {rank}")
    known = {p.rpartition(".")[2] for layer in layout.layers for p in layer.modules.values()}
    unknown = sorted(set(targets) - known)
    if unknown:
        raise UnsupportedModelError(
            f"LoRA target modules {unknown} are not elastic modules of {layout.model_class}; "
            f"choose from {sorted(known)}"
        )
    shapes = dict(layout.shapes)
    layers = []
    for layer in layout.layers:
        coupled = {c.key: c for c in (*layer.heads, *layer.ffn)}
        heads, ffn = list(layer.heads), list(layer.ffn)
        for role, path in _targets(layer, targets).items():
            out, inp = layout.shapes[path + ".weight"]
            if layout.family.transposed:  # Conv1D weight is (in, out)
                out, inp = inp, out
            a_key, b_key = path + ".lora_A.weight", path + ".lora_B.weight"
            shapes[a_key], shapes[b_key] = (rank, inp), (out, rank)
            base = coupled[path + ".weight"]
            axis_list = heads if base in layer.heads else ffn
            if role.rpartition(".")[2] in COLUMN_ROLES:  # cross.attn_out too
                axis_list.append(Coupled(a_key, 1, base.block, base.offsets))
            else:
                axis_list.append(Coupled(b_key, 0, base.block, base.offsets))
        layers.append(dataclasses.replace(layer, heads=tuple(heads), ffn=tuple(ffn)))
    return dataclasses.replace(layout, shapes=shapes, layers=tuple(layers))


def lora_keys(layout: ModelLayout) -> list[str]:
    """Every LoRA tensor key of a layout made by :func:`with_lora`."""
    return [k for k in layout.shapes if k.endswith((".lora_A.weight", ".lora_B.weight"))]


def to_peft_keys(state: dict, prefix: str = PEFT_PREFIX) -> dict:
    """Adapter keys as ``peft.set_peft_model_state_dict`` expects them."""
    return {prefix + k: v for k, v in state.items()}


def from_peft_keys(state: dict, prefix: str = PEFT_PREFIX) -> dict:
    """Inverse of :func:`to_peft_keys`; keys without the prefix are an error."""
    out = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            raise UnsupportedModelError(f"adapter key {key!r} does not start with {prefix!r}")
        out[key[len(prefix) :]] = value
    return out
