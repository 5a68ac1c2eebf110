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
* **Adapters are sliced like their base weight** (:func:`raffm_core.lora.with_lora`):
  ``A`` (``(r, in)``) on its input axis under the attention output and down
  projections, ``B`` (``(out, r)``) on its output axis under Q, K, V, gate and
  up; :func:`raffm_core.aggregate` over a LoRA layout then averages every
  element over the devices that hold it, weighted by their examples.

Key names follow the model's state dict (``model.layers.0.self_attn.q_proj.lora_A.weight``,
``score.weight``), as :func:`raffm_core.lora.from_peft_keys` gives them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import peft
import torch
from safetensors import safe_open
from transformers import PretrainedConfig, PreTrainedModel

from .errors import SpecError, UnsupportedModelError
from .extract import build_submodel
from .families import Family
from .layout import ModelLayout
from .lora import from_peft_keys, to_peft_keys
from .prioritize import Permutation
from .spec import LayerSpec, SubnetSpec

HEAD_MODULES = ("classifier", "score")
"""Top-level modules that hold a freshly initialized task head (as peft's SEQ_CLS
``modules_to_save``): trained and sent along with the adapters."""

ADAPTER_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


@dataclass(frozen=True)
class LoraSettings:
    """LoRA hyper-parameters, as the run config gives them.

    Attributes
    ----------
    rank : int
        ``r``, at least 1.
    alpha : float
        Scaling numerator: the update is ``alpha / r * B A``.
    dropout : float
        Dropout on the adapter input, in ``[0, 1)``.
    target_modules : tuple of str
        Module names as peft takes them (``"q_proj"``, ``"query"``); empty
        means the family default, its query and value projections
        (:func:`default_target_modules`).
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        targets = self.target_modules
        if isinstance(targets, str):
            targets = parse_target_modules(targets)
        object.__setattr__(self, "target_modules", tuple(targets))
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise UnsupportedModelError(f"LoRA rank must be an integer >= 1, got {self.rank!r}")
        if not self.alpha > 0:
            raise UnsupportedModelError(f"LoRA alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise UnsupportedModelError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")

    def resolved(self, family: Family) -> LoraSettings:
        """These settings with the family's default targets if none are named."""
        if self.target_modules:
            return self
        return LoraSettings(self.rank, self.alpha, self.dropout, default_target_modules(family))

    def peft_config(self) -> peft.LoraConfig:
        """The ``peft.LoraConfig``; targets must be resolved first (:meth:`resolved`)."""
        if not self.target_modules:
            raise UnsupportedModelError("LoRA target modules are not resolved; call resolved()")
        return peft.LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
            bias="none",
        )


def parse_target_modules(text: str) -> tuple[str, ...]:
    """``"q_proj, v_proj"`` to ``("q_proj", "v_proj")``; empty entries are dropped."""
    return tuple(t.strip() for t in text.split(",") if t.strip())


def default_target_modules(family: Family) -> tuple[str, ...]:
    """The family's query and value projections (``query,value``; ``q_proj,v_proj``)."""
    return (family.query.rpartition(".")[2], family.value.rpartition(".")[2])


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
    wrapped = peft.get_peft_model(model, settings.peft_config())
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
    missing = sorted(set(current) - set(state))
    extra = sorted(set(state) - set(current))
    if missing or extra:
        raise SpecError(
            f"adapter/head state: missing keys {missing[:5]}, unexpected keys {extra[:5]}"
        )
    for key, tensor in current.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise SpecError(
                f"adapter/head state: {key} has shape {tuple(state[key].shape)}, "
                f"expected {tuple(tensor.shape)}"
            )
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


def _runs(index: torch.Tensor) -> list[tuple[int, int]]:
    """Sorted positions as ``[start, stop)`` runs of consecutive values."""
    values = index.tolist()
    runs: list[tuple[int, int]] = []
    for v in values:
        if runs and v == runs[-1][1]:
            runs[-1] = (runs[-1][0], v + 1)
        else:
            runs.append((v, v + 1))
    return runs


def _read(handle, name: str, axis: int | None, index) -> torch.Tensor:
    """One tensor of a safetensors file, or only its kept positions along ``axis``."""
    if axis is None:
        return handle.get_tensor(name)
    sliced = handle.get_slice(name)
    if isinstance(index, slice):
        return sliced[: index.stop] if axis == 0 else sliced[:, : index.stop]
    if bool((index[1:] <= index[:-1]).any()):
        raise SpecError(f"{name}: kept positions must be sorted to be read in runs")
    parts = [sliced[a:b] if axis == 0 else sliced[:, a:b] for a, b in _runs(index)]
    return torch.cat(parts, dim=axis)


