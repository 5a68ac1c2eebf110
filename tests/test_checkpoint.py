"""Checkpoint after every round, and resume: a run killed after round 2 of 4 ends where an
uninterrupted one does.

The ServerApp's ``run`` drives a grid whose three nodes are the real ClientApp,
called in-process (deterministic: fixed local steps, no mixed precision, one
thread). FedAdam is the server update, so its moments must survive the
interruption for the final models to agree.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, RecordDict

from client_app.app import build_client_app
from raffm_core import LayerSpec, ServerOptimizer, SubnetSpec
from raffm_core.task.config import RunConfig
from server_app import checkpoint as ckpt
from server_app.app import run
from server_app.records import ClientRound, RoundLog
from tests.assets import tiny_bert_task
from tests.fakes import FakeGrid

# Node ids only: the real ClientApp answers, its budget from budget-profile, partition = index.
NODES = (101, 102, 103)
ROUNDS = 4

pytestmark = pytest.mark.usefixtures("flower_task")


class Killed(Exception):
    """Stands for the ServerApp process being killed."""


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return tiny_bert_task(tmp_path_factory.mktemp("checkpoint"), 120)


def run_config(assets, results, **overrides) -> RunConfig:
    values = {
        **assets,
        "results-dir": str(results),
        "min-available-nodes": len(NODES),
        "min-replies": len(NODES),
        "num-server-rounds": ROUNDS,
        "budget-profile": "params=0.5,params=0.75,params=1.0",
        "partitioner": "iid",
        "max-length": 16,
        "local-steps": 2,
        "batch-size": 8,
        "lr": 1e-3,
        "mixed-precision": "no",
        "client-threads": 1,
        "server-update": "fedadam",
        "server-lr": 0.01,
        "save-models": False,
        "query-timeout-s": 5.0,
        **overrides,
    }
    return RunConfig.from_mapping({}, values)


def client_grid(cfg: RunConfig, kill_at_round: int | None = None) -> FakeGrid:
    """The real ClientApp behind each node; raises Killed when round ``kill_at_round`` starts."""
    app = build_client_app(cfg.to_mapping())

    def respond(message: Message) -> Message | None:
        node = message.metadata.dst_node_id
        config = message.content.config_records.get("config")
        if kill_at_round is not None and config and config.get("server-round") == kill_at_round:
            raise Killed(f"killed at the start of round {kill_at_round}")
        context = Context(
            run_id=7,
            node_id=node,
            node_config={"partition-id": NODES.index(node), "num-partitions": len(NODES)},
            state=RecordDict(),
            run_config={},
        )
        return app(message, context)

    return FakeGrid(NODES, respond)


def final_arrays(results) -> tuple[int, dict[str, torch.Tensor]]:
    saved = ckpt.load_checkpoint(results / ckpt.CHECKPOINT_FILE)
    return saved.server_round, saved.arrays


def test_killed_after_round_2_of_4_and_resumed_equals_the_uninterrupted_run(assets, tmp_path):
    straight = run_config(assets, tmp_path / "straight")
    run(client_grid(straight), straight)
    done, expected = final_arrays(tmp_path / "straight")
    assert done == ROUNDS

    killed = run_config(assets, tmp_path / "killed")
    with pytest.raises(Killed):
        run(client_grid(killed, kill_at_round=3), killed)
    done, after_two = final_arrays(tmp_path / "killed")
    assert done == 2
    assert not list((tmp_path / "killed").glob(".*.tmp"))  # no temporary file left behind

    resumed = run_config(assets, tmp_path / "killed", resume=True)
    summary = run(client_grid(resumed), resumed)
    done, got = final_arrays(tmp_path / "killed")
    assert done == ROUNDS
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-7, msg=key)
    # the interrupted run really did move the model, and FedAdam's moments mattered
    assert any(not torch.equal(after_two[k], expected[k]) for k in expected)

    rounds = json.loads((tmp_path / "killed" / "rounds.json").read_text())
    assert [r["round"] for r in rounds] == list(range(ROUNDS + 1))
    assert all(r["clients-accepted"] == len(NODES) for r in rounds[1:])
    straight_rounds = json.loads((tmp_path / "straight" / "rounds.json").read_text())
    for a, b in zip(rounds, straight_rounds, strict=True):
        assert a["accuracy"] == pytest.approx(b["accuracy"]) and a["loss"] == pytest.approx(
            b["loss"], rel=1e-5
        )
    assert summary["rounds"] == ROUNDS


def test_resume_without_a_checkpoint_names_the_path(assets, tmp_path):
    cfg = run_config(assets, tmp_path / "empty", resume=True)
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint at .*checkpoint.pt"):
        run(client_grid(cfg), cfg)


# ------------------------------------------------------------------ the file
def sample_checkpoint(server_round: int = 3) -> ckpt.Checkpoint:
    gen = torch.Generator().manual_seed(server_round)
    arrays = {"a.weight": torch.randn(4, 3, generator=gen), "a.bias": torch.randn(4, generator=gen)}
    optimizer = ServerOptimizer("fedadam")
    optimizer.m = {k: v * 0.1 for k, v in arrays.items()}
    optimizer.v = {k: v * v for k, v in arrays.items()}
    optimizer.step_count = server_round
    spec = SubnetSpec((LayerSpec(2, 8), LayerSpec((0, 2), (1, 5, 7))))
    client = ClientRound(7, 0, "params=0.5", spec, 100, 0.5, 400, 400, "accepted", "", {"x": 1.0})
    history = {r: RoundLog(r, 0.0, [client], False, 1.5, {"train-loss": 0.4}) for r in (1, 2, 3)}
    return ckpt.Checkpoint(
        server_round=server_round,
        arrays=arrays,
        optimizer=optimizer.state_dict(),
        rng=ckpt.capture_rng(),
        fingerprint={"seed": 1, "lr": 0.1},
        history=history,
        central={r: {"accuracy": 0.5 + r / 10} for r in range(server_round + 1)},
        best_round=1,
        best_score=0.6,
        best_arrays={k: v + 1 for k, v in arrays.items()},
    )


def test_save_load_round_trip_is_exact(tmp_path):
    original = sample_checkpoint()
    path = tmp_path / "ckpt" / ckpt.CHECKPOINT_FILE
    ckpt.save_checkpoint(path, original)
    loaded = ckpt.load_checkpoint(path)
    assert loaded.server_round == 3 and loaded.fingerprint == original.fingerprint
    for got, want in [
        (loaded.arrays, original.arrays),
        (loaded.best_arrays, original.best_arrays),
        (loaded.optimizer["m"], original.optimizer["m"]),
        (loaded.optimizer["v"], original.optimizer["v"]),
    ]:
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert loaded.optimizer["step_count"] == 3
    assert {r: e.to_dict() for r, e in loaded.history.items()} == {
        r: e.to_dict() for r, e in original.history.items()
    }
    assert loaded.central == original.central
    assert (loaded.best_round, loaded.best_score) == (1, 0.6)


def test_a_round_with_an_excluded_node_round_trips(tmp_path):
    """``clients-excluded`` of a resumed run must count the rounds before the interruption."""
    original = sample_checkpoint()
    original.history[2].excluded = {9: "budget params=0.3 is below the smallest sub-network"}
    path = tmp_path / ckpt.CHECKPOINT_FILE
    ckpt.save_checkpoint(path, original)
    loaded = ckpt.load_checkpoint(path).history[2]
    assert loaded.excluded == {9: "budget params=0.3 is below the smallest sub-network"}
    assert loaded.to_dict()["clients-excluded"] == [
        {"node": 9, "reason": "budget params=0.3 is below the smallest sub-network"}
    ]
    assert loaded.clients[0].metrics == {"x": 1.0}
    assert loaded.clients[0].spec == original.history[2].clients[0].spec


def test_rng_state_is_restored():
    state = ckpt.capture_rng()
    expected = (torch.rand(3), np.random.rand(3), __import__("random").random())
    torch.rand(5), np.random.rand(5)
    ckpt.restore_rng(state)
    got = (torch.rand(3), np.random.rand(3), __import__("random").random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
    assert got[2] == expected[2]


def test_a_crash_while_writing_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / ckpt.CHECKPOINT_FILE
    ckpt.save_checkpoint(path, sample_checkpoint(2))
    before = path.read_bytes()

    def torn_write(data, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", torn_write)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(path, sample_checkpoint(3))
    assert path.read_bytes() == before
    assert ckpt.load_checkpoint(path).server_round == 2
    assert os.listdir(tmp_path) == [ckpt.CHECKPOINT_FILE]


def test_a_torn_file_is_reported_with_its_path(tmp_path):
    path = tmp_path / ckpt.CHECKPOINT_FILE
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ckpt.CheckpointError, match="cannot read checkpoint .*checkpoint.pt"):
        ckpt.load_checkpoint(path)


def test_resume_with_another_configuration_names_the_keys(assets, tmp_path):
    cfg = run_config(assets, tmp_path)
    saved = ckpt.fingerprint(cfg)
    ckpt.check_fingerprint(
        saved, run_config(assets, tmp_path / "x", **{"num-server-rounds": 9}), tmp_path
    )
    with pytest.raises(ckpt.CheckpointError, match=r"lr: 0\.001 then, 0\.01 now.*seed"):
        ckpt.check_fingerprint(saved, run_config(assets, tmp_path, lr=0.01, seed=1), tmp_path)
