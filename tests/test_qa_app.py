"""``task = "extractive-qa"`` end to end: 3 simulated nodes with mixed budgets learn a tiny SQuAD.

The tiny BERT QA model starts from random weights; the handmade SQuAD file
asks for the color in a filler context (some answers two tokens long), and
contexts run past ``max-length``, so most questions have several windows.
"""

from __future__ import annotations

import pytest
import transformers as T

from tests.sim import TIMEOUTS, every_node, read_json, simulate
from tests.slices import assert_changed_only_inside_held_slices
from tests.test_qa import save_qa_folder, squad_rows, write_squad

NUM_NODES = 3
ROUNDS = 3
BUDGETS = ["params=0.5", "params=0.7", "params=0.9"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qa-simulation")
    overrides = {
        "model-name": str(save_qa_folder(tmp / "model")),
        "dataset": str(write_squad(tmp / "squad.json", squad_rows(160, seed=1))),
        "task": "extractive-qa",
        **every_node(NUM_NODES),
        **TIMEOUTS,
        "results-dir": str(tmp / "results"),
        "num-server-rounds": ROUNDS,
        "budget-profile": ",".join(BUDGETS),
        "partitioner": "iid",
        "test-fraction": 0.25,
        "max-length": 24,
        "doc-stride": 8,
        "local-steps": 10,
        "batch-size": 16,
        "lr": 3e-3,
        "weight-decay": 0.0,
        "save-round-models": True,
        "salience-norm": "l1",  # the slice oracle re-derives an L1 order (tests/slices.py)
        "rolling-tail": 0.0,  # nested prefixes: some units are never held, the check is not vacuous
    }
    simulate(overrides, NUM_NODES)
    return tmp / "results"


def test_federated_qa_f1_rises_well_above_round_zero(run_dir):
    rounds = read_json(run_dir, "rounds.json")
    f1 = [row["f1"] for row in rounds]
    assert f1[-1] >= f1[0] + 0.4, f1
    assert all("exact-match" in row and "has-ans-f1" not in row for row in rounds)  # v1.1
    summary = read_json(run_dir, "summary.json")
    assert summary["primary-metric"] == "f1" and summary["final-accuracy"] == f1[-1]
    for row in rounds[1:]:
        assert sorted(c["budget"] for c in row["clients"]) == BUDGETS
        assert {"f1", "exact-match"} <= set(row["federated-evaluation"])


def test_global_qa_model_changes_only_inside_the_slices_nodes_held(run_dir):
    assert_changed_only_inside_held_slices(run_dir, T.AutoModelForQuestionAnswering)


def test_the_final_qa_model_reloads_with_its_span_head(run_dir):
    model = T.AutoModelForQuestionAnswering.from_pretrained(run_dir / "final-model")
    tok = T.AutoTokenizer.from_pretrained(run_dir / "final-model")
    out = model(**tok(["what color ?"], ["the car was red"], return_tensors="pt"))
    assert out.start_logits.shape == out.end_logits.shape == (1, 10)
