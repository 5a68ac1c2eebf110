"""score_classifier against hand-counted predictions; scripts/diagnose_submodels.py run."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from raffm_core.errors import DataError
from raffm_core.task.metrics import score_classifier
from tests.assets import save_tiny_bert, write_polarity_csv

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location(
    "diagnose_script", ROOT / "scripts" / "diagnose_submodels.py"
)
diagnose = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(diagnose)


class FixedLogits(torch.nn.Module):
    """Returns the logits a batch carries, with the mean cross-entropy as its loss."""

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(
            logits=logits, loss=torch.nn.functional.cross_entropy(logits, labels)
        )


def test_score_classifier_counts_hits_loss_and_the_majority_class():
    # 5 examples in two batches; predictions 1, 1, 0 | 1, 2; labels 1, 0, 0 | 1, 1
    big, small = 2.0, 0.0
    batches = [
        {
            "logits": torch.tensor([[small, big, small], [small, big, small], [big, small, small]]),
            "labels": torch.tensor([1, 0, 0]),
        },
        {
            "logits": torch.tensor([[small, big, small], [small, small, big]]),
            "labels": torch.tensor([1, 1]),
        },
    ]
    scores = score_classifier(FixedLogits(), batches)
    right = -math.log(math.exp(big) / (math.exp(big) + 2))  # loss of a hit
    wrong = -math.log(1 / (math.exp(big) + 2))  # loss of a miss
    assert scores["accuracy"] == pytest.approx(3 / 5)
    assert scores["loss"] == pytest.approx((3 * right + 2 * wrong) / 5)
    assert scores["majority-share"] == pytest.approx(3 / 5)  # class 1, predicted 3 times
    assert scores["examples"] == 5


def test_score_classifier_on_no_examples_is_an_error():
    with pytest.raises(DataError, match="empty split"):
        score_classifier(FixedLogits(), [])


def test_diagnose_scores_the_full_model_and_one_sub_model_per_budget(tmp_path):
    model_dir = save_tiny_bert(tmp_path / "final-model")
    run_config = {
        "dataset": str(write_polarity_csv(tmp_path / "polarity.csv", 60)),
        "model-name": str(model_dir),
        "max-length": 16,
        "budget-profile": "params=0.6,params=1.0",
        "width-scaler": True,
    }
    (tmp_path / "run-config.json").write_text(json.dumps(run_config))
    assert diagnose.main([str(model_dir), "--out", str(tmp_path / "out")]) == 0
    records = json.loads((tmp_path / "out" / "diagnosis.json").read_text())
    assert [(r["model"], r.get("scaler")) for r in records] == [
        ("full", None),
        ("params=0.6", False),
        ("params=0.6", True),
        ("params=1.0", False),
        ("params=1.0", True),
    ]
    full, *_, whole, whole_scaled = records
    # the whole budget is the prioritized full model, which computes what the model does
    assert whole["loss"] == pytest.approx(full["loss"], rel=1e-5)
    assert whole_scaled["loss"] == pytest.approx(full["loss"], rel=1e-5)  # no narrowed sums
    assert (tmp_path / "out" / "diagnosis.md").read_text().count("\n| params=") == 4
