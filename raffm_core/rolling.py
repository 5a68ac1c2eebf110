"""Rolling sub-model windows, as in FedRolex (Alam et al., NeurIPS 2022).

FedRolex keeps, in round ``t``, the window of units
``{t*step mod K, ..., (t*step + w - 1) mod K}`` of each layer's axis of ``K``
units, so that over the rounds every unit gets trained even by narrow
clients. Here the window widths come from a prefix :class:`SubnetSpec` (what
the client's budget allows) and the windows are explicit index sets.

:func:`rolling_tail_spec` is RaFFM's variant for a prioritized model: the most
salient units stay in every sub-model and only the rest of the width rolls.
"""

from __future__ import annotations

from .errors import SpecError
from .layout import ModelLayout
from .spec import LayerSpec, SubnetSpec, Width, width_count


def _window(width: Width, size: int, start: int, core: int = 0) -> Width:
    """Positions ``0..core-1``, then ``width - core`` rolling over ``core..size-1``."""
    if not isinstance(width, int):
        raise SpecError("rolling windows start from prefix widths, got an index set")
    if width >= size:
        return size
    window = sorted(core + (start + i) % (size - core) for i in range(width - core))
    return tuple(range(core)) + tuple(window)


def _roll(
    layout: ModelLayout,
    widths: SubnetSpec,
    server_round: int,
    step: int,
    tail: float = 1.0,
    ffn_step: int | None = None,
) -> SubnetSpec:
    layout.check_spec(widths)
    if server_round < 0 or step < 1:
        raise SpecError(f"need server_round >= 0 and step >= 1, got {server_round}, {step}")
    if ffn_step is None:  # both axes roll once around in the same number of rounds
        ffn_step = max(1, step * layout.ffn_size // layout.num_groups)

    def core(width: Width) -> int:  # 0 for FedRolex (tail 1): the whole width rolls
        return 0 if tail >= 1.0 else max(1, round((1.0 - tail) * width_count(width)))

    layers = tuple(
        LayerSpec(
            heads=_window(w.heads, layout.num_groups, server_round * step, core(w.heads)),
            ffn=_window(w.ffn, layout.ffn_size, server_round * ffn_step, core(w.ffn)),
        )
        for w in widths.layers
    )
    return SubnetSpec(layers, widths.vocab)


def rolling_spec(
    layout: ModelLayout, widths: SubnetSpec, server_round: int, step: int = 1
) -> SubnetSpec:
    """The FedRolex window of ``widths`` for ``server_round``.

    Parameters
    ----------
    layout : ModelLayout
        The full model's layout.
    widths : SubnetSpec
        Prefix widths per layer (e.g. from :func:`raffm_core.select_subnet`).
    server_round : int
        Round number ``t >= 0``; the window starts ``t * step`` units in.
    step : int
        Units the window advances per round, on both axes: ``step`` head
        groups and ``step`` FFN neurons. FedRolex's reference implementation
        rolls one unit per round per layer (1).
    """
    return _roll(layout, widths, server_round, step, ffn_step=step)


def rolling_tail_spec(
    layout: ModelLayout, widths: SubnetSpec, server_round: int, tail: float, step: int = 1
) -> SubnetSpec:
    """A salient core plus a rolling tail, for a prioritized model.

    Of a layer's ``w`` units along an axis of ``K``, the first
    ``c = max(1, round((1 - tail) * w))`` (the most salient, once the model is
    prioritized) are always kept; the other ``w - c`` are a FedRolex window
    over positions ``c .. K-1`` that advances every round, so every unit is
    trained in turn while every sub-model keeps the units that matter most.
    ``tail = 0`` is the nested prefix ``widths`` itself.

    Parameters
    ----------
    layout : ModelLayout
        The full model's layout.
    widths : SubnetSpec
        Prefix widths per layer (e.g. from :func:`raffm_core.select_subnet`).
    server_round : int
        Round number ``t >= 0``.
    tail : float
        Share of each width that rolls, in ``[0, 1)``.
    step : int
        As :func:`rolling_spec`: positions the window advances per round.
    """
    if not 0.0 <= tail < 1.0:
        raise SpecError(f"tail must be in [0, 1), got {tail!r}")
    return _roll(layout, widths, server_round, step, tail)
