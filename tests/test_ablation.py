"""scripts/ablation_zero_shot.py: its unprioritized baseline and one small end-to-end run."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from raffm_core import describe, permute_state
from raffm_core.task.config import RunConfig
from tests.assets import save_tiny_bert, write_polarity_csv
from tests.models import tiny_model

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location(
    "ablation_script", ROOT / "scripts" / "ablation_zero_shot.py"
)
ablation = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = ablation  # dataclasses look their module up there
_spec.loader.exec_module(ablation)


def test_random_unit_order_preserves_the_function_and_depends_on_the_seed():
    model = tiny_model("bert").eval()
    layout = describe(model)
    inputs = torch.randint(
        0, model.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        expected = model(input_ids=inputs).logits
    orders = [ablation.random_permutation(layout, seed) for seed in (0, 0, 1)]
    assert not orders[0].is_identity
    assert [p.heads.tolist() for p in orders[0].layers] == [
        p.heads.tolist() for p in orders[1].layers
    ]
    assert [p.ffn.tolist() for p in orders[0].layers] != [p.ffn.tolist() for p in orders[2].layers]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    permute_state(state, layout, orders[2])
    shuffled = tiny_model("bert").eval()
    shuffled.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(shuffled(input_ids=inputs).logits, expected)


def test_a_small_ablation_scores_every_sample_in_both_groups(tmp_path):
    model_dir = save_tiny_bert(tmp_path / "model")
    cfg = RunConfig.from_mapping(
        {
            "dataset": str(write_polarity_csv(tmp_path / "polarity.csv", 80)),
            "model-name": str(model_dir),
            "max-length": 16,
        }
    )
    result = ablation.run_ablation(model_dir, cfg, "params=0.8", 3, 12, log=lambda _: None)
    assert {g: len(v) for g, v in result.scores.items()} == {"prioritized": 3, "unprioritized": 3}
    assert result.examples == 12
    assert all(0.0 < f <= 0.8 for f in result.params_fractions)
    for group, stats in result.stats().items():
        assert stats["median"] == pytest.approx(float(np.median(result.scores[group])))
        assert stats["min"] <= stats["q1"] <= stats["median"] <= stats["q3"] <= stats["max"]
    ablation.write_outputs(result, tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "ablation.json").read_text())
    assert saved["scores"] == result.scores and saved["samples"] == 3
    assert (tmp_path / "out" / "ablation.png").stat().st_size > 0
    assert "| prioritized | 3 |" in (tmp_path / "out" / "ablation.md").read_text()


def test_bad_arguments_are_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="samples"):
        ablation.run_ablation(tmp_path, RunConfig(), "params=0.8", 0, 10)
    with pytest.raises(ValueError, match="without"):
        ablation.run_ablation(tmp_path, RunConfig(), "params=0.8", 2, 10, without="sorted")


def test_taylor_salience_ranks_on_the_validation_split_only(tmp_path):
    model_dir = save_tiny_bert(tmp_path / "model")
    mapping = {
        "dataset": str(write_polarity_csv(tmp_path / "polarity.csv", 80)),
        "model-name": str(model_dir),
        "max-length": 16,
    }
    with pytest.raises(ValueError, match="needs the run's validation split"):
        ablation.run_ablation(
            model_dir, RunConfig.from_mapping(mapping), "params=0.8", 2, 12, salience="taylor"
        )
    cfg = RunConfig.from_mapping({**mapping, "validation-fraction": 0.2})
    logged = []
    result = ablation.run_ablation(
        model_dir, cfg, "params=0.8", 2, 12, log=logged.append, salience="taylor"
    )
    assert result.salience == "taylor" and len(result.scores["prioritized"]) == 2
    assert any("taylor importance on" in line and "validation" in line for line in logged)
    with pytest.raises(ValueError, match="salience must be one of"):
        ablation.run_ablation(model_dir, cfg, "params=0.8", 2, 12, salience="gradient")
