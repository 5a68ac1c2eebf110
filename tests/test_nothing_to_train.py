"""A run in which no node can train fails with one line saying why (issue 12).

Before, each of these runs ended ``finished:completed`` with the untouched
model. The ServerApp runs in-process against a Grid stand-in whose nodes are
the real ClientApp (as in ``tests/test_checkpoint.py``); each failed run
leaves ``status.json`` with the error in its results directory.
"""

from __future__ import annotations

import json

import pytest
from flwr.app import Context, Message, MessageType, RecordDict

from client_app.app import build_client_app
from raffm_core.task.config import RunConfig
from server_app.app import run
from server_app.loop import NothingToTrain
from tests.assets import save_tiny_bert, write_polarity_csv
from tests.fakes import FakeGrid, train_reply

NODES = (101, 102, 103)

pytestmark = pytest.mark.usefixtures("flower_task")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(save_tiny_bert(tmp_path_factory.mktemp("nothing") / "model"))


def run_config(model_dir, tmp_path, rows=60, **overrides) -> RunConfig:
    """A 3-node run of the tiny BERT on a ``rows``-row polarity CSV."""
    values = {
        "model-name": model_dir,
        "dataset": str(write_polarity_csv(tmp_path / "d.csv", rows)),
        "results-dir": str(tmp_path / "results"),
        "min-available-nodes": len(NODES),
        "num-server-rounds": 2,
        "budget-profile": "params=0.5,params=1.0",
        "partitioner": "iid",
        "max-length": 16,
        "local-steps": 1,
        "batch-size": 8,
        "mixed-precision": "no",
        "save-models": False,
        "query-timeout-s": 5.0,
        **overrides,
    }
    return RunConfig.from_mapping({}, values)


def client_grid(cfg: RunConfig, node_budget: str | None = None, train_fails=False) -> FakeGrid:
    app = build_client_app(cfg.to_mapping())

    def respond(message: Message) -> Message | None:
        if train_fails and message.metadata.message_type == MessageType.TRAIN:
            return train_reply(message, "error")
        node = message.metadata.dst_node_id
        node_config = {"partition-id": NODES.index(node), "num-partitions": len(NODES)}
        if node_budget is not None:
            node_config["budget"] = node_budget
        context = Context(
            run_id=7, node_id=node, node_config=node_config, state=RecordDict(), run_config={}
        )
        return app(message, context)

    return FakeGrid(NODES, respond)


@pytest.mark.parametrize(
    "overrides, grid_options, message",
    [
        ({"budget-profile": "bogus"}, {}, "budget-profile = 'bogus': cannot parse budget 'bogus'"),
        (
            {"budget-profile": "params=0.01,params=0.02"},
            {},
            r"every budget \(params=0.01, params=0.02\) is below the smallest sub-network, "
            r"which needs [0-9,]+ parameters",
        ),
        ({"rows": 3}, {}, "has 2 training examples for min-available-nodes = 3 nodes"),
        (
            {},
            {"node_budget": "params=0.01"},
            # the smallest sub-network depends on each node's vocabulary (vocab-trim),
            # so the reasons may differ in their parameter counts
            r"no node can train: all 3 nodes were skipped \([123] x budget 'params=0.01': "
            "budget params=0.01 is below the smallest sub-network",
        ),
        ({}, {"train_fails": True}, "no node trained in any of the 2 rounds: 6 replies, none"),
    ],
    ids=["unparsable-profile", "profile-too-small", "fewer-examples", "nodes-skipped", "rejected"],
)
def test_a_run_that_cannot_train_fails_and_says_why(
    model_dir, tmp_path, overrides, grid_options, message
):
    cfg = run_config(model_dir, tmp_path, **overrides)
    with pytest.raises(NothingToTrain, match=message):
        run(client_grid(cfg, **grid_options), cfg)
    status = json.loads((tmp_path / "results" / "status.json").read_text())
    assert status["status"] == "failed"
    assert status["error"].startswith("NothingToTrain: ")
    assert "\n" not in status["error"]


def test_a_run_that_trains_says_completed(model_dir, tmp_path):
    cfg = run_config(model_dir, tmp_path, **{"num-server-rounds": 1})
    run(client_grid(cfg), cfg)
    status = json.loads((tmp_path / "results" / "status.json").read_text())
    assert status == {"status": "completed"}
