"""Where the elastic axes of one concrete model are, as state-dict keys.

:func:`describe` reads a model's family entry (see :mod:`raffm_core.families`)
and its config, and returns a :class:`ModelLayout`: for every layer, which
tensors share the head axis and which share the FFN-neuron axis, on which axis
of each tensor, and in blocks of how many rows or columns per unit. Ranking,
permuting, slicing and aggregating are all written against this description.
Axes follow the weight layout (:mod:`raffm_core.families`): ``(out, in)`` or ``(in, out)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from .errors import SpecError, UnsupportedModelError
from .families import Family, find_family
from .spec import SubnetSpec, Width, width_count, width_max

Index = slice | torch.Tensor
"""Positions kept along one axis: a leading ``slice`` or a 1-D ``int64`` tensor."""


@dataclass(frozen=True)
class Coupled:
    """One tensor that takes part in an elastic axis.

    Unit ``u`` of the axis owns positions ``o + u*block .. o + (u+1)*block-1``
    along ``axis`` of the tensor stored under ``key``, for every section start
    ``o`` in ``offsets``. A tensor has one section (``offsets=(0,)``) unless
    it fuses several projections: GPT-2's ``c_attn`` holds Q, K and V side by
    side, ``offsets=(0, H, 2H)`` for ``H = heads x head_dim``.
    """

    key: str
    axis: int
    block: int
    offsets: tuple[int, ...] = (0,)

    def positions(self, units: torch.Tensor) -> torch.Tensor:
        """Positions along ``axis`` owned by ``units`` (in that order), section by section."""
        within = (units[:, None] * self.block + torch.arange(self.block)).reshape(-1)
        return torch.cat([offset + within for offset in self.offsets])

    def index(self, width: Width) -> Index:
        """Positions along ``axis`` kept by ``width``: a leading slice when possible."""
        if self.offsets == (0,):
            return expand(width, self.block)
        units = torch.arange(width) if isinstance(width, int) else torch.tensor(width)
        return self.positions(units.to(torch.int64))


@dataclass(frozen=True)
class LayerLayout:
    """The elastic axes of one transformer layer.

    Attributes
    ----------
    index : int
        Layer number.
    modules : dict
        Role (``query``, ``key``, ``value``, ``attn_out``, ``ffn_in.N``,
        ``ffn_out``) to the module's dotted path in the model; one role
        ``qkv`` instead of the first three when they are fused.
    heads : tuple of Coupled
        Tensors whose positions belong to head groups: rows of Q, K, V (and
        biases), columns of the attention output projection.
    ffn : tuple of Coupled
        Tensors whose positions belong to FFN neurons: rows of the up (and
        gate) projections and their biases, columns of the down projection.
    query_key : tuple of Coupled
        Rows of Q and K (and biases) in blocks of one head, for the within-head
        channel order of paper Eq. 5. Empty when that order must not change
        (rotary embeddings, or grouped key/value heads).
    """

    index: int
    modules: dict[str, str]
    heads: tuple[Coupled, ...]
    ffn: tuple[Coupled, ...]
    query_key: tuple[Coupled, ...]

    @property
    def attention(self) -> str:
        """Path of the attention module (the parent of the query projection)."""
        return (self.modules.get("query") or self.modules["qkv"]).rpartition(".")[0]


@dataclass(frozen=True)
class ModelLayout:
    """The elastic structure of a full model, computed by :func:`describe`.

    Attributes
    ----------
    family : Family
        The family entry this layout was built from.
    model_class : str
        Name of the ``transformers`` class of the model.
    num_groups : int
        Head groups per layer (key/value heads under GQA, heads otherwise).
    group_size : int
        Query heads per group.
    head_dim : int
        Channels per head.
    ffn_size : int
        FFN neurons per layer.
    shapes : dict
        Every state-dict key of the full model to its shape.
    tied : dict
        Keys that alias another key's storage (tied weights) to that key.
    layers : tuple of LayerLayout
    """

    family: Family
    model_class: str
    num_groups: int
    group_size: int
    head_dim: int
    ffn_size: int
    shapes: dict[str, tuple[int, ...]]
    tied: dict[str, str]
    layers: tuple[LayerLayout, ...]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        """Width of the residual stream (the attention projections' input features)."""
        query = self.layers[0].heads[0]  # a 2-D weight; its other axis is the input
        return self.shapes[query.key][1 - query.axis]

    @property
    def total_params(self) -> int:
        """Parameters and persistent buffers of the full model, tied ones once."""
        return sum(prod(s) for k, s in self.shapes.items() if k not in self.tied)

    def full_spec(self) -> SubnetSpec:
        """The spec that keeps everything."""
        return SubnetSpec.uniform(self.num_layers, self.num_groups, self.ffn_size)

    def check_spec(self, spec: SubnetSpec) -> None:
        """Raise :class:`SpecError` unless ``spec`` fits this model."""
        if not isinstance(spec, SubnetSpec):
            raise SpecError(f"expected a SubnetSpec, got {type(spec).__name__}")
        if len(spec.layers) != self.num_layers:
            raise SpecError(
                f"spec has {len(spec.layers)} layers, the {self.model_class} has {self.num_layers}"
            )
        for i, layer in enumerate(spec.layers):
            if width_max(layer.heads) > self.num_groups:
                raise SpecError(
                    f"spec layer {i}: heads {layer.heads} exceed the {self.num_groups} head groups"
                )
            if width_max(layer.ffn) > self.ffn_size:
                raise SpecError(
                    f"spec layer {i}: ffn {_short(layer.ffn)} exceeds the {self.ffn_size} neurons"
                )

    def slices(self, spec: SubnetSpec) -> dict[str, tuple[int, Index]]:
        """Map every elastic key to ``(axis, kept positions)`` under ``spec``.

        Keys that are not elastic (embeddings, norms, heads of the task) are
        absent: the sub-model holds them whole.
        """
        self.check_spec(spec)
        out: dict[str, tuple[int, Index]] = {}
        for layer, kept in zip(self.layers, spec.layers, strict=True):
            for coupled in layer.heads:
                out[coupled.key] = (coupled.axis, coupled.index(kept.heads))
            for coupled in layer.ffn:
                out[coupled.key] = (coupled.axis, coupled.index(kept.ffn))
        return out

    def sub_shapes(self, spec: SubnetSpec) -> dict[str, tuple[int, ...]]:
        """Shape of every state-dict key of the sub-model ``spec`` describes."""
        shapes = dict(self.shapes)
        for key, (axis, index) in self.slices(spec).items():
            shape = list(shapes[key])
            shape[axis] = index.stop if isinstance(index, slice) else int(index.numel())
            shapes[key] = tuple(shape)
        return shapes

    def count_params(self, spec: SubnetSpec) -> int:
        """Parameters the sub-model holds (embeddings and task head included)."""
        return sum(prod(s) for k, s in self.sub_shapes(spec).items() if k not in self.tied)

    def unit_params(self) -> tuple[int, int]:
        """Parameters per head group and per FFN neuron, in one layer."""
        layer = self.layers[0]

        def per_unit(c: Coupled) -> int:
            return c.block * len(c.offsets) * prod(self.shapes[c.key]) // self.shapes[c.key][c.axis]

        return sum(map(per_unit, layer.heads)), sum(map(per_unit, layer.ffn))


def expand(width: Width, block: int) -> Index:
    """Positions along an axis kept by ``width``, for units of ``block`` positions."""
    if isinstance(width, int):
        return slice(0, width * block)
    units = torch.tensor(width, dtype=torch.int64)
    return (units[:, None] * block + torch.arange(block)).reshape(-1)


def _short(width: Width) -> str:
    return str(width) if isinstance(width, int) else f"<{width_count(width)} indices>"


def _config_int(config: PretrainedConfig, name: str) -> int:
    value = getattr(config, name, None)
    if not isinstance(value, int):
        raise UnsupportedModelError(f"config of {config.model_type!r} has no integer {name!r}")
    return value


def _linear(model: nn.Module, path: str, transposed: bool = False) -> nn.Module:
    """The projection at ``path``: ``nn.Linear``, or ``Conv1D`` when ``transposed``."""
    expected = Conv1D if transposed else nn.Linear
    try:
        module = model.get_submodule(path)
    except AttributeError:
        raise UnsupportedModelError(f"expected a module at {path!r}, found none") from None
    if not isinstance(module, expected):
        raise UnsupportedModelError(
            f"expected {expected.__name__} at {path!r}, found {type(module).__name__}"
        )
    return module


def _base_prefix(model: PreTrainedModel) -> str:
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and hasattr(model, prefix) and isinstance(getattr(model, prefix), nn.Module):
        return prefix + "."
    return ""


def describe(model: PreTrainedModel) -> ModelLayout:
    """Describe the elastic axes of ``model`` (a full model or a sub-model of it).

    Sizes come from the config, so a sub-model built by
    :func:`raffm_core.build_submodel` describes the full model it came from.

    Raises
    ------
    UnsupportedModelError
        If the architecture is not in :data:`raffm_core.families.FAMILIES`, or
        uses a setting under which reordering would change its function, or
        fuses Q, K and V while sharing key/value heads.
    """
    if not isinstance(model, PreTrainedModel):
        raise UnsupportedModelError(
            f"expected a transformers PreTrainedModel, got {type(model).__name__}"
        )
    config = model.config
    family = find_family(config.model_type)
    position = getattr(config, "position_embedding_type", "absolute")
    if position not in (None, "absolute"):
        raise UnsupportedModelError(
            f"position_embedding_type={position!r} is not supported (only 'absolute'): "
            "relative position tables are indexed by head channel"
        )
    num_heads = _config_int(config, family.heads_attr)
    num_kv = _config_int(config, family.kv_heads_attr) if family.kv_heads_attr else num_heads
    if num_kv < 1 or num_heads % num_kv:
        raise UnsupportedModelError(
            f"{num_heads} query heads cannot share {num_kv} key/value heads"
        )
    group_size = num_heads // num_kv

    prefix = _base_prefix(model)
    base = model.get_submodule(prefix[:-1]) if prefix else model
    try:
        blocks = base.get_submodule(family.layers)
    except AttributeError:
        raise UnsupportedModelError(
            f"{type(model).__name__}: no layer list at {family.layers!r}"
        ) from None

    t = family.transposed
    out_axis, in_axis = (1, 0) if t else (0, 1)

    def shape(out_features: int, in_features: int) -> tuple[int, int]:
        # nn.Linear.weight is (out, in); GPT-2's Conv1D.weight is (in, out).
        return (in_features, out_features) if t else (out_features, in_features)

    first = _linear(blocks[0], family.query, t)
    hidden = first.weight.shape[in_axis]
    head_dim = getattr(config, "head_dim", None) or hidden // num_heads
    if family.ffn_size_factor and getattr(config, family.ffn_size_attr, None) is None:
        ffn_size = family.ffn_size_factor * hidden
    else:
        ffn_size = _config_int(config, family.ffn_size_attr)
    if family.fused_qkv and group_size != 1:
        raise UnsupportedModelError(
            f"a fused query/key/value projection needs one key/value head per query head, "
            f"got {num_heads} query and {num_kv} key/value heads"
        )

    # Elastic shapes come from the config (the model may be a sub-model);
    # everything else from the model itself.
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    q_rows, kv_rows = num_heads * head_dim, num_kv * head_dim
    if family.fused_qkv:  # one module, Q, K and V as sections of its outputs
        inputs = (("qkv", family.query, 3 * q_rows, head_dim, (0, q_rows, 2 * q_rows)),)
        qk_offsets: tuple[int, ...] = (0, q_rows)
    else:
        inputs = (
            ("query", family.query, q_rows, group_size * head_dim, (0,)),
            ("key", family.key, kv_rows, head_dim, (0,)),
            ("value", family.value, kv_rows, head_dim, (0,)),
        )
        qk_offsets = (0,)
    layers = []
    for i in range(len(blocks)):
        path = f"{prefix}{family.layers}.{i}."
        block = blocks[i]
        mods = {
            **{role: name for role, name, *_ in inputs},
            "attn_out": family.attn_out,
            "ffn_out": family.ffn_out,
            **{f"ffn_in.{j}": name for j, name in enumerate(family.ffn_in)},
        }
        heads: list[Coupled] = []
        ffn: list[Coupled] = []
        query_key: list[Coupled] = []
        for role, name, rows, unit, offsets in inputs:
            lin = _linear(block, name, t)
            key = path + name
            shapes[key + ".weight"] = shape(rows, hidden)
            heads.append(Coupled(key + ".weight", out_axis, unit, offsets))
            if lin.bias is not None:
                shapes[key + ".bias"] = (rows,)
                heads.append(Coupled(key + ".bias", 0, unit, offsets))
            if role != "value" and not family.rotary and group_size == 1:
                query_key.append(Coupled(key + ".weight", out_axis, head_dim, qk_offsets))
                if lin.bias is not None:
                    query_key.append(Coupled(key + ".bias", 0, head_dim, qk_offsets))
        _linear(block, mods["attn_out"], t)
        out_key = path + mods["attn_out"] + ".weight"
        shapes[out_key] = shape(hidden, q_rows)
        heads.append(Coupled(out_key, in_axis, group_size * head_dim))
        for name in family.ffn_in:
            lin = _linear(block, name, t)
            shapes[path + name + ".weight"] = shape(ffn_size, hidden)
            ffn.append(Coupled(path + name + ".weight", out_axis, 1))
            if lin.bias is not None:
                shapes[path + name + ".bias"] = (ffn_size,)
                ffn.append(Coupled(path + name + ".bias", 0, 1))
        _linear(block, family.ffn_out, t)
        shapes[path + family.ffn_out + ".weight"] = shape(hidden, ffn_size)
        ffn.append(Coupled(path + family.ffn_out + ".weight", in_axis, 1))
        layers.append(
            LayerLayout(
                index=i,
                modules={role: path + name for role, name in mods.items()},
                heads=tuple(heads),
                ffn=tuple(ffn),
                query_key=tuple(query_key),
            )
        )

    tied = _tied_keys(model)
    return ModelLayout(
        family=family,
        model_class=type(model).__name__,
        num_groups=num_kv,
        group_size=group_size,
        head_dim=head_dim,
        ffn_size=ffn_size,
        shapes=shapes,
        tied=tied,
        layers=tuple(layers),
    )


def _tied_keys(model: nn.Module) -> dict[str, str]:
    """State-dict keys whose tensor is the same object as an earlier key's."""
    seen: dict[int, str] = {}
    tied: dict[str, str] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        ident = id(tensor)
        if ident in seen:
            tied[key] = seen[ident]
        else:
            seen[ident] = key
    return tied


__all__ = ["Coupled", "LayerLayout", "ModelLayout", "describe", "expand"]
