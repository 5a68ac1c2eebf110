"""Export for a device: plain transformers where the config can say it, raffm format otherwise."""

from __future__ import annotations

import importlib
import sys
import warnings

import pytest
import torch
import transformers as T

import raffm_core as R
from raffm_core import InferenceProfile
from raffm_core.export import export_model, export_submodel
from tests.models import tiny_inputs, tiny_model


@pytest.mark.parametrize(
    "family, heads, expected_format",
    [
        ("llama", 1, "transformers"),  # explicit head_dim: head counts expressible
        ("qwen2", 2, "transformers"),
        ("bert", 4, "transformers"),  # all heads kept, FFN narrowed
        ("bert", 2, "raffm"),  # BERT derives head size from the head count
        ("distilbert", 4, "transformers"),
        ("gpt2", 4, "transformers"),  # n_inner carries the FFN width
        ("gpt2", 2, "raffm"),  # GPT-2 derives head size from n_head
    ],
)
def test_export_round_trip(family, heads, expected_format, tmp_path):
    model = tiny_model(family)
    R.prioritize(model)
    layout = R.describe(model)
    spec = R.SubnetSpec.uniform(layout.num_layers, heads, 24)
    reference = R.extract_submodel(model, spec)
    kind = export_submodel(model, spec, tmp_path / "out")
    assert kind == expected_format
    inputs = tiny_inputs(family)
    with torch.no_grad():
        want = reference(**inputs).logits
        loaded = R.load_submodel(tmp_path / "out")
        torch.testing.assert_close(loaded(**inputs).logits, want, rtol=1e-6, atol=1e-6)
        if kind == "transformers":
            plain = T.AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")
            torch.testing.assert_close(plain.eval()(**inputs).logits, want, rtol=1e-6, atol=1e-6)


def test_non_uniform_spec_exports_in_raffm_format(tmp_path):
    model = tiny_model("llama")
    spec = R.SubnetSpec((R.LayerSpec(1, 10), R.LayerSpec(2, 30)))
    assert export_submodel(model, spec, tmp_path / "out") == "raffm"
    assert R.spec_of(R.load_submodel(tmp_path / "out")) == spec


def test_inference_fits_a_larger_model_than_training():
    """The same memory budget admits a wider sub-model for inference than for training."""
    model = tiny_model("bert")
    layout = R.describe(model)
    train = R.TrainingProfile(batch_size=64, seq_len=64)
    infer = InferenceProfile(batch_size=1, seq_len=64)
    half = R.SubnetSpec.uniform(2, 2, 20)
    assert infer.memory_mb(layout, layout.full_spec()) < R.training_memory_mb(layout, half, train)


@pytest.mark.parametrize(
    "family, heads, expected_format",
    [("bert", 4, "transformers"), ("bert", 2, "raffm"), ("llama", 1, "transformers")],
)
def test_a_cut_exports_as_the_prioritized_model_and_its_spec_do(
    family, heads, expected_format, tmp_path
):
    model = tiny_model(family)
    spec = R.SubnetSpec.uniform(R.describe(model).num_layers, heads, 24)
    assert export_model(R.cut(model, spec).model, tmp_path / "cut") == expected_format
    R.prioritize(model)
    assert export_submodel(model, spec, tmp_path / "spec") == expected_format
    inputs = tiny_inputs(family)
    with torch.no_grad():
        want = R.load_submodel(tmp_path / "spec")(**inputs).logits
        got = R.load_submodel(tmp_path / "cut")(**inputs).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_full_model_exports_as_plain_transformers(tmp_path):
    model = tiny_model("bert")
    assert export_model(model, tmp_path / "full") == "transformers"
    inputs = tiny_inputs("bert")
    with torch.no_grad():
        plain = T.AutoModelForSequenceClassification.from_pretrained(tmp_path / "full").eval()
        torch.testing.assert_close(plain(**inputs).logits, model(**inputs).logits)


def test_a_trimmed_vocabulary_exports_in_raffm_format(tmp_path):
    model = tiny_model("bert")
    spec = R.SubnetSpec.uniform(2, 4, 24, vocab=tuple(range(30)))
    assert export_model(R.cut(model, spec).model, tmp_path / "out") == "raffm"
    assert R.spec_of(R.load_submodel(tmp_path / "out")) == spec


@pytest.mark.parametrize("name", ["export_submodel", "plain_config", "InferenceProfile"])
def test_the_old_module_name_still_works_and_says_the_new_one(name):
    sys.modules.pop("raffm_core.deploy", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = importlib.import_module("raffm_core.deploy")
        value = getattr(old, name)
    assert value is getattr(importlib.import_module("raffm_core.export"), name)
    messages = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
    assert messages == [
        f"raffm_core.deploy is deprecated and will be removed: import {name} from "
        "raffm_core.export (or raffm_core) instead"
    ]
    with pytest.raises(AttributeError, match="no attribute 'deploy_submodel'"):
        old.deploy_submodel  # noqa: B018


def test_the_old_from_import_warns_at_the_importing_line():
    with pytest.warns(DeprecationWarning, match="raffm_core.export") as caught:
        from raffm_core.deploy import export_submodel as old  # noqa: F401
    assert caught[0].filename == __file__
