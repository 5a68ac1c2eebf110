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

from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from .errors import SpecError, UnsupportedModelError
from .families import FAMILIES, Family, find_family
from .layers import (
    Coupled,
    Index,
    LayerDims,
    LayerLayout,
    describe_layer,
    expand,
    ffn_inputs,
    linear,
)
from .spec import SubnetSpec, Width, width_count, width_max


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
        Every layer of every stack, in stack order (a T5's encoder blocks,
        then its decoder blocks); a :class:`SubnetSpec` has one entry each.
    head_ties : tuple of tuple of int
        Groups of layer indices that must share one head order and one kept
        head set: the layers of a stack with a relative position bias, which
        the first layer computes with its head columns and every later layer
        adds to its own heads' scores.
    vocab_key : str or None
        State-dict key of the input token embedding whose rows a spec's
        ``vocab`` trims (:attr:`Family.token_embedding`), or ``None`` when
        this model's vocabulary cannot be trimmed (no such family entry, or
        the embedding is tied to an output layer).
    vocab_size : int
        Rows of that embedding in the full model (0 without one).
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
    head_ties: tuple[tuple[int, ...], ...] = ()
    vocab_key: str | None = None
    vocab_size: int = 0

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
        if spec.vocab is not None:
            if self.vocab_key is None:
                trimmable = ", ".join(f.name for f in FAMILIES if f.token_embedding)
                raise SpecError(
                    f"spec keeps vocabulary rows, but the {self.model_class} has no token "
                    f"embedding that can be trimmed (families with one: {trimmable}; never "
                    "one tied to an output layer)"
                )
            if width_max(spec.vocab) > self.vocab_size:
                raise SpecError(
                    f"spec vocab: token id {width_max(spec.vocab) - 1} is outside the "
                    f"{self.vocab_size} rows of {self.vocab_key!r}"
                )
        for group in self.head_ties:
            kept = {spec.layers[i].heads for i in group}
            if len(kept) > 1:
                raise SpecError(
                    f"spec layers {group[0]}..{group[-1]} share a relative position bias and "
                    f"must keep the same heads, got {sorted(map(_short, kept))}"
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
        if spec.vocab is not None and self.vocab_key is not None:
            out[self.vocab_key] = (0, expand(spec.vocab, 1))
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

    def elastic_fraction(self, spec: SubnetSpec) -> float:
        """Share of the elastic tensors' parameters (heads, FFN neurons) ``spec`` keeps.

        Embeddings (trimmed or not), norms and the task head are left out: a
        sub-model keeping 1 of 12 heads counts as small even where the
        embeddings are most of its parameters.
        """
        kept = self.sub_shapes(spec)
        elastic = [k for k in self.slices(self.full_spec()) if k not in self.tied]
        return sum(prod(kept[k]) for k in elastic) / sum(prod(self.shapes[k]) for k in elastic)

    def unit_params(self) -> tuple[int, int]:
        """Parameters per head group and per FFN neuron, in one layer."""
        layer = self.layers[0]

        def per_unit(c: Coupled) -> int:
            return c.block * len(c.offsets) * prod(self.shapes[c.key]) // self.shapes[c.key][c.axis]

        salient = [c for c in layer.heads if c.salient]
        return sum(map(per_unit, salient)), sum(map(per_unit, layer.ffn))


def _short(width: Width) -> str:
    return str(width) if isinstance(width, int) else f"<{width_count(width)} indices>"


def _config_int(config: PretrainedConfig, name: str) -> int:
    value = getattr(config, name, None)
    if not isinstance(value, int):
        raise UnsupportedModelError(f"config of {config.model_type!r} has no integer {name!r}")
    return value


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
    stacks = []
    for stack in family.layer_stacks():
        try:
            stacks.append((stack, base.get_submodule(stack.layers)))
        except AttributeError:
            raise UnsupportedModelError(
                f"{type(model).__name__}: no layer list at {stack.layers!r}"
            ) from None

    in_axis = 0 if family.transposed else 1
    first = linear(stacks[0][1][0], stacks[0][0].attention[0].query, family.transposed)
    hidden = first.weight.shape[in_axis]
    head_dim = getattr(config, family.head_dim_attr or "head_dim", None) or hidden // num_heads
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
    dims = LayerDims(
        hidden,
        head_dim,
        num_heads,
        num_kv,
        ffn_size,
        family.rotary,
        family.transposed,
        family.fused_qkv,
    )
    layers: list[LayerLayout] = []
    ties = []
    for stack, blocks in stacks:
        ffn_in = ffn_inputs(blocks[0], stack)
        start = len(layers)
        for i in range(len(blocks)):
            path = f"{prefix}{stack.layers}.{i}."
            bias = stack.position_bias if (stack.position_bias and i == 0) else None
            layers.append(
                describe_layer(len(layers), blocks[i], path, stack, ffn_in, bias, dims, shapes)
            )
        if stack.position_bias and len(blocks) > 1:
            ties.append(tuple(range(start, len(layers))))

    tied = _tied_keys(model)
    vocab_key, vocab_size = _token_embedding(model, family, prefix, config, tied)
    if vocab_key is not None:  # a sub-model's trimmed table: the full size is the config's
        shapes[vocab_key] = (vocab_size, shapes[vocab_key][1])
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
        head_ties=tuple(ties),
        vocab_key=vocab_key,
        vocab_size=vocab_size,
    )


def _token_embedding(
    model: PreTrainedModel,
    family: Family,
    prefix: str,
    config: PretrainedConfig,
    tied: dict[str, str],
) -> tuple[str | None, int]:
    """The trimmable token embedding's key and full row count, or ``(None, 0)``."""
    if family.token_embedding is None:
        return None, 0
    key = f"{prefix}{family.token_embedding}.weight"
    if key in tied or key in tied.values():  # rows also score outputs: not an input lookup
        return None, 0
    try:
        module = model.get_submodule(prefix + family.token_embedding)
    except AttributeError:
        return None, 0
    if not isinstance(module, nn.Embedding):
        return None, 0
    return key, _config_int(config, "vocab_size")


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
