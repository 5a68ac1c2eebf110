"""The elastic axes of one layer: which tensors share the head and FFN axes.

:func:`describe_layer` reads one layer of a stack (see
:class:`raffm_core.families.Stack`) and returns its :class:`LayerLayout`;
:func:`raffm_core.layout.describe` calls it for every layer of every stack.
Axes follow the weight layout (:mod:`raffm_core.families`): ``(out, in)`` or ``(in, out)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .errors import UnsupportedModelError
from .families import Stack
from .spec import Width

Index = slice | torch.Tensor
"""Positions kept along one axis: a leading ``slice`` or a 1-D ``int64`` tensor."""


def expand(width: Width, block: int) -> Index:
    """Positions along an axis kept by ``width``, for units of ``block`` positions."""
    if isinstance(width, int):
        return slice(0, width * block)
    units = torch.tensor(width, dtype=torch.int64)
    return (units[:, None] * block + torch.arange(block)).reshape(-1)


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
    salient: bool = True
    """Whether the tensor counts towards its units' salience (a relative
    position bias moves with the heads but is not a weight they own)."""

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
    attention_paths : tuple of str
        Paths of the layer's attention modules (the parents of the query
        projections): one, or self- and cross-attention in a T5 decoder
        layer. Roles of a block after the first are prefixed ``cross.``.
    position_bias : str or None
        Path of the relative position bias ``nn.Embedding`` this layer owns
        for its whole stack (first layer of a T5 stack), else ``None``. Its
        weight is in ``heads`` (columns, one per head).
    """

    index: int
    modules: dict[str, str]
    heads: tuple[Coupled, ...]
    ffn: tuple[Coupled, ...]
    query_key: tuple[Coupled, ...]
    attention_paths: tuple[str, ...] = ()
    position_bias: str | None = None

    @property
    def attention(self) -> str:
        """Path of the (first) attention module (the parent of the query projection)."""
        return (self.modules.get("query") or self.modules["qkv"]).rpartition(".")[0]


def linear(model: nn.Module, path: str, transposed: bool = False) -> nn.Module:
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


def embedding(model: nn.Module, path: str) -> nn.Embedding:
    try:
        module = model.get_submodule(path)
    except AttributeError:
        raise UnsupportedModelError(f"expected an nn.Embedding at {path!r}, found none") from None
    if not isinstance(module, nn.Embedding):
        raise UnsupportedModelError(
            f"expected nn.Embedding at {path!r}, found {type(module).__name__}"
        )
    return module


@dataclass(frozen=True)
class LayerDims:
    """Sizes and settings every layer of a model shares (from its config and family)."""

    hidden: int
    head_dim: int
    num_heads: int
    num_kv: int
    ffn_size: int
    rotary: bool
    transposed: bool = False
    fused_qkv: bool = False


def ffn_inputs(block: nn.Module, stack: Stack) -> tuple[str, ...]:
    """The first of the stack's alternative FFN input sets present in ``block``."""
    for names in stack.ffn_in:
        try:
            for name in names:
                block.get_submodule(name)
        except AttributeError:
            continue
        return names
    raise UnsupportedModelError(
        f"no FFN input projections at any of {[list(n) for n in stack.ffn_in]} in {stack.layers!r}"
    )


def describe_layer(
    index: int,
    block: nn.Module,
    path: str,
    stack: Stack,
    ffn_in: tuple[str, ...],
    position_bias: str | None,
    dims: LayerDims,
    shapes: dict[str, tuple[int, ...]],
) -> LayerLayout:
    """The :class:`LayerLayout` of one layer; records its elastic shapes in ``shapes``."""
    t = dims.transposed
    out_axis, in_axis = (1, 0) if t else (0, 1)

    def shape(out_features: int, in_features: int) -> tuple[int, int]:
        # nn.Linear.weight is (out, in); GPT-2's Conv1D.weight is (in, out).
        return (in_features, out_features) if t else (out_features, in_features)

    group_size = dims.num_heads // dims.num_kv
    hidden, head_dim = dims.hidden, dims.head_dim
    q_rows, kv_rows = dims.num_heads * head_dim, dims.num_kv * head_dim
    mods: dict[str, str] = {}
    heads: list[Coupled] = []
    ffn: list[Coupled] = []
    query_key: list[Coupled] = []
    for j, attention in enumerate(stack.attention):
        role = "" if j == 0 else "cross." if j == 1 else f"cross{j}."
        if dims.fused_qkv:  # one module, Q, K and V as sections of its outputs
            inputs = (("qkv", attention.query, 3 * q_rows, head_dim, (0, q_rows, 2 * q_rows)),)
            qk_offsets: tuple[int, ...] = (0, q_rows)
        else:
            inputs = (
                ("query", attention.query, q_rows, group_size * head_dim, (0,)),
                ("key", attention.key, kv_rows, head_dim, (0,)),
                ("value", attention.value, kv_rows, head_dim, (0,)),
            )
            qk_offsets = (0,)
        for name, module, rows, unit, offsets in inputs:
            mods[role + name] = module
            lin = linear(block, module, t)
            key = path + module
            shapes[key + ".weight"] = shape(rows, hidden)
            heads.append(Coupled(key + ".weight", out_axis, unit, offsets))
            if lin.bias is not None:
                shapes[key + ".bias"] = (rows,)
                heads.append(Coupled(key + ".bias", 0, unit, offsets))
            if name != "value" and not dims.rotary and group_size == 1:
                query_key.append(Coupled(key + ".weight", out_axis, head_dim, qk_offsets))
                if lin.bias is not None:
                    query_key.append(Coupled(key + ".bias", 0, head_dim, qk_offsets))
        mods[role + "attn_out"] = attention.out
        linear(block, attention.out, t)
        out_key = path + attention.out + ".weight"
        shapes[out_key] = shape(hidden, q_rows)
        heads.append(Coupled(out_key, in_axis, group_size * head_dim))
    if position_bias is not None:
        table = embedding(block, position_bias)
        key = path + position_bias + ".weight"
        shapes[key] = (table.num_embeddings, dims.num_heads)
        heads.append(Coupled(key, 1, group_size, salient=False))
    mods["ffn_out"] = stack.ffn_out
    for j, name in enumerate(ffn_in):
        mods[f"ffn_in.{j}"] = name
        lin = linear(block, name, t)
        shapes[path + name + ".weight"] = shape(dims.ffn_size, hidden)
        ffn.append(Coupled(path + name + ".weight", out_axis, 1))
        if lin.bias is not None:
            shapes[path + name + ".bias"] = (dims.ffn_size,)
            ffn.append(Coupled(path + name + ".bias", 0, 1))
    linear(block, stack.ffn_out, t)
    shapes[path + stack.ffn_out + ".weight"] = shape(hidden, dims.ffn_size)
    ffn.append(Coupled(path + stack.ffn_out + ".weight", in_axis, 1))
    return LayerLayout(
        index=index,
        modules={role: path + name for role, name in mods.items()},
        heads=tuple(heads),
        ffn=tuple(ffn),
        query_key=tuple(query_key),
        attention_paths=tuple(path + a.query.rpartition(".")[0] for a in stack.attention),
        position_bias=None if position_bias is None else path + position_bias,
    )


__all__ = [
    "Coupled",
    "Index",
    "LayerDims",
    "LayerLayout",
    "describe_layer",
    "expand",
    "ffn_inputs",
    "linear",
]
