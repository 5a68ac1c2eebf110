"""Salient parameter prioritization (paper §3.1.1-3.1.2), function-preserving.

Three kinds of unit are ranked, per layer, by salience, and moved so the most
salient come first:

* **FFN neurons.** A neuron owns a row of each FFN input projection (up, and
  gate in gated FFNs) and a column of the output projection.
* **Head groups.** A group owns its heads' row blocks in Q, K and V and its
  column block in the attention output projection. Under grouped-query
  attention a group is one key/value head with every query head that shares it,
  so they move together.
* **Query/key channels within a head** (Eq. 5, Theorem 1). The same permutation
  of a head's rows in Q and K leaves ``Q K^T`` unchanged. Skipped under rotary
  embeddings, which tie channel ``i`` to ``i + d/2``.

Salience (Eq. 1) of a unit is the norm of the weights it owns, summed over the
tensors it owns them in: the L1 norm by default (the paper's choice), or L2.
For Q/K channels it is Eq. 5, the mean of the channel's norm in Q and in K.
Biases carry no salience but move with their rows.

Every permutation is applied to every tensor that shares the permuted axis, so
the model computes exactly what it computed before (up to float summation
order). Work is on weights found through the family table, never on module
class names, so the attention implementation (eager, SDPA, ...) is irrelevant.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from .errors import RaffmError
from .layout import Coupled, ModelLayout, describe
from .spec import SubnetSpec, width_count

L1, L2 = "l1", "l2"
NORMS = (L1, L2)


@dataclass(frozen=True)
class LayerPermutation:
    """The reordering applied to one layer.

    ``heads[i]`` is the old index of the head group now at position ``i``;
    likewise ``ffn``. ``query_key`` has one row per head (in the new head
    order) giving the old channel at each position, or is ``None``.
    """

    heads: torch.Tensor
    ffn: torch.Tensor
    query_key: torch.Tensor | None


@dataclass(frozen=True)
class Permutation:
    """The reordering :func:`prioritize` applied, one entry per layer.

    Apply it to any state dict laid out like the model (server optimizer
    moments, say) with :func:`permute_state`.
    """

    layers: tuple[LayerPermutation, ...]

    @property
    def is_identity(self) -> bool:
        def ident(p: torch.Tensor | None) -> bool:
            if p is None:
                return True
            return bool((p == torch.arange(p.shape[-1]).expand_as(p)).all())

        return all(ident(x.heads) and ident(x.ffn) and ident(x.query_key) for x in self.layers)


def _norm_fn(norm: str):
    if norm not in NORMS:
        raise RaffmError(f"unknown norm {norm!r}; supported norms are {', '.join(NORMS)}")
    return norm


def _unit_scores(
    state: Mapping[str, torch.Tensor], tensors: tuple[Coupled, ...], norm: str, num_units: int
) -> torch.Tensor:
    """Salience of each unit, summed over the weight tensors it owns (Eq. 1)."""
    score = torch.zeros(num_units, dtype=torch.float64)
    for c in tensors:
        if not c.key.endswith(".weight") or not c.salient:
            continue
        w = state[c.key].detach().to(torch.float64).movedim(c.axis, 0)
        for offset in c.offsets:  # a fused tensor's sections count as separate tensors
            part = w[offset : offset + num_units * c.block].reshape(num_units, -1)
            score += part.abs().sum(1) if norm == L1 else part.pow(2).sum(1).sqrt()
    return score


def _rank(score: torch.Tensor) -> torch.Tensor:
    # Stable, so equal salience keeps the current order and an already
    # prioritized model is a fixed point.
    return torch.sort(score, descending=True, stable=True).indices


def _take(tensor: torch.Tensor, c: Coupled, unit_perm: torch.Tensor) -> None:
    """Reorder ``tensor`` in place so unit ``unit_perm[i]`` moves to position ``i``.

    Positions outside the sections ``c`` describes stay where they are.
    """
    index = torch.arange(tensor.shape[c.axis])
    index[c.positions(torch.arange(len(unit_perm)))] = c.positions(unit_perm)
    tensor.copy_(torch.index_select(tensor, c.axis, index.to(tensor.device)))


def _take_within(tensor: torch.Tensor, c: Coupled, channel_perm: torch.Tensor) -> None:
    """Reorder channels inside each block of each section.

    Position ``o + h*block + j`` takes ``o + h*block + perm[h, j]`` for every
    section start ``o`` of ``c``.
    """
    heads = channel_perm.shape[0]
    within = (torch.arange(heads)[:, None] * c.block + channel_perm).reshape(-1)
    index = torch.arange(tensor.shape[c.axis])
    for offset in c.offsets:
        index[offset : offset + within.numel()] = offset + within
    tensor.copy_(torch.index_select(tensor, c.axis, index.to(tensor.device)))


def rank_units(
    state: Mapping[str, torch.Tensor],
    layout: ModelLayout,
    norm: str = L1,
    scores: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> Permutation:
    """Compute the prioritizing permutation of a full-model state dict.

    Returns the permutation without applying it. The Q/K channel order is
    ranked on the head order *after* the head permutation. Layers tied by a
    shared relative position bias (:attr:`ModelLayout.head_ties`, a T5 stack)
    get one head order, ranked on their heads' salience summed over the stack:
    the bias column of head ``h`` is added to head ``h`` in every one of them,
    so per-layer orders could not all match the one bias table.

    ``scores`` (one ``(head_groups, ffn_neurons)`` pair per layer, e.g.
    :func:`raffm_core.importance.taylor_importance`) replaces the weight
    norms as the salience of heads and FFN neurons; ``norm`` still orders
    the Q/K channels within a head.
    """
    norm = _norm_fn(norm)
    if scores is not None and len(scores) != layout.num_layers:
        raise RaffmError(f"scores has {len(scores)} layers, the model has {layout.num_layers}")

    def head_score(i: int) -> torch.Tensor:
        if scores is not None:
            return scores[i][0].to(torch.float64)
        return _unit_scores(state, layout.layers[i].heads, norm, layout.num_groups)

    def ffn_score(i: int) -> torch.Tensor:
        if scores is not None:
            return scores[i][1].to(torch.float64)
        return _unit_scores(state, layout.layers[i].ffn, norm, layout.ffn_size)

    shared: dict[int, torch.Tensor] = {}
    for group in layout.head_ties:
        score = sum(head_score(i) for i in group)
        for i in group:
            shared[i] = _rank(score)
    layers = []
    for layer in layout.layers:
        heads = shared.get(layer.index)
        if heads is None:
            heads = _rank(head_score(layer.index))
        ffn = _rank(ffn_score(layer.index))
        query_key = None
        if layer.query_key:
            d = layout.head_dim
            weights = [c for c in layer.query_key if c.key.endswith(".weight")]
            per_channel = []
            for c in weights:
                w = state[c.key].detach().to(torch.float64).movedim(c.axis, 0).flatten(1)
                rows = w.abs().sum(1) if norm == L1 else w.pow(2).sum(1).sqrt()
                for offset in c.offsets:  # Q and K sections of a fused projection
                    part = rows[offset : offset + layout.num_groups * d]
                    per_channel.append(part.reshape(layout.num_groups, d)[heads])
            score = sum(per_channel) / len(per_channel)  # Eq. 5: mean over Q and K
            query_key = torch.sort(score, dim=1, descending=True, stable=True).indices
        layers.append(LayerPermutation(heads=heads, ffn=ffn, query_key=query_key))
    return Permutation(tuple(layers))


@torch.no_grad()
def permute_state(
    state: MutableMapping[str, torch.Tensor], layout: ModelLayout, permutation: Permutation
) -> None:
    """Apply ``permutation`` in place to every coupled tensor of ``state``.

    ``state`` must hold full-model shapes for every elastic key; keys outside
    the layout are left alone. Use it to keep tensors that mirror the model
    (optimizer moments, a reference copy) aligned with a prioritized model.
    """
    if len(permutation.layers) != layout.num_layers:
        raise RaffmError(
            f"permutation has {len(permutation.layers)} layers, model has {layout.num_layers}"
        )
    for layer, perm in zip(layout.layers, permutation.layers, strict=True):
        for c in layer.heads:
            _take(state[c.key], c, perm.heads)
        for c in layer.ffn:
            _take(state[c.key], c, perm.ffn)
        if perm.query_key is not None:
            for c in layer.query_key:
                _take_within(state[c.key], c, perm.query_key)


def prioritize_state(
    state: Mapping[str, torch.Tensor], layout: ModelLayout, norm: str = L1
) -> tuple[dict[str, torch.Tensor], Permutation]:
    """A reordered copy of ``state`` with salient units first, and the reordering.

    The state-dict counterpart of :func:`prioritize`: the returned state is a
    new dict of fresh tensors and ``state`` itself is never changed, so a
    caller that rejects a round keeps the old model bit for bit.
    """
    fresh = {key: value.clone() for key, value in state.items()}
    permutation = rank_units(fresh, layout, norm)
    permute_state(fresh, layout, permutation)
    return fresh, permutation


def prioritize(model: PreTrainedModel, norm: str = L1) -> Permutation:
    """Reorder ``model`` in place so its most salient units come first.

    Parameters
    ----------
    model : PreTrainedModel
        A full model of a supported family (see :mod:`raffm_core.families`).
    norm : {"l1", "l2"}
        Channel norm of paper Eq. 1. The paper prefers L1.

    Returns
    -------
    Permutation
        What was applied, for keeping other tensors aligned (:func:`permute_state`).

    Raises
    ------
    UnsupportedModelError
        If the architecture is not supported.
    RaffmError
        If ``norm`` is unknown.
    """
    _norm_fn(norm)
    layout = describe(model)
    state = model.state_dict()
    permutation = rank_units(state, layout, norm)
    permute_state(state, layout, permutation)
    return permutation


def prefix_kept(permutation: Permutation, specs: Sequence[SubnetSpec]) -> dict[str, float]:
    """How much of the narrowest sent prefix the round's reordering left in place.

    Per axis, over layers: the share of the units at positions ``0..k-1`` after
    the reordering that were already there before (``k``: the narrowest width
    sent this round on that axis in that layer). 1.0: the smallest
    sub-model trains the same units as last round; lower values mean the
    salience order is churning.
    """
    shares: dict[str, list[float]] = {"heads": [], "ffn": []}
    for i, layer in enumerate(permutation.layers):
        for axis, order in (("heads", layer.heads), ("ffn", layer.ffn)):
            k = min(width_count(getattr(s.layers[i], axis)) for s in specs)
            if k < len(order):
                shares[axis].append(float((order[:k] < k).float().mean()))
    return {f"{axis}-kept": sum(v) / len(v) for axis, v in shares.items() if v}
