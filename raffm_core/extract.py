"""Sub-model extraction (paper Eq. 6), rebuilding, and the saved artifact.

A sub-model is a real, smaller ``transformers`` model of the same class: its
elastic ``nn.Linear`` (or, for GPT-2, ``Conv1D``) modules are replaced by
smaller ones whose weights are the kept slices of the global weights. It runs
through the normal HF forward.
Its config is the base config plus ``raffm_subnet`` (the spec as a dict), so
the pair (config, weights) is enough to rebuild it; see :func:`load_submodel`.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from .errors import SpecError, UnsupportedModelError
from .layout import ModelLayout, describe
from .spec import SubnetSpec, state_mismatch, width_count
from .vocab import trim_vocab

SPEC_ATTR = "raffm_subnet"
WEIGHTS_NAME = "model.safetensors"


def model_class(config: PretrainedConfig) -> type[PreTrainedModel]:
    """The ``transformers`` class named by ``config.architectures[0]``."""
    names = getattr(config, "architectures", None) or []
    if not names:
        raise UnsupportedModelError(
            "config.architectures is empty; cannot tell which model class to build "
            "(set it, e.g. ['BertForSequenceClassification'])"
        )
    cls = getattr(transformers, names[0], None)
    if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
        raise UnsupportedModelError(f"{names[0]!r} is not a transformers model class")
    return cls


def base_config(model_or_config: PreTrainedModel | PretrainedConfig) -> PretrainedConfig:
    """A copy of the full model's config, with ``architectures`` set and no spec."""
    if isinstance(model_or_config, PreTrainedModel):
        config = copy.deepcopy(model_or_config.config)
        config.architectures = [type(model_or_config).__name__]
    else:
        config = copy.deepcopy(model_or_config)
    if hasattr(config, SPEC_ATTR):
        delattr(config, SPEC_ATTR)
    return config


def spec_of(model: PreTrainedModel) -> SubnetSpec | None:
    """The spec a sub-model was built with, or ``None`` for a full model."""
    data = getattr(model.config, SPEC_ATTR, None)
    return None if data is None else SubnetSpec.from_dict(data)


def extract_state_dict(
    state: Mapping[str, torch.Tensor], layout: ModelLayout, spec: SubnetSpec
) -> dict[str, torch.Tensor]:
    """The sub-model's state dict: kept slices of elastic tensors, the rest as is.

    Non-elastic tensors are returned as the same objects (not copies); elastic
    ones are new, contiguous tensors.
    """
    slices = layout.slices(spec)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key in slices:
            axis, index = slices[key]
            if isinstance(index, slice):
                out[key] = tensor.narrow(axis, 0, index.stop).contiguous().clone()
            else:
                out[key] = torch.index_select(tensor, axis, index)
        else:
            out[key] = tensor
    return out


def _shrink(model: PreTrainedModel, layout: ModelLayout, spec: SubnetSpec) -> None:
    """Replace every elastic module of ``model`` by one of the sub-model's size."""
    trim_vocab(model, layout, spec)
    shapes = layout.sub_shapes(spec)
    transposed = layout.family.transposed
    for layer in layout.layers:
        for path in layer.modules.values():
            parent_path, _, name = path.rpartition(".")
            old = model.get_submodule(path)
            weight = old.weight
            if transposed:  # Conv1D(nf=out, nx=in), weight (in, out), always a bias
                in_features, out_features = shapes[path + ".weight"]
                with torch.device(weight.device):
                    new = Conv1D(out_features, in_features).to(weight.dtype)
            else:  # nn.Linear, weight (out, in)
                out_features, in_features = shapes[path + ".weight"]
                new = nn.Linear(
                    in_features,
                    out_features,
                    bias=old.bias is not None,
                    device=weight.device,
                    dtype=weight.dtype,
                )
            setattr(model.get_submodule(parent_path), name, new)
        if layer.position_bias is not None:  # (num_buckets, kept heads)
            parent_path, _, name = layer.position_bias.rpartition(".")
            old = model.get_submodule(layer.position_bias)
            table = nn.Embedding(
                *shapes[layer.position_bias + ".weight"],
                device=old.weight.device,
                dtype=old.weight.dtype,
            )
            setattr(model.get_submodule(parent_path), name, table)
        # Head counts and widths some attention classes keep for bookkeeping
        # (GPT-2 splits its fused output by ``split_size``, T5 reshapes by
        # ``n_heads`` and ``inner_dim``), in every attention block of the layer.
        kept = spec.layers[layer.index].heads
        n_heads = (kept if isinstance(kept, int) else len(kept)) * layout.group_size
        for attn_path in layer.attention_paths or (layer.attention,):
            attn = model.get_submodule(attn_path)
            for attr in ("num_attention_heads", "n_heads", "num_heads"):
                if isinstance(getattr(attn, attr, None), int):
                    setattr(attn, attr, n_heads)
            for attr in layout.family.width_attrs:
                if isinstance(getattr(attn, attr, None), int):
                    setattr(attn, attr, n_heads * layout.head_dim)


