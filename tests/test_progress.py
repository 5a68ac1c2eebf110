"""server_app.progress: a round that waits logs its replies as they arrive (issue 12)."""

from __future__ import annotations

import uuid

import pytest
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from server_app.progress import ProgressGrid

pytestmark = pytest.mark.usefixtures("flower_task")


class TrickleGrid:
    """push/pull like Flower's Grids; pull ``k`` hands out the replies of batch ``k``."""

    def __init__(self, batches: list[list[int]]) -> None:
        self.batches = batches
        self.pulls = 0
        self.sent: dict[int, Message] = {}

    def push_messages(self, messages):
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            self.sent[message.metadata.dst_node_id] = message
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        batch = self.batches[self.pulls] if self.pulls < len(self.batches) else []
        self.pulls += 1
        return [Message(RecordDict(), reply_to=self.sent[n]) for n in batch]

    def get_node_ids(self):
        return list(self.sent)


def instructions(kind: str, nodes=(1, 2, 3)) -> list[Message]:
    content = RecordDict({"config": ConfigRecord({"server-round": 2})})
    return [Message(content, dst_node_id=n, message_type=kind) for n in nodes]


def test_replies_are_counted_as_they_arrive(flwr_logs):
    grid = ProgressGrid(TrickleGrid([[2], [], [1, 3]]), poll_s=0.0)
    replies = grid.send_and_receive(instructions(MessageType.TRAIN), timeout=10)
    assert sorted(r.metadata.src_node_id for r in replies) == [1, 2, 3]
    lines = [r.getMessage() for r in flwr_logs.records if "replies" in r.getMessage()]
    assert lines == ["round 2: 1 of 3 train replies", "round 2: 3 of 3 train replies"]


def test_a_timeout_returns_the_replies_so_far(flwr_logs):
    grid = ProgressGrid(TrickleGrid([[1]]), poll_s=0.01)
    replies = grid.send_and_receive(instructions(MessageType.EVALUATE), timeout=0.1)
    assert [r.metadata.src_node_id for r in replies] == [1]
    assert "round 2: 1 of 3 evaluate replies" in flwr_logs.text


def test_other_attributes_are_the_grids():
    inner = TrickleGrid([])
    assert ProgressGrid(inner).get_node_ids() == []


def test_a_new_head_is_one_line_not_transformers_load_report(tmp_path, caplog, capfd):
    import logging

    import transformers as T

    from raffm_core.task.data import TaskInfo
    from raffm_core.task.models import load_model
    from tests.assets import save_tiny_bert

    saved = save_tiny_bert(tmp_path / "clf")
    config = T.AutoConfig.from_pretrained(saved)
    T.BertModel(config).save_pretrained(tmp_path / "base")  # no head, as MiniLM ships
    with caplog.at_level(logging.INFO, logger="raffm_core.task.pretrained"):
        load_model(str(tmp_path / "base"), TaskInfo("classification", ("a", "b", "c")))
    captured = capfd.readouterr()
    assert "LOAD REPORT" not in captured.err + captured.out + caplog.text
    assert "new task head classifier.bias, classifier.weight (seeded)" in caplog.text


def test_arrivals_note_when_each_reply_came_and_are_cleared_per_send():
    arrivals: dict[str, float] = {"stale": 9.0}
    grid = ProgressGrid(TrickleGrid([[2], [], [1, 3]]), poll_s=0.02, arrivals=arrivals)
    sent = instructions(MessageType.TRAIN)
    grid.send_and_receive(sent, timeout=10)
    by_node = {m.metadata.dst_node_id: arrivals[m.metadata.message_id] for m in sent}
    assert set(arrivals) == {m.metadata.message_id for m in sent}  # "stale" is gone
    assert 0 <= by_node[2] < by_node[1] == by_node[3]  # node 2 answered two polls earlier
    assert by_node[1] - by_node[2] >= 0.04
