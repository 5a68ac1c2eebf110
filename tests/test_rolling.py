"""FedRolex rolling windows."""

from __future__ import annotations

import pytest

import raffm_core as R
from raffm_core.rolling import rolling_spec, rolling_tail_spec
from raffm_core.spec import width_count
from tests.models import tiny_model


@pytest.fixture(scope="module")
def layout():
    return R.describe(tiny_model("bert"))  # 4 head groups, 40 FFN neurons


def test_round_zero_is_the_prefix_and_widths_are_kept(layout):
    widths = R.SubnetSpec.uniform(2, 2, 15)
    assert rolling_spec(layout, widths, 0) == widths
    for t in range(12):
        spec = rolling_spec(layout, widths, t)
        for layer in spec.layers:
            assert width_count(layer.heads) == 2
            assert width_count(layer.ffn) == 15


def test_windows_advance_one_unit_per_round_and_cover_every_unit(layout):
    # FedRolex's reference code: the window of every axis moves by one unit a round.
    widths = R.SubnetSpec.uniform(2, 1, 10)
    heads, ffn = set(), set()
    for t in range(31):
        layer = rolling_spec(layout, widths, t).layers[0]
        assert _units(layer.ffn) == {(t + i) % 40 for i in range(10)}
        assert _units(layer.heads) == {t % 4}
        heads |= _units(layer.heads)
        ffn |= _units(layer.ffn)
    assert heads == set(range(4))
    assert ffn == set(range(40))
    assert rolling_spec(layout, widths, 3).layers[0].heads == (3,)
    assert rolling_spec(layout, R.SubnetSpec.uniform(2, 2, 10), 3).layers[0].heads == (0, 3)


def test_full_width_does_not_roll(layout):
    assert rolling_spec(layout, layout.full_spec(), 5) == layout.full_spec()


def test_rolling_an_index_set_is_an_error(layout):
    with pytest.raises(R.SpecError, match="prefix widths"):
        rolling_spec(layout, R.SubnetSpec.uniform(2, [1, 2], 10), 1)


def _units(width) -> set[int]:
    return set(range(width)) if isinstance(width, int) else set(width)


def test_rolling_tail_keeps_the_salient_core_and_rolls_the_rest_over_all_units(layout):
    """Tail 0.5 of 20 of 40 FFN neurons: units 0..9 always, 10 more rolling over 10..39."""
    widths = R.SubnetSpec.uniform(2, 2, 20)
    seen = set()
    for t in range(12):
        layer = rolling_tail_spec(layout, widths, t, 0.5).layers[0]
        ffn = _units(layer.ffn)
        assert len(ffn) == 20 and set(range(10)) <= ffn
        assert _units(layer.heads) >= {0} and len(_units(layer.heads)) == 2
        seen |= ffn
    assert seen == set(range(40))
    # round t's window starts t * (40 // 4) = 10 t positions into the 30 tail units
    assert rolling_tail_spec(layout, widths, 1, 0.5).layers[0].ffn == tuple(range(10)) + tuple(
        range(20, 30)
    )


def test_rolling_tail_zero_is_the_prefix_and_one_unit_stays_the_most_salient(layout):
    widths = R.SubnetSpec.uniform(2, 1, 15)
    assert rolling_tail_spec(layout, widths, 7, 0.0) == widths
    assert rolling_tail_spec(layout, widths, 7, 0.9).layers[0].heads == 1  # the core is >= 1
    assert rolling_tail_spec(layout, layout.full_spec(), 3, 0.5) == layout.full_spec()
    with pytest.raises(R.SpecError, match="tail"):
        rolling_tail_spec(layout, widths, 1, 1.0)