def build_submodel(
    config: PretrainedConfig,
    spec: SubnetSpec,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    *,
    attn_implementation: str | None = None,
) -> PreTrainedModel:
    """Build the sub-model ``spec`` describes, without materializing the full model.

    The skeleton is created on the meta device, its elastic layers are
    replaced by sub-sized ones, and only then is memory allocated.

    Parameters
    ----------
    config : PretrainedConfig
        The full model's config; ``architectures[0]`` names the class.
    spec : SubnetSpec
    state_dict : mapping, optional
        The sub-model's weights (shapes as :meth:`ModelLayout.sub_shapes`).
        Loaded strictly: a missing, extra or mis-shaped key is an error.
        Without it the weights are uninitialized.
    attn_implementation : str, optional
        ``"eager"``, ``"sdpa"``, ...; the transformers default if omitted.

    Returns
    -------
    PreTrainedModel
        In training mode is left to the caller; the model is returned in eval mode.
    """
    config = base_config(config)
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    cls = model_class(config)
    with torch.device("meta"):
        model = cls(config)
    layout = describe(model)
    _shrink(model, layout, spec)
    model.to_empty(device="cpu")
    # Non-persistent buffers (position ids, rotary frequencies) are not in any
    # state dict; the model's own initializer knows their values.
    owners = {key.rpartition(".")[0] for key, _ in model.named_non_persistent_buffers()}
    for name in owners:
        model._init_weights(model.get_submodule(name))
    if state_dict is not None:
        expected = layout.sub_shapes(spec)
        _check_state(state_dict, expected)
        model.load_state_dict(dict(state_dict), strict=True)
        untied = untied_keys(state_dict, layout.tied)
        if untied:
            tie_all_but(model, layout.tied, untied)
        elif layout.tied:
            model.tie_weights()  # to_empty() gave each alias its own storage
    model.config.architectures = [cls.__name__]
    setattr(model.config, SPEC_ATTR, spec.to_dict())
    model.eval()
    return model


def untied_keys(state: Mapping[str, torch.Tensor], tied: Mapping[str, str]) -> set[str]:
    """Keys the class ties but ``state`` holds apart, with values of their own.

    transformers 5 builds every T5 with its lm_head tied to the shared
    embedding, and unties it in ``from_pretrained`` when the checkpoint's
    lm_head differs (T5 v1.1, FLAN-T5, mT5). A sub-model must do the same,
    or it would silently replace the lm_head by the embedding.
    """
    return {
        key
        for key, source in tied.items()
        if key in state
        and source in state
        and state[key] is not state[source]
        and not torch.equal(state[key], state[source])
    }


def untie_weights(model: PreTrainedModel, keys: set[str]) -> None:
    """Give each of ``keys`` (aliases of a tied weight) its own parameter, and keep it so."""
    for key in keys:
        parent, _, name = key.rpartition(".")
        old = model.get_parameter(key)
        setattr(model.get_submodule(parent), name, nn.Parameter(torch.empty_like(old)))
        getattr(model, "all_tied_weights_keys", {}).pop(key, None)


def tie_all_but(model: PreTrainedModel, tied: Mapping[str, str], untied: set[str]) -> None:
    """Tie every alias of ``tied`` to its source except ``untied``, which keep their values."""
    for key, source in tied.items():
        if key in untied:
            continue
        parent, _, name = key.rpartition(".")
        setattr(model.get_submodule(parent), name, model.get_parameter(source))
    for key in untied:  # so save_pretrained and tie_weights() leave them apart
        getattr(model, "all_tied_weights_keys", {}).pop(key, None)


def _check_state(state: Mapping[str, torch.Tensor], expected: Mapping[str, tuple]) -> None:
    problem = state_mismatch(state, expected)
    if problem:
        raise SpecError(f"sub-model weights: {problem}")


