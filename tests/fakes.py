"""One factory of fake Flower replies, good and bad, and a Grid that answers with them."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from raffm_core.task.keys import (
    ARRAYS,
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

SUPERLINK_NODE_ID = 1

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
    instruction: Message, kind: str = "good", *, delta: float = 0.01, num_examples: int = 10
) -> Message | None:
    """A ClientApp's reply to a train ``instruction``, correct or broken in one way.

    A good reply adds ``delta`` to every float the node received (a stand-in
    for training, easy to trace through aggregation) and reports
    ``num_examples``. ``timeout`` stands for a reply that never comes (None).
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


def budget_reply(instruction: Message, budget: str, partition_id: int | None = None) -> Message:
    """A ClientApp's answer to the budget query."""
    record = ConfigRecord({BUDGET: budget})
    if partition_id is not None:
        record[PARTITION_ID] = partition_id
    return Message(RecordDict({CONFIG: record}), reply_to=instruction)


def evaluate_reply(instruction: Message, accuracy: float, num_examples: int) -> Message:
    return Message(
        RecordDict({METRICS: MetricRecord({NUM_EXAMPLES: num_examples, "accuracy": accuracy})}),
        reply_to=instruction,
    )


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
