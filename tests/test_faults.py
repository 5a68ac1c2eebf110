"""Faults over whole runs of the strategy (``RaFFM.start``, Flower's own loop).

A :class:`~tests.fakes.FakeGrid` plays the SuperLink: it can make a node
vanish in the middle of a round (the SuperLink then answers for it with an
error reply and drops it from the registered nodes), hold a straggler's reply
back past the round and deliver it during the next one, or have a client send
a broken reply. Each faulty run is compared bit for bit with a run in which
the faulty node sent nothing.
"""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType

from raffm_core.task.keys import CONFIG, SERVER_ROUND
from tests.fakes import (
    DELTAS,
    NODES,
    WEIGHTS,
    FakeGrid,
    budget_reply,
    make_strategy,
    train_reply,
)

ROUNDS = 3
FAULTY = 303

pytestmark = pytest.mark.usefixtures("flower_task")


class FaultyGrid(FakeGrid):
    """Good replies from every node, except ``FAULTY``, whose replies are ``fault(round)``.

    ``fault(server_round)`` names a :data:`tests.fakes.REPLY_KINDS` kind, or
    ``"vanish"`` (the node dies during that round: the SuperLink answers with
    an error and the node is gone from then on), or ``"late"`` (the reply
    arrives only while the next round is collected).
    """

    def __init__(self, fault=lambda server_round: "good", num_examples=None) -> None:
        super().__init__(NODES, self._respond)
        self.fault = fault
        self.num_examples = num_examples or WEIGHTS
        self.held_back: list[Message] = []
        self.train_rounds: list[list[int]] = []

    def _respond(self, message: Message) -> Message | None:
        node = message.metadata.dst_node_id
        if message.metadata.message_type == MessageType.QUERY:
            budget, partition = NODES[node]
            return budget_reply(message, budget, partition)
        server_round = message.content[CONFIG][SERVER_ROUND]
        kind = self.fault(server_round) if node == FAULTY else "good"
        if kind == "vanish":
            self.node_ids.remove(node)
            kind = "superlink-error"
        reply = train_reply(
            message,
            "good" if kind == "late" else kind,
            delta=DELTAS[node] * server_round,
            num_examples=self.num_examples[node],
        )
        if kind == "late":
            self.held_back.append(reply)
            return None
        return reply

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        train = [m for m in messages if m.metadata.message_type == MessageType.TRAIN]
        late = []
        if train:  # a late reply shows up while the next round's replies are collected
            late, self.held_back = self.held_back, []
            self.train_rounds.append(sorted(m.metadata.dst_node_id for m in train))
        return late + super().send_and_receive(messages, timeout=timeout)


def run(model, grid: FakeGrid, rounds: int = ROUNDS, **options):
    """``RaFFM.start`` for ``rounds`` rounds; returns the strategy and the final global model."""
    options.setdefault("min_available_nodes", 2)  # a node may vanish mid-run
    strategy = make_strategy(model, **options)
    initial = ArrayRecord(model.state_dict())
    result = strategy.start(grid, initial, rounds, 10.0, ConfigRecord({"lr": 0.1}))
    arrays = result.arrays if len(result.arrays) else initial
    return strategy, dict(arrays.to_torch_state_dict())


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def differs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


def rejections(caplog, node: int) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.getMessage().startswith(f"reply from node {node} rejected")
    ]


def silent_in(rounds):
    """The faulty node sends nothing in ``rounds``, good replies otherwise."""
    return lambda server_round: "timeout" if server_round in rounds else "good"


@pytest.mark.parametrize(
    "kind",
    [
        "nan",
        "inf",
        "wrong-shape",
        "missing-key",
        "extra-key",
        "bad-num-examples",  # 0
        "float-num-examples",  # 10.0, not an int
        "negative-num-examples",  # -5 in every round
    ],
)
def test_a_bad_reply_leaves_the_model_as_if_the_node_sent_nothing(model, flwr_logs, kind):
    if kind == "negative-num-examples":
        grid = FaultyGrid(num_examples={**WEIGHTS, FAULTY: -5})
        bad_rounds = set(range(1, ROUNDS + 1))
    else:
        grid = FaultyGrid(lambda server_round: kind if server_round == 2 else "good")
        bad_rounds = {2}
    _, faulty = run(model, grid)
    lines = rejections(flwr_logs, FAULTY)
    assert len(lines) == len(bad_rounds), lines  # one line per bad reply, naming the node
    _, silent = run(model, FaultyGrid(silent_in(bad_rounds)))
    assert_identical(faulty, silent)
    _, clean = run(model, FaultyGrid())
    assert differs(faulty, clean)  # the faulty node's good replies do count


def test_a_node_killed_during_a_round_is_dropped_and_the_run_carries_on(model, flwr_logs):
    grid = FaultyGrid(lambda server_round: "vanish" if server_round == 2 else "good")
    strategy, faulty = run(model, grid)
    assert grid.train_rounds == [[101, 202, 303], [101, 202, 303], [101, 202]]
    assert [e.num_accepted for e in strategy.history.values()] == [3, 2, 2]
    (line,) = rejections(flwr_logs, FAULTY)
    assert "error reply" in line
    # as if it had sent nothing in rounds 2 and 3
    _, silent = run(model, FaultyGrid(silent_in({2, 3})))
    assert_identical(faulty, silent)


def test_too_few_survivors_keep_the_previous_model_then_rounds_go_on(model, flwr_logs):
    grid = FaultyGrid(lambda server_round: "vanish" if server_round == 2 else "good")
    strategy, faulty = run(model, grid, min_replies=3)
    assert [e.kept_previous for e in strategy.history.values()] == [False, True, True]
    assert len(strategy.history[3].clients) == 2  # round 3 still ran, without the dead node
    _, after_one = run(model, FaultyGrid(), rounds=1)
    assert_identical(faulty, after_one)


def test_a_straggler_is_dropped_and_its_late_reply_never_applied(model, flwr_logs):
    grid = FaultyGrid(lambda server_round: "late" if server_round == 1 else "good")
    _, faulty = run(model, grid)
    lines = rejections(flwr_logs, FAULTY)
    assert len(lines) == 2, lines
    assert "no reply within the timeout" in lines[0]
    assert "answers no instruction of this round" in lines[1]
    _, silent = run(model, FaultyGrid(silent_in({1})))
    assert_identical(faulty, silent)


def test_num_examples_above_the_cap_are_capped_and_logged(model, flwr_logs):
    boastful = {**WEIGHTS, FAULTY: 1_000_000}
    _, capped = run(model, FaultyGrid(num_examples=boastful), max_num_examples=60)
    lines = [r.getMessage() for r in flwr_logs.records if "capped" in r.getMessage()]
    assert len(lines) == ROUNDS
    assert all(
        f"node {FAULTY}" in x and "1000000 capped to max-num-examples = 60" in x for x in lines
    )
    _, honest = run(model, FaultyGrid(num_examples={**WEIGHTS, FAULTY: 60}))
    assert_identical(capped, honest)
    _, uncapped = run(model, FaultyGrid(num_examples=boastful))
    assert differs(capped, uncapped)
