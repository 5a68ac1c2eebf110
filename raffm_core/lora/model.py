"""RaFFM with LoRA: frozen, sliced base weights; only adapters and the task head train.

In the LoRA setting the pretrained base never changes, so it need not travel:
each device holds the base checkpoint and the server sends only the global
adapters and task head, sliced to the device's sub-network. The pieces:

* **Salience is ranked once, on the frozen base** (:func:`rank_units`). The
  base does not change during training and the adapters start at ``B = 0``,
  so ranking on ``W + BA`` each round would, at most, let a rank-``r``
  update reshuffle which units a device keeps, and move its adapter slices
  from round to round. Ranking once keeps a device's sub-network stable.
* **Sub-networks are index sets into the original weights** (:func:`place_spec`).
  The server turns the budget's prefix spec (``k`` most salient units) into
  the explicit, sorted unit indices of those ``k`` units in the unpermuted
  checkpoint. Nothing is permuted: the device slices its own checkpoint with
  the same indices (:func:`read_base_slices`, through
  ``safetensors.safe_open(...).get_slice``, one tensor at a time, never the
  full model), and the server keeps the global adapters and head in the
  original coordinates.
* **Adapters are sliced like their base weight** (:func:`raffm_core.lora.layout.with_lora`):
  ``A`` (``(r, in)``) on its input axis under the attention output and down
  projections, ``B`` (``(out, r)``) on its output axis under Q, K, V, gate and
  up; :func:`raffm_core.aggregate` over a LoRA layout then averages every
  element over the devices that hold it, weighted by their examples.

Key names follow the model's state dict (``model.layers.0.self_attn.q_proj.lora_A.weight``,
``score.weight``), as :func:`raffm_core.lora.layout.from_peft_keys` gives them.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping

import peft
import torch
from transformers import PretrainedConfig, PreTrainedModel

from ..errors import SpecError
from ..extract import build_submodel, model_class, tie_all_but, untie_weights
from ..families import find_family
from ..layout import ModelLayout
from ..prioritize import Permutation
from ..spec import LayerSpec, SubnetSpec, state_mismatch
from .layout import from_peft_keys, to_peft_keys
from .settings import LoraSettings
from .weights import read_base_slices, untied_in_checkpoint

HEAD_MODULES = ("classifier", "score", "qa_outputs")
"""Top-level modules that hold a freshly initialized task head (as peft's SEQ_CLS and
QUESTION_ANS ``modules_to_save``): trained and sent along with the adapters."""

ADAPTER_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


def is_head_key(key: str) -> bool:
    """Whether ``key`` belongs to the task head (:data:`HEAD_MODULES`)."""
    return key.split(".", 1)[0] in HEAD_MODULES


def is_adapter_key(key: str) -> bool:
    return key.endswith(ADAPTER_SUFFIXES)


def attach_lora(model: PreTrainedModel, settings: LoraSettings) -> peft.PeftModel:
    """Wrap ``model`` in LoRA adapters; freeze everything but adapters and task head.

    ``settings.target_modules`` must be resolved. The model is changed in
    place (peft replaces the targeted ``nn.Linear`` modules) and returned
    wrapped. New adapters are initialized by peft (Kaiming ``A``, zero ``B``).
    """
    for p in model.parameters():
        p.requires_grad_(False)
    config = settings.peft_config()
    # peft merges B A into a Conv1D weight, stored (in, out), only if told so.
    config.fan_in_fan_out = find_family(model.config.model_type).transposed
    wrapped = peft.get_peft_model(model, config)
    for name, p in wrapped.base_model.model.named_parameters():
        if is_head_key(name):
            p.requires_grad_(True)
    return wrapped


def trainable_state(model: peft.PeftModel) -> dict[str, torch.Tensor]:
    """Adapters and task head of a wrapped model, keyed as the plain model's state dict.

    The tensors are detached views of the live parameters (no copy).
    """
    adapters = from_peft_keys(peft.get_peft_model_state_dict(model))
    inner = model.base_model.model.state_dict()
    head = {k: v for k, v in inner.items() if is_head_key(k)}
    return {k: v.detach() for k, v in {**adapters, **head}.items()}


@torch.no_grad()
def load_trainable_state(model: peft.PeftModel, state: Mapping[str, torch.Tensor]) -> None:
    """Load adapters and head into a wrapped model; every key and shape must match exactly.

    Raises
    ------
    SpecError
        If a key is missing or unexpected, or a shape differs; nothing is
        loaded then.
    """
    current = trainable_state(model)
    problem = state_mismatch(state, {k: tuple(v.shape) for k, v in current.items()})
    if problem:
        raise SpecError(f"adapter/head state: {problem}")
    adapters = {k: v for k, v in state.items() if is_adapter_key(k)}
    result = peft.set_peft_model_state_dict(model, to_peft_keys(adapters))
    if result.unexpected_keys:
        raise SpecError(f"peft did not load adapter keys {result.unexpected_keys[:5]}")
    for key, tensor in current.items():
        if is_head_key(key):
            tensor.copy_(state[key])


def place_spec(spec: SubnetSpec, permutation: Permutation) -> SubnetSpec:
    """The units a prefix spec keeps, as sorted index sets into the unpermuted model.

    ``permutation`` is the ranking of the original weights (:func:`rank_units`):
    its ``heads[i]`` is the original index of the ``i``-th most salient head
    group. A prefix of ``k`` becomes the original indices of those ``k``.
    Index sets in ``spec`` are mapped element-wise.
    """
    if len(spec.layers) != len(permutation.layers):
        raise SpecError(
            f"spec has {len(spec.layers)} layers, the ranking has {len(permutation.layers)}"
        )

    def original(width, order: torch.Tensor):
        positions = range(width) if isinstance(width, int) else width
        return sorted(int(order[p]) for p in positions)

    return SubnetSpec(
        tuple(
            LayerSpec(original(kept.heads, perm.heads), original(kept.ffn, perm.ffn))
            for kept, perm in zip(spec.layers, permutation.layers, strict=True)
        )
    )


def build_lora_submodel(
    config: PretrainedConfig,
    spec: SubnetSpec,
    checkpoint: str | os.PathLike,
    settings: LoraSettings,
    trainable: Mapping[str, torch.Tensor],
    layout: ModelLayout,
) -> peft.PeftModel:
    """A device's sub-model: frozen base slices from its checkpoint, LoRA and head from the server.

    Parameters
    ----------
    config : PretrainedConfig
        The full model's config (``architectures[0]`` names the class).
    spec : SubnetSpec
        Usually index sets (:func:`place_spec`).
    checkpoint : path
        The device's copy of the pretrained base (``model.safetensors``).
    settings : LoraSettings
        Resolved (targets named).
    trainable : mapping
        The adapter and head tensors the server sent, at the ``spec`` shapes
        of the LoRA layout; head keys also name which weights are not read
        from the checkpoint.
    layout : ModelLayout
        The full model's (base) layout.

    Returns
    -------
    peft.PeftModel
        Wrapped, with only adapters and head trainable, in eval mode.
    """
    head = {k: v for k, v in trainable.items() if is_head_key(k)}
    base_keys = [k for k in layout.shapes if k not in head]
    expected = layout.sub_shapes(spec)
    for key, tensor in head.items():
        if key not in expected or tuple(tensor.shape) != expected[key]:
            raise SpecError(
                f"head tensor {key} of shape {tuple(tensor.shape)} is not in the sub-model "
                f"(expected {expected.get(key, 'no such key')})"
            )
    # Allocate the sub-model once (uninitialized) and stream the base into it.
    prefix = config_base_prefix(config)
    untied = untied_in_checkpoint(checkpoint, layout.tied, prefix)  # FLAN-T5's own lm_head
    model = build_submodel(config, spec)
    untie_weights(model, untied)
    destination = model.state_dict()
    missing = sorted(set(destination) - set(base_keys) - set(head))
    if missing:
        raise SpecError(f"sub-model weights {missing[:5]} are neither base nor head")
    tied = {k: v for k, v in layout.tied.items() if k not in untied}
    read_layout = dataclasses.replace(layout, tied=tied)
    read_base_slices(checkpoint, read_layout, spec, base_keys, prefix, destination)
    with torch.no_grad():
        for key, tensor in head.items():
            destination[key].copy_(tensor)
    if layout.tied:  # to_empty() gave each alias its own storage
        tie_all_but(model, layout.tied, untied)
    wrapped = attach_lora(model, settings)
    load_trainable_state(wrapped, trainable)
    wrapped.eval()
    return wrapped


def config_base_prefix(config: PretrainedConfig) -> str:
    """``base_model_prefix`` of the class ``config.architectures[0]`` names."""
    return getattr(model_class(config), "base_model_prefix", "") or ""


def count_trainable(layout: ModelLayout, spec: SubnetSpec, keys: Iterable[str]) -> int:
    """Elements of ``keys`` (adapters and head) in the ``spec`` sub-model of a LoRA layout."""
    shapes = layout.sub_shapes(spec)
    total = 0
    for key in keys:
        n = 1
        for s in shapes[key]:
            n *= s
        total += n
    return total


__all__ = [
    "HEAD_MODULES",
    "attach_lora",
    "build_lora_submodel",
    "count_trainable",
    "is_adapter_key",
    "is_head_key",
    "load_trainable_state",
    "place_spec",
    "trainable_state",
]
