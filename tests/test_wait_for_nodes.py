"""server_app.nodes.wait_for_nodes: a count of nodes, or (0) those registered once it settles."""

from __future__ import annotations

import pytest

import server_app.nodes as nodes


class ArrivingGrid:
    """A grid whose ``get_node_ids`` gives ``counts[i]`` nodes at call i (then the last count)."""

    def __init__(self, counts: list[int]) -> None:
        self.counts, self.calls = counts, 0

    def get_node_ids(self) -> list[int]:
        count = self.counts[min(self.calls, len(self.counts) - 1)]
        self.calls += 1
        return list(range(100, 100 + count))


@pytest.fixture(autouse=True)
def fast_polls(monkeypatch):
    monkeypatch.setattr(nodes, "POLL_S", 0.01)


@pytest.mark.parametrize(
    "counts, minimum, expected",
    [
        ([0, 1, 2, 3, 4], 3, 3),  # stops at the first poll that sees enough
        ([0, 0, 1, 2, 2], 0, 2),  # 0: whatever registered once no new one came
        ([5], 0, 5),
        ([2], 2, 2),
    ],
    ids=["count-reached", "settled", "all-at-once", "already-there"],
)
def test_the_wait_ends_with_the_nodes_registered(counts, minimum, expected):
    grid = ArrivingGrid(counts)
    assert nodes.wait_for_nodes(grid, minimum, timeout=5.0, settle=0.05) == expected


def test_settling_waits_for_a_quiet_spell_not_just_a_first_node():
    grid = ArrivingGrid([1, 1, 2, 3])  # three polls of 10 ms: the first node does not settle it
    assert nodes.wait_for_nodes(grid, 0, timeout=5.0, settle=0.05) == 3


def test_settling_is_logged_with_the_count(flwr_logs):
    nodes.wait_for_nodes(ArrivingGrid([2]), 0, timeout=5.0, settle=0.01)
    assert "2 nodes registered (min-available-nodes = 0" in flwr_logs.text


def test_nodes_still_arriving_at_the_deadline_are_taken_as_they_are():
    grid = ArrivingGrid(list(range(1, 10_000)))  # a new node at every poll
    assert 1 <= nodes.wait_for_nodes(grid, 0, timeout=0.1, settle=60.0) < 10_000


@pytest.mark.parametrize(
    "counts, minimum, message",
    [
        ([0], 0, "no node registered within 0 s"),
        ([2], 5, "only 2 of min-available-nodes=5 nodes registered within 0 s"),
    ],
    ids=["none", "too-few"],
)
def test_too_few_nodes_by_the_deadline_is_an_error_that_counts_them(counts, minimum, message):
    with pytest.raises(RuntimeError, match=message):
        nodes.wait_for_nodes(ArrivingGrid(counts), minimum, timeout=0.1, settle=0.01)


def test_a_negative_minimum_is_refused():
    with pytest.raises(ValueError, match="min-available-nodes must be >= 0, got -1"):
        nodes.wait_for_nodes(ArrivingGrid([3]), -1, timeout=1.0)
