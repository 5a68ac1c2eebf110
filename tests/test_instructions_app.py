"""``task = "causal-lm"`` on instruction data end to end: a tiny LLaMA, 3 nodes, mixed budgets.

SVAMP-shaped rows (``Body`` + ``Question`` -> ``Answer``, float answers) in a
jsonl file; the prompt template joins the two columns. Central evaluation
generates the answers greedily and scores exact match (numbers as numbers).
"""

from __future__ import annotations

import pytest
import transformers as T

from tests.sim import TIMEOUTS, every_node, read_json, simulate
from tests.slices import assert_changed_only_inside_held_slices
from tests.test_instructions import TEMPLATE, save_llama_folder, svamp_rows, write_jsonl

NUM_NODES = 3
ROUNDS = 2
BUDGETS = ["params=0.5", "params=0.7", "params=0.9"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("instructions-simulation")
    overrides = {
        "model-name": str(save_llama_folder(tmp / "lm")),
        "dataset": str(write_jsonl(tmp / "svamp.jsonl", svamp_rows(90, seed=1))),
        "task": "causal-lm",
        "prompt-template": TEMPLATE,
        "response-column": "Answer",
        "max-new-tokens": 3,
        **every_node(NUM_NODES),
        **TIMEOUTS,
        "results-dir": str(tmp / "results"),
        "num-server-rounds": ROUNDS,
        "budget-profile": ",".join(BUDGETS),
        "partitioner": "iid",
        "max-length": 32,
        "local-steps": 10,
        "batch-size": 8,
        "lr": 5e-3,
        "weight-decay": 0.0,
        "save-round-models": True,
        "salience-norm": "l1",  # the slice oracle re-derives an L1 order (tests/slices.py)
    }
    simulate(overrides, NUM_NODES)
    return tmp / "results"


def test_instruction_run_scores_generated_answers_and_learns(run_dir):
    rounds = read_json(run_dir, "rounds.json")
    assert [r["round"] for r in rounds] == list(range(ROUNDS + 1))
    for row in rounds:
        assert 0.0 <= row["exact-match"] <= 1.0
    assert rounds[-1]["loss"] < rounds[0]["loss"]  # response-token loss
    for row in rounds[1:]:
        assert sorted(c["budget"] for c in row["clients"]) == BUDGETS
        assert "exact-match" in row["federated-evaluation"]
    summary = read_json(run_dir, "summary.json")
    assert summary["primary-metric"] == "exact-match"
    assert summary["final-accuracy"] == rounds[-1]["exact-match"]


def test_global_lm_changes_only_inside_the_slices_nodes_held(run_dir):
    assert_changed_only_inside_held_slices(run_dir, T.AutoModelForCausalLM)
