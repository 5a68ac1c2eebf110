"""Deployment export: plain transformers where the config can say it, raffm format otherwise."""

from __future__ import annotations

import pytest
import torch
import transformers as T

import raffm_core as R
from raffm_core import InferenceProfile
from raffm_core.export import export_submodel
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
