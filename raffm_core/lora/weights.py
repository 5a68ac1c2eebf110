"""Reading a device's frozen base weights slice by slice from its safetensors checkpoint.

Only the kept positions of each elastic tensor are read
(``safetensors.safe_open(...).get_slice``, one tensor at a time, in runs of
consecutive positions), so a device never holds the full model.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from transformers.utils import SAFE_WEIGHTS_NAME

from ..errors import SpecError, UnsupportedModelError
from ..layout import ModelLayout
from ..spec import SubnetSpec


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
    file = path / SAFE_WEIGHTS_NAME if path.is_dir() else path
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


def untied_in_checkpoint(
    checkpoint: str | os.PathLike, tied: Mapping[str, str], base_prefix: str = ""
) -> set[str]:
    """Keys the model class ties (``tied``: alias to source) that the checkpoint holds apart.

    transformers 5 builds every T5 with its ``lm_head`` tied to ``shared`` and
    unties it in ``from_pretrained`` when the checkpoint stores a different
    ``lm_head`` (T5 v1.1, FLAN-T5, mT5); a sub-model read slice by slice must
    do the same, or it would answer through the input embedding. As
    ``from_pretrained`` does, an alias stored with the source's values stays tied.
    Only the aliases stored under their own name are read (whole, one at a time).
    """
    untied: set[str] = set()
    with safe_open(str(checkpoint_file(checkpoint)), framework="pt") as handle:
        stored = set(handle.keys())
        for key, source in tied.items():
            own, theirs = (
                _stored_name(key, stored, base_prefix),
                _stored_name(source, stored, base_prefix),
            )
            if own is None or theirs is None or own == theirs:
                continue
            if not torch.equal(handle.get_tensor(own), handle.get_tensor(theirs)):
                untied.add(key)
    return untied


def _stored_name(key: str, stored: set[str], prefix: str) -> str | None:
    candidates = [key]
    if prefix:
        candidates += [key.removeprefix(prefix + "."), f"{prefix}.{key}"]
    return next((c for c in candidates if c in stored), None)