def extract_submodel(model: PreTrainedModel, spec: SubnetSpec) -> PreTrainedModel:
    """A real, smaller copy of ``model`` keeping what ``spec`` says (Eq. 6).

    ``model`` should be prioritized first (:func:`raffm_core.prioritize`), so
    that prefix specs keep the most salient units. The full model is not
    changed and shares no storage with the result.
    """
    if spec_of(model) is not None:
        raise SpecError("extract_submodel needs the full model, got a sub-model")
    layout = describe(model)
    state = model.state_dict()
    sub_state = extract_state_dict(state, layout, spec)
    attn = getattr(model.config, "_attn_implementation", None)
    sub = build_submodel(base_config(model), spec, sub_state, attn_implementation=attn)
    sub.train(model.training)
    return sub


def save_submodel(model: PreTrainedModel, path: str | os.PathLike) -> Path:
    """Write a sub-model (or full model) as ``config.json`` + ``model.safetensors``.

    The config carries the spec, so :func:`load_submodel` rebuilds it exactly.
    Tied tensors are stored once.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config["architectures"] = [type(model).__name__]
    tied = describe(model).tied
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k not in tied}
    tmp = path / (WEIGHTS_NAME + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path / WEIGHTS_NAME)
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
    return path


def load_submodel(path: str | os.PathLike, **kwargs: Any) -> PreTrainedModel:
    """Load what :func:`save_submodel` wrote: ``raffm_core.load_submodel(dir)``.

    A plain ``save_pretrained`` folder of a full model (what
    :func:`~raffm_core.export.export_model` writes when the config can
    express the widths) loads too; its weight names may be the checkpoint
    names ``transformers`` converts on save (ViT), so it goes through
    ``from_pretrained``, which must find every weight.

    Keyword arguments go to :func:`build_submodel` (e.g. ``attn_implementation``).
    """
    path = Path(path)
    data = json.loads((path / "config.json").read_text())
    spec_data = data.pop(SPEC_ATTR, None)
    config = transformers.AutoConfig.for_model(**data)
    state = load_file(str(path / WEIGHTS_NAME))
    with torch.device("meta"):
        skeleton = model_class(config)(config)
    layout = describe(skeleton)
    if spec_data is None and not set(state) <= set(skeleton.state_dict()):
        model, info = model_class(config).from_pretrained(path, output_loading_info=True, **kwargs)
        missing, unexpected = sorted(info["missing_keys"]), sorted(info["unexpected_keys"])
        if missing or unexpected:
            raise SpecError(
                f"{path}: weights do not match the config: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )
        return model.eval()
    spec = layout.full_spec() if spec_data is None else SubnetSpec.from_dict(spec_data)
    for key, source in layout.tied.items():
        state.setdefault(key, state[source])
    return build_submodel(config, spec, state, **kwargs)


@contextmanager
def width_scaler(model: PreTrainedModel) -> Iterator[None]:
    """Rescale a sub-model's narrowed sums to the full width while the block runs.

    HeteroFL's scaler (Diao et al., ICLR 2021): a layer that keeps ``g`` of
    ``G`` head groups multiplies the input of its attention output projection
    by ``G / g``, and one that keeps ``f`` of ``F`` FFN neurons multiplies the
    input of its FFN output projection by ``F / f``, so the narrowed sums keep
    the full model's scale. Biases are not scaled. Used during local training
    only; the fused global model runs unscaled. A full model is left as it is.

    Parameters
    ----------
    model : PreTrainedModel
        A sub-model from :func:`build_submodel` (its config names its spec),
        optionally wrapped by PEFT (the hooks go on the wrapped projections).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    spec = spec_of(base)
    handles = []
    if spec is not None:
        layout = describe(base)
        for layer, kept in zip(layout.layers, spec.layers, strict=True):
            for role, path in layer.modules.items():
                # every attention block's output projection (T5: cross.attn_out too)
                kind = role.rpartition(".")[2]
                if kind not in ("attn_out", "ffn_out"):
                    continue
                size, width = (
                    (layout.num_groups, kept.heads)
                    if kind == "attn_out"
                    else (layout.ffn_size, kept.ffn)
                )
                factor = size / width_count(width)
                if factor != 1.0:
                    module = base.get_submodule(path)
                    handles.append(module.register_forward_pre_hook(_scale_input(factor)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _scale_input(factor: float):
    def hook(module: nn.Module, args: tuple) -> tuple:
        return (args[0] * factor, *args[1:])

    return hook
