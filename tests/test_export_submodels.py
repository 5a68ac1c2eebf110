"""After training: inference budgets, the ViT export round trip, scripts/export_submodels.py.

Oracles: the inference memory of a tiny BERT computed by hand from its
shapes; brute force over every uniform width for "largest that fits";
outputs of the extracted sub-model for the export round trip; metrics
recomputed from the exported folder for the script.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as T

import raffm_core as R
from raffm_core import InferenceProfile
from raffm_core.export import export_submodel
from raffm_core.task.data import DatasetSpec
from raffm_core.task.images import load_image_splits
from raffm_core.task.models import load_pixel_processor
from tests.assets import save_tiny_bert, write_polarity_csv
from tests.models import tiny_inputs, tiny_model

ROOT = Path(__file__).resolve().parent.parent


def load_script():
    """scripts/export_submodels.py as a module (registered first: its dataclass needs that)."""
    if "export_script" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "export_script", ROOT / "scripts" / "export_submodels.py"
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["export_script"] = module
        spec.loader.exec_module(module)
    return sys.modules["export_script"]


# ------------------------------------------------------ inference budgets
def test_inference_memory_matches_a_hand_count():
    """Tiny BERT: hidden 48, 4 heads of 12, FFN 40; spec keeps 2 heads and 20 neurons."""
    model = tiny_model("bert")
    layout = R.describe(model)
    spec = R.SubnetSpec.uniform(2, 2, 20)
    weights = sum(p.numel() for p in R.extract_submodel(model, spec).parameters())
    live = 3 * 48 + 2 * 12 + 2 * 2 * 12 + 20  # hidden x3, Q, K and V, FFN
    profile = InferenceProfile(batch_size=2, seq_len=16, runtime_mb=100.0)
    expected = 100.0 + (4 * weights + 4 * live * 2 * 16) / 2**20
    assert profile.memory_mb(layout, spec) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("family", ["bert", "vit", "llama", "gpt2"])
def test_memory_budget_with_inference_profile_picks_a_maximal_fitting_width(family):
    model = tiny_model(family)
    layout = R.describe(model)
    profile = InferenceProfile(batch_size=4, seq_len=32)
    full = profile.memory_mb(layout, layout.full_spec())
    floor = profile.memory_mb(layout, R.SubnetSpec.uniform(layout.num_layers, 1, 1))
    limit = floor + 0.6 * (full - floor)
    spec = R.select_subnet(model, f"memory-mb={limit}", profile=profile)
    assert floor < profile.memory_mb(layout, spec) <= limit
    kept = spec.layers[0]
    # brute force: no uniform width that fits is at least as wide everywhere and wider somewhere
    for heads in range(1, layout.num_groups + 1):
        for ffn in range(1, layout.ffn_size + 1):
            candidate = R.SubnetSpec.uniform(layout.num_layers, heads, ffn)
            if profile.memory_mb(layout, candidate) > limit:
                continue
            dominates = (
                heads >= kept.heads
                and ffn >= kept.ffn
                and (heads, ffn)
                != (
                    kept.heads,
                    kept.ffn,
                )
            )
            # FFN widths move in ffn_step increments; only a whole step counts
            if dominates and (ffn - kept.ffn >= R.select.ffn_step(layout) or heads > kept.heads):
                pytest.fail(f"{candidate} fits and is wider than the chosen {spec}")


def test_the_same_memory_budget_admits_more_for_inference_than_training():
    model = tiny_model("bert")
    layout = R.describe(model)
    train = R.TrainingProfile(batch_size=64, seq_len=64)
    infer = InferenceProfile(batch_size=1, seq_len=64)
    limit = train.memory_mb(layout, R.SubnetSpec.uniform(2, 2, 20))
    trained = R.select_subnet(layout, f"memory-mb={limit}", profile=train)
    deployed = R.select_subnet(layout, f"memory-mb={limit}", profile=infer)
    assert deployed == layout.full_spec()
    assert layout.count_params(deployed) > layout.count_params(trained)


def test_a_profile_without_memory_mb_is_rejected():
    layout = R.describe(tiny_model("bert"))
    with pytest.raises(R.BudgetError, match="memory_mb"):
        R.Budget.parse("memory-mb=500").cost(layout, layout.full_spec(), object())


# --------------------------------------------------- ViT export round trip
@pytest.mark.parametrize(
    "heads, expected_format",
    [(4, "transformers"), (2, "raffm")],
    ids=["ffn-narrowed", "heads-narrowed"],
)
def test_vit_export_round_trip(heads, expected_format, tmp_path):
    model = tiny_model("vit")
    R.prioritize(model)
    spec = R.SubnetSpec.uniform(2, heads, 24)
    reference = R.extract_submodel(model, spec)
    assert export_submodel(model, spec, tmp_path) == expected_format
    inputs = tiny_inputs("vit")
    with torch.no_grad():
        want = reference(**inputs).logits
        loaded = R.load_submodel(tmp_path)
        torch.testing.assert_close(loaded(**inputs).logits, want, rtol=1e-6, atol=1e-6)
        if expected_format == "transformers":
            plain = T.AutoModelForImageClassification.from_pretrained(tmp_path).eval()
            torch.testing.assert_close(plain(**inputs).logits, want, rtol=1e-6, atol=1e-6)


# ----------------------------------------------- scripts/export_submodels.py
def write_run(tmp_path: Path, model_dir: Path, **config) -> Path:
    (tmp_path / "run-config.json").write_text(
        json.dumps({"seed": 0, "model-name": "ignored", **config}) + "\n"
    )
    return model_dir


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
    """A 'trained' tiny ViT (random weights) beside the run config of a digits run."""
    tmp = tmp_path_factory.mktemp("export-vit")
    model = tiny_model("vit")
    model.save_pretrained(tmp / "final-model")
    load_pixel_processor("vit-tiny:image_size=8").save_pretrained(tmp / "final-model")
    return write_run(
        tmp, tmp / "final-model", dataset="sklearn:digits", **{"eval-max-examples": 120}
    )


def test_export_script_exports_what_it_evaluated(vit_run, tmp_path):
    script = load_script()
    out = tmp_path / "deployed"
    assert script.main([str(vit_run), "--budget", "params=0.7", "--out", str(out)]) == 0
    report = json.loads((out / "deploy.json").read_text())
    assert report["budget"] == "params=0.7" and report["params-fraction"] <= 0.7
    assert report["inference-profile"] == {"batch-size": 1, "seq-len": 17}  # 16 patches + CLS
    model = R.load_submodel(out).eval()
    assert sum(p.numel() for p in model.parameters()) == report["params"]
    # recompute the accuracy from the exported folder: same held-out split, own argmax
    splits = load_image_splits(DatasetSpec("sklearn:digits", seed=0))
    rows = splits.test.with_format("numpy")
    chosen = sorted(np.random.default_rng(0).choice(len(rows), size=120, replace=False).tolist())
    images, labels = rows[chosen]["image"], rows[chosen]["label"]
    with torch.no_grad():
        logits = model(pixel_values=load_pixel_processor(str(out))(list(images))).logits
    assert report["accuracy"] == pytest.approx((logits.argmax(-1).numpy() == labels).mean())


def test_export_script_budget_in_inference_memory(vit_run, tmp_path):
    script = load_script()
    profile = InferenceProfile(batch_size=1, seq_len=17)
    config = T.AutoConfig.from_pretrained(vit_run)
    layout = R.describe(T.AutoModelForImageClassification.from_config(config))
    limit = profile.memory_mb(layout, R.SubnetSpec.uniform(2, 3, 30))
    out = tmp_path / "deployed"
    script.main([str(vit_run), "--budget", f"memory-mb={limit}", "--out", str(out)])
    report = json.loads((out / "deploy.json").read_text())
    assert report["inference-memory-mb"] <= limit
    assert (report["heads"], report["ffn"]) >= (3, 30)


def test_export_script_rejects_a_budget_below_the_smallest_model(vit_run, tmp_path):
    with pytest.raises(SystemExit, match="smallest sub-network"):
        load_script().main([str(vit_run), "--budget", "params=0.01", "--out", str(tmp_path)])


@pytest.mark.parametrize("with_run_config", [False, True], ids=["beside", "--run-config"])
def test_export_script_on_a_missing_folder_says_it_does_not_exist(tmp_path, with_run_config):
    missing = tmp_path / "no-such-run" / "final-model"
    (tmp_path / "run-config.json").write_text("{}")
    extra = ["--run-config", str(tmp_path / "run-config.json")] if with_run_config else []
    argv = [str(missing), "--budget", "params=0.7", "--out", str(tmp_path / "out"), *extra]
    with pytest.raises(SystemExit, match=f"the model folder {missing} does not exist"):
        load_script().main(argv)


def test_export_curve_on_a_text_model(tmp_path):
    """Curve rows: infeasible below the floor; at 100% the prioritized full model,
    whose accuracy equals the saved model's (prioritization preserves outputs)."""
    model_dir = save_tiny_bert(tmp_path / "final-model")
    data = write_polarity_csv(tmp_path / "polarity.csv", 60)
    write_run(tmp_path, model_dir, dataset=str(data), **{"max-length": 16})
    out = tmp_path / "curve"
    assert (
        load_script().main([str(model_dir), "--curve", str(out), "--fractions", "0.05,0.8,1"]) == 0
    )
    with (out / "curve.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["feasible"] for r in rows] == ["False", "True", "True"]
    assert float(rows[1]["params-fraction"]) <= 0.8 < float(rows[2]["params-fraction"]) == 1.0
    assert (out / "curve.png").stat().st_size > 0 and "infeasible" in (out / "curve.md").read_text()
    # oracle: the saved (unprioritized) model scored by hand on the same 12 held-out rows
    from raffm_core.task.data import DatasetSpec, load_splits

    test = load_splits(DatasetSpec(str(data), test_fraction=0.2, seed=0)).test
    tokenizer = T.AutoTokenizer.from_pretrained(model_dir)
    plain = T.AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.no_grad():
        logits = plain(**tokenizer(list(test["text"]), padding=True, return_tensors="pt")).logits
    accuracy = float((logits.argmax(-1).numpy() == np.array(test["label"])).mean())
    assert float(rows[2]["accuracy"]) == pytest.approx(accuracy)
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor(test["label"]))
    assert float(rows[2]["loss"]) == pytest.approx(float(loss), rel=1e-5)
