"""A federated text-to-text run of a tiny T5 under Flower's simulation runtime.

Three nodes with three budgets fine-tune sub-models of a tiny FLAN-style T5
(gated FFN, own lm_head) on sentiment as words for two rounds. The oracle is
the one of ``test_simulation``: outside the union of the slices the nodes
held, the global model after a round equals the prioritized model of the
round before, bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from raffm_core import SubnetSpec
from tests.seq2seq_assets import tiny_t5_task
from tests.sim import TIMEOUTS, every_node, read_json, simulate
from tests.slices import assert_changed_only_inside_held_slices

NUM_NODES = 3
ROUNDS = 2
BUDGETS = ["params=0.6", "params=0.75", "params=0.9"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("seq2seq-simulation")
    overrides = {
        **tiny_t5_task(tmp, 90),
        **every_node(NUM_NODES),
        **TIMEOUTS,
        "results-dir": str(tmp / "results"),
        "num-server-rounds": ROUNDS,
        "budget-profile": ",".join(BUDGETS),
        "partitioner": "iid",
        "max-length": 16,
        "max-new-tokens": 3,
        "eval-max-examples": 12,
        "local-steps": 3,
        "batch-size": 8,
        "lr": 3e-3,
        "mixed-precision": "no",
        "save-round-models": True,
        "rolling-tail": 0.0,  # nested prefixes: some units are never held, the check is not vacuous
        "salience-norm": "l1",  # the slice oracle re-derives an L1 order (tests/slices.py)
    }
    simulate(overrides, NUM_NODES)
    return tmp / "results"


def test_nodes_held_different_t5_submodels(run_dir):
    rounds = read_json(run_dir, "rounds.json")
    assert [r["round"] for r in rounds] == list(range(ROUNDS + 1))
    for row in rounds[1:]:
        clients = row["clients"]
        assert len(clients) == NUM_NODES and all(c["status"] == "accepted" for c in clients)
        assert sorted(c["budget"] for c in clients) == BUDGETS
        assert len({c["params"] for c in clients}) == NUM_NODES
        for c in clients:
            assert c["params-fraction"] <= float(c["budget"].split("=")[1]) + 1e-9
            spec = SubnetSpec.from_dict(c["spec"])
            assert len(spec.layers) == 4  # two encoder and two decoder blocks
        assert min(c["params-fraction"] for c in clients) < 0.7  # a partially covered node


def test_global_t5_changed_only_inside_the_slices_held(run_dir):
    uncovered = assert_changed_only_inside_held_slices(run_dir, AutoModelForSeq2SeqLM)
    # Untouched parts include decoder cross-attention and a position-bias column.
    assert any("EncDecAttention" in k for k in uncovered)
    assert any("relative_attention_bias" in k for k in uncovered)


def test_central_evaluation_generates_label_words(run_dir):
    summary = read_json(run_dir, "summary.json")
    assert summary["primary-metric"] == "accuracy"
    assert summary["final-accuracy"] is not None and 0.0 <= summary["final-accuracy"] <= 1.0
    rounds = read_json(run_dir, "rounds.json")
    for row in rounds:
        assert {"accuracy", "loss"} <= set(row)
    for row in rounds[1:]:  # the nodes generate too, with their own sub-models
        assert {"accuracy", "loss"} <= set(row["federated-evaluation"])
    assert rounds[-1]["loss"] < rounds[0]["loss"]  # it learns the label words
    model = AutoModelForSeq2SeqLM.from_pretrained(run_dir / "final-model").eval()
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "final-model")
    assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()  # still untied
    with torch.no_grad():
        out = model.generate(**tokenizer(["sst2 sentence: a good film"], return_tensors="pt"))
    assert out.shape[0] == 1


@pytest.fixture(scope="module")
def qa_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("seq2seq-qa-simulation")
    overrides = {
        **tiny_t5_task(tmp, 60, qa=True),
        **every_node(NUM_NODES),
        **TIMEOUTS,
        "results-dir": str(tmp / "results"),
        "num-server-rounds": 1,
        "budget-profile": ",".join(BUDGETS),
        "partitioner": "iid",
        "max-length": 32,
        "max-new-tokens": 3,
        "eval-max-examples": 8,
        "local-steps": 2,
        "batch-size": 8,
        "mixed-precision": "no",
        "save-models": False,
    }
    simulate(overrides, NUM_NODES)
    return tmp / "results"


def test_generative_qa_reports_exact_match_and_token_f1(qa_run):
    summary = read_json(qa_run, "summary.json")
    assert summary["primary-metric"] == "f1"
    assert summary["final-accuracy"] == summary["final-metrics"]["f1"]  # the primary metric
    rounds = read_json(qa_run, "rounds.json")
    assert [r["round"] for r in rounds] == [0, 1]
    for row in rounds:
        assert {"exact-match", "f1", "loss"} <= set(row) and 0 <= row["f1"] <= 1
    assert {"exact-match", "f1"} <= set(rounds[1]["federated-evaluation"])
    assert all(c["status"] == "accepted" for c in rounds[1]["clients"])
