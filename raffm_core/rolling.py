"""Rolling sub-model windows, as in FedRolex (Alam et al., NeurIPS 2022).

FedRolex keeps, in round ``t``, the window of units
``{t*step mod K, ..., (t*step + w - 1) mod K}`` of each layer's axis of ``K``
units, so that over the rounds every unit gets trained even by narrow
clients. Here the window widths come from a prefix :class:`SubnetSpec` (what
the client's budget allows) and the windows are explicit index sets.
"""

from __future__ import annotations

from .errors import SpecError
from .layout import ModelLayout
from .spec import LayerSpec, SubnetSpec, Width


def _window(width: Width, size: int, start: int) -> Width:
    if not isinstance(width, int):
        raise SpecError("rolling windows start from prefix widths, got an index set")
    if width >= size:
        return size
    return tuple(sorted((start + i) % size for i in range(width)))


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
        Units the window advances per round (FedRolex uses 1). FFN windows
        advance ``step`` FFN neurons times the ratio of FFN size to head groups,
        so both axes roll once around in the same number of rounds.
    """
    layout.check_spec(widths)
    if server_round < 0 or step < 1:
        raise SpecError(f"need server_round >= 0 and step >= 1, got {server_round}, {step}")
    ffn_step = max(1, step * layout.ffn_size // layout.num_groups)
    layers = tuple(
        LayerSpec(
            heads=_window(w.heads, layout.num_groups, server_round * step),
            ffn=_window(w.ffn, layout.ffn_size, server_round * ffn_step),
        )
        for w in widths.layers
    )
    return SubnetSpec(layers)