def checkpoint_file(path: str | os.PathLike) -> Path:
    """The single ``model.safetensors`` of a checkpoint folder (or the file itself).

    Raises
    ------
    UnsupportedModelError
        If there is none (sharded and ``.bin`` checkpoints are not read slice-wise).
    """
    path = Path(path)
    file = path / "model.safetensors" if path.is_dir() else path
    if not file.is_file():
        raise UnsupportedModelError(
            f"{path}: expected a model.safetensors checkpoint to read the frozen base from"
        )
    return file


def read_base_slices(
    checkpoint: str | os.PathLike,
    layout: ModelLayout,
    spec: SubnetSpec,
    keys: Iterable[str],
    base_prefix: str = "",
    into: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """The ``spec`` slices of the base weights ``keys``, read from a safetensors checkpoint.

    Only the kept rows or columns of each elastic tensor are read
    (``get_slice``, in runs of consecutive positions), one tensor at a time:
    the full model is never in memory. With ``into``, each slice is copied
    into the tensor of the same key there (a sub-model's parameters) and
    dropped, so the sub-model's weights are never held twice.

    Parameters
    ----------
    checkpoint : path
        A folder with ``model.safetensors`` or the file itself.
    layout : ModelLayout
        The full model's layout (keys as the model names them).
    spec : SubnetSpec
    keys : iterable of str
        Model state-dict keys to read. Tied keys are filled from their source.
    base_prefix : str
        The model's ``base_model_prefix`` (``"model"``, ``"bert"``): a key may
        be stored with or without it, as checkpoints of the bare base model are.
    into : mapping, optional
        Destination tensors by key (``model.state_dict()``), at the ``spec``
        shapes; the returned dict then holds these tensors.

    Raises
    ------
    UnsupportedModelError
        If a key is not in the checkpoint; the message names it.
    SpecError
        If a destination in ``into`` is missing or has another shape.
    """
    slices = layout.slices(spec)
    keys = list(keys)
    out: dict[str, torch.Tensor] = {}
    with safe_open(str(checkpoint_file(checkpoint)), framework="pt") as handle:
        stored = set(handle.keys())
        for key in keys:
            if key in layout.tied and layout.tied[key] in keys:
                continue
            name = _stored_name(key, stored, base_prefix)
            if name is None and key in layout.tied:
                name = _stored_name(layout.tied[key], stored, base_prefix)
            if name is None:
                raise UnsupportedModelError(
                    f"{checkpoint}: the frozen base weight {key!r} is not in the checkpoint"
                )
            axis, index = slices.get(key, (None, None))
            tensor = _read(handle, name, axis, index)
            if into is None:
                out[key] = tensor.to(torch.float32)
                continue
            if key not in into or tuple(into[key].shape) != tuple(tensor.shape):
                have = tuple(into[key].shape) if key in into else "nothing"
                raise SpecError(f"{key}: slice of shape {tuple(tensor.shape)}, destination {have}")
            with torch.no_grad():
                into[key].copy_(tensor)
            out[key] = into[key]
            del tensor
    for key in keys:
        if key not in out:
            out[key] = out[layout.tied[key]]
    return out


def _stored_name(key: str, stored: set[str], prefix: str) -> str | None:
    candidates = [key]
    if prefix:
        candidates += [key.removeprefix(prefix + "."), f"{prefix}.{key}"]
    return next((c for c in candidates if c in stored), None)


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
    model = build_submodel(config, spec)
    destination = model.state_dict()
    missing = sorted(set(destination) - set(base_keys) - set(head))
    if missing:
        raise SpecError(f"sub-model weights {missing[:5]} are neither base nor head")
    read_base_slices(checkpoint, layout, spec, base_keys, config_base_prefix(config), destination)
    with torch.no_grad():
        for key, tensor in head.items():
            destination[key].copy_(tensor)
    if layout.tied:
        model.tie_weights()  # to_empty() gave each alias its own storage
    wrapped = attach_lora(model, settings)
    load_trainable_state(wrapped, trainable)
    wrapped.eval()
    return wrapped


def config_base_prefix(config: PretrainedConfig) -> str:
    """``base_model_prefix`` of the class ``config.architectures[0]`` names."""
    from .extract import model_class

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
    "LoraSettings",
    "attach_lora",
    "build_lora_submodel",
    "count_trainable",
    "default_target_modules",
    "is_adapter_key",
    "is_head_key",
    "load_trainable_state",
    "parse_target_modules",
    "place_spec",
    "read_base_slices",
    "trainable_state",
]
