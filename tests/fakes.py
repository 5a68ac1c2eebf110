"""One factory of fake Flower replies, good and bad, the scenario they play, and a Grid.

The scenario: three nodes (:data:`NODES`) with three budgets, so three
different specs; a good reply from node ``n`` adds ``DELTAS[n]`` to every
float it received and reports ``WEIGHTS[n]`` examples, so where each element
of an aggregate comes from can be traced by hand.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.supercore.task_identity import TaskIdentity

from raffm_core import base_config, describe
from raffm_core.task.keys import (
    ARRAYS,
    BASELINE_MB,
    BUDGET,
    CONFIG,
    METRICS,
    NUM_EXAMPLES,
    PARTITION_ID,
    PEAK_MEMORY_MB,
    TRAIN_LOSS,
    TRAIN_STEPS,
    TRAIN_TIME_S,
)
from server_app.strategy import RaFFM

SUPERLINK_NODE_ID = 1

NODES = {101: ("params=0.5", 0), 202: ("params=0.75", 1), 303: ("params=1.0", 2)}
"""Node id -> (budget, partition id): three sizes, so three different specs."""

WEIGHTS = {101: 10, 202: 30, 303: 60}
"""Node id -> the ``num-examples`` its good replies report."""

DELTAS = {101: 1.0, 202: 2.0, 303: 4.0}
"""Node id -> what its good replies add to every float the node received."""

REPLY_KINDS = (
    "good",
    "wrong-shape",
    "nan",
    "inf",
    "missing-key",
    "extra-key",
    "wrong-dtype",
    "error",
    "superlink-error",
    "bad-num-examples",
    "float-num-examples",
    "no-metrics",
    "no-arrays",
    "nan-metric",
    "timeout",
)
"""What :func:`train_reply` can make; every kind but ``good`` must be rejected."""


@contextmanager
def task_identity(run_id: int = 7, node_id: int = 0, task_id: int = 1) -> Iterator[None]:
    """Let ``Message(...)`` be built outside a Flower run (it reads the task's identity)."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, node_id, task_id
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def train_reply(
    instruction: Message,
    kind: str = "good",
    *,
    delta: float = 0.01,
    num_examples: int = 10,
    baseline_mb: float | None = None,
) -> Message | None:
    """A ClientApp's reply to a train ``instruction``, correct or broken in one way.

    A good reply adds ``delta`` to every float the node received (a stand-in
    for training, easy to trace through aggregation), reports
    ``num_examples`` and, if given, ``baseline_mb`` as ``baseline-mb``.
    ``timeout`` stands for a reply that never comes (None).
    """
    if kind not in REPLY_KINDS:
        raise ValueError(f"unknown reply kind {kind!r}; expected one of {REPLY_KINDS}")
    if kind == "timeout":
        return None
    if kind in ("error", "superlink-error"):
        reply = Message(
            Error(
                code=2,
                reason="Traceback (most recent call last):\n  ...\nValueError: out of memory",
            ),
            reply_to=instruction,
        )
        if kind == "superlink-error":  # the SuperLink answers for a vanished node
            reply.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
        return reply
    state = {
        k: v + delta if v.is_floating_point() else v.clone()
        for k, v in instruction.content[ARRAYS].to_torch_state_dict().items()
    }
    metrics = {
        NUM_EXAMPLES: num_examples,
        TRAIN_LOSS: 0.5,
        TRAIN_TIME_S: 1.5,
        TRAIN_STEPS: 3,
        PEAK_MEMORY_MB: 512.0,
    }
    if baseline_mb is not None:
        metrics[BASELINE_MB] = baseline_mb
    some_key = next(k for k, v in state.items() if v.dim() == 2)
    if kind == "wrong-shape":
        state[some_key] = state[some_key][:-1]
    elif kind == "nan":
        state[some_key][0, 0] = float("nan")
    elif kind == "inf":
        state[some_key][-1, -1] = float("inf")
    elif kind == "missing-key":
        del state[some_key]
    elif kind == "extra-key":
        state["classifier.extra.weight"] = torch.zeros(2, 2)
    elif kind == "wrong-dtype":
        state[some_key] = state[some_key].double()
    elif kind == "bad-num-examples":
        metrics[NUM_EXAMPLES] = 0
    elif kind == "float-num-examples":
        metrics[NUM_EXAMPLES] = 10.0
    elif kind == "nan-metric":
        metrics[TRAIN_LOSS] = float("nan")
    content = RecordDict()
    if kind != "no-arrays":
        content[ARRAYS] = ArrayRecord(state)
    if kind != "no-metrics":
        content[METRICS] = MetricRecord(metrics)
    return Message(content, reply_to=instruction)


def budget_reply(
    instruction: Message, budget: str, partition_id: int | None = None, baseline_mb: Any = None
) -> Message:
    """A ClientApp's answer to the budget query (``baseline_mb``: its ``baseline-mb``, if any)."""
    record = ConfigRecord({BUDGET: budget})
    if partition_id is not None:
        record[PARTITION_ID] = partition_id
    if baseline_mb is not None:
        record[BASELINE_MB] = baseline_mb
    return Message(RecordDict({CONFIG: record}), reply_to=instruction)


def evaluate_reply(instruction: Message, accuracy: float, num_examples: int) -> Message:
    return Message(
        RecordDict({METRICS: MetricRecord({NUM_EXAMPLES: num_examples, "accuracy": accuracy})}),
        reply_to=instruction,
    )


def respond_with(
    kinds: Mapping[int, str] | None = None,
    budgets: Mapping[int, tuple[Any, ...]] | None = None,
    train_baselines: Mapping[int, float] | None = None,
) -> Callable[[Message], Message | None]:
    """A :class:`FakeGrid` responder playing the scenario, with some nodes' replies broken.

    Budget queries are answered from ``budgets`` (default :data:`NODES`):
    node id -> (budget, partition id) or (budget, partition id, baseline-mb).
    A train instruction to node ``n`` gets ``train_reply(..., kinds.get(n,
    "good"))`` with ``DELTAS[n]``, ``WEIGHTS[n]`` and ``train_baselines[n]``
    (if any); an evaluate instruction gets accuracy ``n / 1000`` over
    ``WEIGHTS[n]`` examples. Nodes outside the tables train by 1.0 and
    report 20 examples.
    """
    kinds = kinds or {}
    budgets = budgets or NODES
    train_baselines = train_baselines or {}

    def respond(message: Message) -> Message | None:
        node = message.metadata.dst_node_id
        if message.metadata.message_type == MessageType.QUERY:
            return budget_reply(message, *budgets[node])
        if message.metadata.message_type == MessageType.EVALUATE:
            return evaluate_reply(message, accuracy=node / 1000, num_examples=WEIGHTS.get(node, 20))
        return train_reply(
            message,
            kinds.get(node, "good"),
            delta=DELTAS.get(node, 1.0),
            num_examples=WEIGHTS.get(node, 20),
            baseline_mb=train_baselines.get(node),
        )

    return respond


def make_strategy(model: torch.nn.Module, cls: type[RaFFM] = RaFFM, **options: Any) -> RaFFM:
    """A ``cls`` strategy over ``model``, set up for the scenario; ``options`` override.

    By default every one of the three nodes trains, one surviving reply
    completes a round, sampling is seeded and budget queries time out
    after 5 s.
    """
    settings: dict[str, Any] = dict(
        fraction_train=1.0,
        min_train_nodes=1,
        min_available_nodes=3,
        min_replies=1,
        seed=3,
        query_timeout=5.0,
    )
    settings.update(options)
    return cls(describe(model), base_config(model).to_json_string(), **settings)


class FakeGrid:
    """Stands in for a Flower ``Grid``: registered nodes, and replies made by ``respond``.

    ``respond(message)`` returns the reply, or None for one that never comes.
    Message ids are assigned on sending, as the real SuperLink does.
    """

    def __init__(
        self, node_ids: Iterable[int], respond: Callable[[Message], Message | None]
    ) -> None:
        self.node_ids = list(node_ids)
        self.respond = respond
        self.sent: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        replies = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            self.sent.append(message)
            reply = self.respond(message)
            if reply is not None:
                replies.append(reply)
        return replies
