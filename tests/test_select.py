"""Budget-fitted sub-network selection, and the spec's serialization."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

import raffm_core as R
from tests.models import FAMILY_NAMES, minilm_path, tiny_model


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("fraction", [0.7, 0.85, 1.0])
def test_largest_fits_and_counts_what_the_client_holds(family, fraction):
    model = tiny_model(family)
    layout = R.describe(model)
    spec = R.select_subnet(model, f"params={fraction}")
    sub = R.extract_submodel(model, spec)
    # Oracle: count the real sub-model's tensors (embeddings and head included).
    held = sum(t.numel() for k, t in sub.state_dict().items() if k not in layout.tied)
    assert held == layout.count_params(spec)
    assert held <= fraction * layout.total_params
    assert spec == R.select_subnet(model, f"params={fraction}")  # deterministic
    if fraction == 1.0:
        assert spec == layout.full_spec()


def test_largest_leaves_no_fitting_ffn_step_unused():
    model = tiny_model("bert")
    layout = R.describe(model)
    budget = R.Budget.parse("params=0.8")
    spec = R.select_subnet(model, budget)
    layer = spec.layers[0]
    assert isinstance(layer.ffn, int)
    if layer.ffn < layout.ffn_size:
        wider = R.SubnetSpec.uniform(layout.num_layers, layer.heads, layer.ffn + 1)
        assert layout.count_params(wider) > budget.limit(layout)


def test_absolute_and_memory_budgets():
    model = tiny_model("bert")
    layout = R.describe(model)
    spec = R.select_subnet(model, f"params={int(0.75 * layout.total_params)}")
    assert layout.count_params(spec) <= 0.75 * layout.total_params
    profile = R.TrainingProfile(batch_size=4, seq_len=16)
    full_mb = R.training_memory_mb(layout, layout.full_spec(), profile)
    small_mb = R.training_memory_mb(layout, R.SubnetSpec.uniform(2, 1, 1), profile)
    budget = (full_mb + small_mb) / 2
    spec = R.select_subnet(model, f"memory-mb={budget}", profile=profile)
    assert small_mb < R.training_memory_mb(layout, spec, profile) <= budget


def test_sample_is_seeded_fits_and_leaves_global_rngs_alone():
    model = tiny_model("bert")
    layout = R.describe(model)
    states = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    draws = [R.select_subnet(model, "params=0.8", mode="sample", seed=s) for s in range(20)]
    assert random.getstate() == states[0]
    assert np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.get_rng_state(), states[2])
    assert draws == [R.select_subnet(model, "params=0.8", mode="sample", seed=s) for s in range(20)]
    assert len(set(draws)) > 5, "draws should differ across seeds"
    assert all(layout.count_params(d) <= 0.8 * layout.total_params for d in draws)
    assert any(len({x.ffn for x in d.layers}) > 1 for d in draws), "per-layer widths vary"


def test_budget_below_the_smallest_subnet_names_the_minimum():
    model = tiny_model("bert")
    layout = R.describe(model)
    minimum = layout.count_params(R.SubnetSpec.uniform(2, 1, 1))
    with pytest.raises(R.BudgetTooSmallError, match=f"{minimum:,} parameters") as info:
        R.select_subnet(model, "params=0.1")
    assert info.value.minimum == minimum
    with pytest.raises(R.BudgetTooSmallError, match="MB"):
        R.select_subnet(model, "memory-mb=1")


def test_unknown_mode_is_an_error():
    with pytest.raises(R.BudgetError, match="unknown selection mode 'biggest'.*largest, sample"):
        R.select_subnet(tiny_model("bert"), "params=0.9", mode="biggest")


def test_minilm_floor_and_a_75_percent_subnet():
    """Embeddings are about half of MiniLM: 0.75 keeps about half of each layer's width."""
    import transformers as T

    model = T.AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    layout = R.describe(model)
    spec = R.select_subnet(model, "params=0.75")
    width = spec.layers[0].ffn / layout.ffn_size
    assert 0.35 < width < 0.65
    with pytest.raises(R.BudgetTooSmallError, match=r"\(0\.5\d\d of the full model\)"):
        R.select_subnet(model, "params=0.4")


@pytest.mark.parametrize(
    "spec",
    [
        R.SubnetSpec.uniform(3, 4, 100),
        R.SubnetSpec((R.LayerSpec([1, 3], [7, 2, 5]), R.LayerSpec(2, list(range(4))))),
    ],
    ids=["prefix", "index-sets"],
)
def test_spec_json_round_trip(spec):
    data = json.loads(json.dumps(spec.to_dict()))
    assert R.SubnetSpec.from_dict(data) == spec
    assert R.SubnetSpec.from_json(spec.to_json()) == spec


def test_index_sets_are_canonical():
    layer = R.LayerSpec([2, 0, 1], [5, 3])
    assert layer.heads == 3  # a full prefix collapses to its width
    assert layer.ffn == (3, 5)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"format": 2, "layers": []}, "format 2"),
        ({"format": 1, "layers": "x"}, "must be a list"),
        ({"format": 1, "layers": []}, "at least one layer"),
        ({"format": 1, "layers": [{"heads": 0, "ffn": 3}]}, "layer 0: heads: .*at least 1"),
        ({"format": 1, "layers": [{"heads": 1, "ffn": [2, 2]}]}, "unique"),
        ({"format": 1, "layers": [{"heads": 1, "ffn": [-1]}]}, ">= 0"),
        ({"format": 1, "layers": [{"heads": 1}]}, "exactly the keys"),
        ({"format": 1, "layers": [{"heads": True, "ffn": 2}]}, "got True"),
        ({"format": 1, "layers": [{"heads": 1.5, "ffn": 2}]}, "float"),
    ],
    ids=[
        "version",
        "layers-type",
        "empty",
        "zero",
        "duplicate",
        "negative",
        "keys",
        "bool",
        "float",
    ],
)
def test_bad_spec_dict_is_an_error(data, message):
    with pytest.raises(R.SpecError, match=message):
        R.SubnetSpec.from_dict(data)


def test_index_sets_travel_as_runs_and_plain_lists_still_read():
    spec = R.SubnetSpec((R.LayerSpec([0, 1, 5], [*range(10), *range(30, 40), 45]),))
    layer = spec.to_dict()["layers"][0]
    assert layer == {"heads": "0-1,5", "ffn": "0-9,30-39,45"}
    assert R.SubnetSpec.from_dict(spec.to_dict()) == spec
    as_lists = {
        "format": 1,
        "layers": [{"heads": [0, 1, 5], "ffn": [*range(10), *range(30, 40), 45]}],
    }
    assert R.SubnetSpec.from_dict(as_lists) == spec
    for bad in ("3-1", "a-b", "1,,2"):
        with pytest.raises(R.SpecError):
            R.LayerSpec(bad, 4)
    with pytest.raises(R.SpecError, match="unique"):
        R.LayerSpec("0-3,2-5", 4)
