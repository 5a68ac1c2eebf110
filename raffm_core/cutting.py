"""From a full model and a budget to a real, smaller model, in one call.

:func:`cut` is the pipeline the server runs for every node, and that a user
runs to get a sub-model out of a model: rank the units by salience
(:func:`~raffm_core.prioritize.rank_units`), reorder a copy so the salient
ones come first (:func:`~raffm_core.prioritize.permute_state`), choose the
widths the budget allows (:func:`~raffm_core.select.select_subnet`), slice
(:func:`~raffm_core.extract.extract_state_dict`) and build the sub-model
(:func:`~raffm_core.extract.build_submodel`). The input model is never changed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from .budget import Budget, MemoryProfile
from .errors import RaffmError, SpecError
from .extract import base_config, build_submodel, extract_state_dict, spec_of
from .layout import ModelLayout, describe
from .prioritize import L1, Permutation, permute_state, rank_units
from .select import LARGEST, select_subnet
from .spec import SubnetSpec, Width


@dataclass(frozen=True)
class CutResult:
    """What :func:`cut` made.

    Attributes
    ----------
    model : PreTrainedModel
        The sub-model: a real, smaller model of the input's class, sharing no
        storage with it. Its config names ``spec`` (:func:`~raffm_core.spec_of`),
        so :func:`~raffm_core.save_submodel` and :func:`~raffm_core.width_scaler`
        work on it.
    spec : SubnetSpec
        What it keeps, as positions in the reordered model: ``heads=2`` is
        the two most salient head groups when the model was ranked.
    permutation : Permutation or None
        The reordering applied to the copy before slicing (``permutation.layers[i].heads[j]``
        is the original index of the head group at position ``j`` of layer ``i``),
        or ``None`` when the model was cut in its stored order.
    """

    model: PreTrainedModel
    spec: SubnetSpec
    permutation: Permutation | None


def cut(
    model: PreTrainedModel,
    budget: Budget | str | SubnetSpec,
    *,
    salience: str | None = L1,
    scores: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
    mode: str = LARGEST,
    seed: int | None = None,
    profile: MemoryProfile | None = None,
    vocab: Width | None = None,
) -> CutResult:
    """Cut the sub-model ``budget`` allows out of ``model``, its most salient units kept.

    Parameters
    ----------
    model : PreTrainedModel
        A full model of a supported family (not a sub-model). It is not changed.
    budget : Budget, str or SubnetSpec
        A budget (``"params=0.6"``, ``"memory-mb=900"``), for which
        :func:`~raffm_core.select_subnet` chooses the widths, or a spec to
        cut as it is.
    salience : {"l1", "l2"} or None
        The weight norm that ranks heads and FFN neurons (paper Eq. 1; also
        the norm of the Q/K channel order within a head). ``None`` cuts the
        model in its stored order: for a model already prioritized, or to
        see what a prefix keeps when nobody ranks the units.
    scores : sequence of (Tensor, Tensor), optional
        One ``(head_groups, ffn_neurons)`` score pair per layer (e.g.
        :func:`raffm_core.importance.taylor_importance`) that replaces the
        weight norms as the salience of heads and FFN neurons.
    mode, seed, profile, vocab
        How a budget becomes a spec, as in :func:`~raffm_core.select_subnet`:
        ``"largest"`` (the widest uniform spec that fits) or ``"sample"``
        (a random draw seeded by ``seed``); the memory model a
        ``memory-mb`` budget is checked against (training by default,
        :class:`~raffm_core.InferenceProfile` for a forward pass only); the
        token-embedding rows to keep. Only with a budget, not with a spec.

    Returns
    -------
    CutResult
        The sub-model (in the train or eval mode ``model`` is in), its spec
        and the reordering.

    Raises
    ------
    SpecError
        If ``model`` is already a sub-model, if a spec does not fit it, or if
        ``mode``, ``seed``, ``profile`` or ``vocab`` come with a spec.
    BudgetTooSmallError
        If even the smallest sub-network does not fit the budget.
    BudgetError
        For an unparsable budget or an unknown mode.
    RaffmError
        For an unknown ``salience``, ``scores`` without a ``salience`` or with
        the wrong number of layers.
    UnsupportedModelError
        If the architecture is not supported.

    Examples
    --------
    >>> small = cut(model, "params=0.6").model  # doctest: +SKIP
    >>> small(**inputs).logits  # a forward pass of 60% of the parameters  # doctest: +SKIP
    """
    if spec_of(model) is not None:
        raise SpecError("cut needs the full model, got a sub-model (its config names a spec)")
    if salience is None and scores is not None:
        raise RaffmError("cut: scores rank the units, so they need a salience ('l1' or 'l2')")
    layout = describe(model)
    spec = _spec_for(layout, budget, mode, seed, profile, vocab)  # before any copying
    state = _copy_for_permuting(model.state_dict(), layout)
    permutation = None
    if salience is not None:
        permutation = rank_units(state, layout, salience, scores)
        permute_state(state, layout, permutation)
    attn = getattr(model.config, "_attn_implementation", None)
    sub = build_submodel(
        base_config(model), spec, extract_state_dict(state, layout, spec), attn_implementation=attn
    )
    sub.train(model.training)
    return CutResult(sub, spec, permutation)


def _spec_for(
    layout: ModelLayout,
    budget: Budget | str | SubnetSpec,
    mode: str,
    seed: int | None,
    profile: MemoryProfile | None,
    vocab: Width | None,
) -> SubnetSpec:
    if not isinstance(budget, SubnetSpec):
        return select_subnet(layout, budget, mode, seed=seed, profile=profile, vocab=vocab)
    given = {
        name: value
        for name, value, default in (
            ("mode", mode, LARGEST),
            ("seed", seed, None),
            ("profile", profile, None),
            ("vocab", vocab, None),
        )
        if value != default
    }
    if given:
        raise SpecError(
            f"cut: {', '.join(given)} choose a spec for a budget; a SubnetSpec is cut as it is "
            "(pass a budget instead, or set its vocab with SubnetSpec.with_vocab)"
        )
    layout.check_spec(budget)
    return budget


def _copy_for_permuting(
    state: Mapping[str, torch.Tensor], layout: ModelLayout
) -> dict[str, torch.Tensor]:
    """``state`` with every tensor a permutation moves cloned, the rest as they are.

    Reordering works in place, so those tensors must not be the model's own;
    the others (embeddings, norms, the head) are only read, and the built
    sub-model copies them when it loads its weights.
    """
    moved = {c.key for layer in layout.layers for c in (*layer.heads, *layer.ffn, *layer.query_key)}
    return {key: value.detach().clone() if key in moved else value for key, value in state.items()}
