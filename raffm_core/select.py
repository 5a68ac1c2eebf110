"""Choosing a sub-network that fits a client's budget (paper §3.1.3)."""

from __future__ import annotations

import numpy as np
from transformers import PreTrainedModel

from .budget import Budget, MemoryProfile, TrainingProfile
from .errors import BudgetError, BudgetTooSmallError
from .layout import ModelLayout, describe
from .spec import LayerSpec, SubnetSpec, Width

LARGEST, SAMPLE = "largest", "sample"
MODES = (LARGEST, SAMPLE)
SAMPLE_DRAWS = 1000
"""Draws :func:`select_subnet`'s ``"sample"`` mode tries before it draws within the largest."""


def ffn_step(layout: ModelLayout) -> int:
    """Granularity of FFN widths: 1/64 of the FFN, at least 1 neuron."""
    return max(1, layout.ffn_size // 64)


def _ffn_grid(layout: ModelLayout) -> list[int]:
    step = ffn_step(layout)
    grid = list(range(step, layout.ffn_size, step))
    return [*grid, layout.ffn_size]


def _fits(budget: Budget, layout, spec, profile, limit) -> bool:
    return budget.cost(layout, spec, profile) <= limit


def _smallest(layout: ModelLayout, vocab: Width | None = None) -> SubnetSpec:
    return SubnetSpec.uniform(layout.num_layers, 1, _ffn_grid(layout)[0], vocab)


def _largest(
    layout: ModelLayout,
    budget: Budget,
    profile: MemoryProfile,
    limit: float,
    vocab: Width | None = None,
) -> SubnetSpec:
    """The widest uniform configuration that fits.

    Head groups and FFN neurons shrink together by the same ratio; whatever
    budget the coarse head steps leave over goes to FFN width.
    """
    grid = _ffn_grid(layout)
    n = layout.num_layers
    for heads in range(layout.num_groups, 0, -1):
        ratio = heads / layout.num_groups
        balanced = max(1, min(len(grid), round(ratio * len(grid))))
        if not _fits(
            budget,
            layout,
            SubnetSpec.uniform(n, heads, grid[balanced - 1], vocab),
            profile,
            limit,
        ):
            continue
        lo, hi = balanced - 1, len(grid) - 1  # lo fits; find the last grid entry that fits
        while lo < hi:
            mid = (lo + hi + 1) // 2
            spec = SubnetSpec.uniform(n, heads, grid[mid], vocab)
            if _fits(budget, layout, spec, profile, limit):
                lo = mid
            else:
                hi = mid - 1
        return SubnetSpec.uniform(n, heads, grid[lo], vocab)
    if _fits(budget, layout, _smallest(layout, vocab), profile, limit):
        return _smallest(layout, vocab)
    raise AssertionError("unreachable: the smallest spec fits but no uniform spec does")


def _sample(
    layout: ModelLayout,
    budget: Budget,
    profile: MemoryProfile,
    limit: float,
    rng: np.random.Generator,
    vocab: Width | None = None,
) -> SubnetSpec:
    """A random per-layer configuration that fits: the paper's draw, by rejection sampling.

    Every layer draws its head groups from ``1..G`` and its FFN width from the
    grid, uniformly; a draw that fits is kept, one that does not is drawn
    again, up to :data:`SAMPLE_DRAWS` times, so every configuration within the
    budget is equally likely. When none of those draws fits (a budget far
    below the full model), each layer draws within the widest uniform
    configuration that fits (:func:`_largest`), which always fits since cost
    grows with every width.
    """
    grid = _ffn_grid(layout)
    # Layers that share a relative position bias share one head width: draw
    # it once per group (tie[i] is the layer whose draw layer i takes).
    tie = np.arange(layout.num_layers)
    for group in layout.head_ties:
        tie[list(group)] = group[0]

    def draw(max_heads: int, max_ffn: int) -> SubnetSpec:
        heads = rng.integers(1, max_heads + 1, size=layout.num_layers)[tie]
        ffn = rng.integers(0, max_ffn, size=layout.num_layers)  # indices into grid
        return SubnetSpec(
            tuple(LayerSpec(int(h), grid[int(f)]) for h, f in zip(heads, ffn, strict=True)),
            vocab,
        )

    for _ in range(SAMPLE_DRAWS):
        spec = draw(layout.num_groups, len(grid))
        if _fits(budget, layout, spec, profile, limit):
            return spec
    box = _largest(layout, budget, profile, limit, vocab).layers[0]
    return draw(box.heads, grid.index(box.ffn) + 1)


def select_subnet(
    model: PreTrainedModel | ModelLayout,
    budget: Budget | str,
    mode: str = LARGEST,
    seed: int | None = None,
    profile: MemoryProfile | None = None,
    vocab: Width | None = None,
) -> SubnetSpec:
    """Choose a prefix sub-network that satisfies ``budget``.

    Parameters
    ----------
    model : PreTrainedModel or ModelLayout
        The full (prioritized) model, or its layout.
    budget : Budget or str
        A :class:`Budget` or its string form (``"params=0.6"``).
    mode : {"largest", "sample"}
        ``"largest"`` is deterministic: the widest uniform configuration that
        fits. ``"sample"`` is the paper's random draw among per-layer
        configurations that fit; it uses its own generator seeded by ``seed``
        and never touches global random state.
    seed : int, optional
        Seed for ``"sample"``; with ``None`` the draw is not reproducible.
    profile : TrainingProfile or InferenceProfile, optional
        What a ``memory-mb`` budget is checked against: a training step
        (:class:`TrainingProfile`, the default) or, for deployment, a forward
        pass (:class:`~raffm_core.InferenceProfile`).
    vocab : int or tuple of int, optional
        The token-embedding rows the node needs (its data's token ids,
        :attr:`SubnetSpec.vocab`); the spec keeps exactly those, and the
        budget they leave goes to heads and FFN neurons. ``None``: the
        whole vocabulary.

    Returns
    -------
    SubnetSpec

    Raises
    ------
    BudgetTooSmallError
        If even the smallest sub-network (one head group and the smallest FFN
        step per layer) does not fit; the message names its cost.
    BudgetError
        For an unknown mode or an unparsable budget.
    """
    if mode not in MODES:
        raise BudgetError(f"unknown selection mode {mode!r}; expected one of {', '.join(MODES)}")
    layout = model if isinstance(model, ModelLayout) else describe(model)
    budget = Budget.parse(budget) if isinstance(budget, str) else budget
    profile = profile or TrainingProfile()
    limit = budget.limit(layout)
    smallest = _smallest(layout, vocab)
    minimum = budget.cost(layout, smallest, profile)
    if minimum > limit:
        unit = "parameters" if budget.kind == "params" else "MB"
        fraction = (
            f" ({minimum / layout.total_params:.3f} of the full model)"
            if budget.kind == "params"
            else ""
        )
        raise BudgetTooSmallError(
            f"budget {budget} is below the smallest sub-network, which needs "
            f"{minimum:,.0f} {unit}{fraction}",
            minimum=minimum,
        )
    if mode == LARGEST:
        return _largest(layout, budget, profile, limit, vocab)
    return _sample(layout, budget, profile, limit, np.random.default_rng(seed), vocab)


def check_budgets(
    model: PreTrainedModel | ModelLayout,
    budgets: list[str] | tuple[str, ...],
    profile: MemoryProfile | None = None,
    vocab: Width | None = None,
) -> list[Budget]:
    """Parse a budget profile and check that at least one budget can train.

    A budget below the smallest sub-network only skips the nodes that have
    it; when every budget is, no node could ever train, which is an error.

    Parameters
    ----------
    model : PreTrainedModel or ModelLayout
    budgets : sequence of str
        Budget strings, e.g. ``RunConfig.budget_tiers``.
    profile : TrainingProfile or InferenceProfile, optional
        As in :func:`select_subnet`.
    vocab : int or tuple of int, optional
        As in :func:`select_subnet`. Before nodes have reported their
        tokens, ``1`` (a single row) checks the least any node could need.

    Returns
    -------
    list of Budget
        The parsed budgets, in order.

    Raises
    ------
    BudgetError
        If a budget cannot be parsed (the message names it), or the list is empty.
    BudgetTooSmallError
        If every budget is below the smallest sub-network; the message lists
        the budgets and the smallest sub-network's cost.
    """
    if not budgets:
        raise BudgetError("no budgets given; expected e.g. 'params=0.6,params=1.0'")
    layout = model if isinstance(model, ModelLayout) else describe(model)
    parsed = [Budget.parse(b) for b in budgets]
    too_small: list[BudgetTooSmallError] = []
    for budget in parsed:
        try:
            select_subnet(layout, budget, LARGEST, profile=profile, vocab=vocab)
        except BudgetTooSmallError as err:
            too_small.append(err)
    if len(too_small) == len(parsed):
        shown = ", ".join(str(b) for b in parsed)
        reason = str(too_small[0]).split(", which needs ", 1)[-1]
        raise BudgetTooSmallError(
            f"every budget ({shown}) is below the smallest sub-network, which needs {reason}; "
            "no node could train",
            minimum=too_small[0].minimum,
        )
    return parsed
