"""The ServerApp and ClientApp together, under Flower's simulation runtime.

A tiny BERT and a WordLevel tokenizer are saved to a temporary folder, three
virtual nodes report three different budgets, and two rounds run. The global
model after each round (``save-round-models``) is checked against an
independent oracle: outside the union of the slices the accepted nodes held,
it equals the prioritized model of the round before, bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from tests.assets import tiny_bert_task
from tests.sim import TIMEOUTS, every_node, read_json, simulate
from tests.slices import assert_changed_only_inside_held_slices

NUM_NODES = 3
ROUNDS = 2


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("simulation")
    overrides = {
        **tiny_bert_task(tmp, 150),
        **every_node(NUM_NODES),
        **TIMEOUTS,
        "results-dir": str(tmp / "results"),
        "num-server-rounds": ROUNDS,
        "budget-profile": "params=0.5,params=0.65,params=0.8",
        "partitioner": "iid",
        "max-length": 16,
        "local-steps": 3,
        "batch-size": 8,
        "lr": 1e-3,
        "save-round-models": True,
        "salience-norm": "l1",  # the slice oracle re-derives an L1 order (tests/slices.py)
    }
    simulate(overrides, NUM_NODES)
    return tmp / "results"


def load_state(path) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    model = AutoModelForSequenceClassification.from_pretrained(path)
    return model, {k: v.clone() for k, v in model.state_dict().items()}


def test_clients_received_different_spec_sizes(run_dir):
    rounds = read_json(run_dir, "rounds.json")
    assert [r["round"] for r in rounds] == list(range(ROUNDS + 1))
    for row in rounds[1:]:
        clients = row["clients"]
        assert len(clients) == NUM_NODES and all(c["status"] == "accepted" for c in clients)
        assert sorted(c["budget"] for c in clients) == ["params=0.5", "params=0.65", "params=0.8"]
        assert len({c["params"] for c in clients}) == NUM_NODES
        for c in clients:
            assert c["params-fraction"] <= float(c["budget"].split("=")[1]) + 1e-9


def test_global_model_changed_only_where_some_slice_covered_it(run_dir):
    assert_changed_only_inside_held_slices(run_dir, AutoModelForSequenceClassification)


def test_metrics_and_outputs_are_present(run_dir):
    summary = read_json(run_dir, "summary.json")
    for key in (
        "final-accuracy",
        "best-accuracy",
        "rounds",
        "mean-client-params-fraction",
        "mean-bytes-per-client-round",
        "full-model-bytes",
        "wall-time-s",
    ):
        assert summary[key] is not None, key
    assert summary["rounds"] == ROUNDS
    assert 0.5 < summary["mean-client-params-fraction"] < 1.0
    assert summary["mean-bytes-per-client-round"] < 2 * summary["full-model-bytes"]
    rounds = read_json(run_dir, "rounds.json")
    for row in rounds:
        assert {"accuracy", "f1", "loss"} <= set(row)
    for row in rounds[1:]:
        assert {"accuracy", "loss"} <= set(row["federated-evaluation"])
        # The phases partition the round: in order, each non-negative, summing to its wall time.
        phases = row["phases-s"]
        assert list(phases) == [
            "configure-s",
            "train-wait-s",
            "aggregate-s",
            "evaluate-wait-s",
            "central-evaluate-s",
        ]
        assert all(v >= 0 for v in phases.values())
        assert sum(phases.values()) == pytest.approx(row["wall-time-s"], abs=0.05)
        # Every handler ran inside the wait for train replies.
        assert phases["train-wait-s"] >= max(c["handler-time-s"] for c in row["clients"])
        for client in row["clients"]:
            for key in (
                "node",
                "budget",
                "spec",
                "params",
                "bytes-down",
                "bytes-up",
                "train-time-s",
                "handler-time-s",
                "process-age-s",
                "peak-memory-mb",
                "train-loss",
                "num-examples",
            ):
                assert client[key] is not None, key
            assert client["bytes-down"] == client["bytes-up"] > 0
            assert client["peak-memory-mb"] > 0
            assert client["handler-time-s"] >= client["train-time-s"] > 0
            assert client["process-age-s"] > 0
            # the server saw the reply after the whole handler had run
            assert client["reply-after-s"] >= client["handler-time-s"]
    assert read_json(run_dir, "run-config.json")["num-server-rounds"] == ROUNDS
    for name in ("accuracy.png", "bytes-per-client.png", "submodel-sizes.png"):
        assert (run_dir / name).stat().st_size > 0
    for name in ("final-model", "best-model"):
        model = AutoModelForSequenceClassification.from_pretrained(run_dir / name)
        tokenizer = AutoTokenizer.from_pretrained(run_dir / name)
        with torch.no_grad():
            logits = model(**tokenizer(["a very good film"], return_tensors="pt")).logits
        assert logits.shape == (1, 2)
    _, final = load_state(run_dir / "final-model")
    _, last = load_state(run_dir / "round-models" / f"round-{ROUNDS}")
    assert all(torch.equal(final[k], last[k]) for k in final)
