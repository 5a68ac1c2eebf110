"""Aggregation weights other than num-examples, and HeteroFL's masked loss, against oracles."""

from __future__ import annotations

import contextlib
import dataclasses

import datasets
import numpy as np
import pytest
import torch

import raffm_core as R
from client_app.training import TrainSettings, train_submodel
from server_app.strategy import RaFFM
from tests.models import tiny_model
from tests.test_aggregate import _numpy_reference, _update


@pytest.fixture(scope="module")
def model():
    m = tiny_model("bert")
    R.prioritize(m)
    return m


def test_explicit_weights_replace_num_examples_in_the_average(model):
    layout = R.describe(model)
    specs = [R.SubnetSpec.uniform(2, 1, 8), R.SubnetSpec.uniform(2, 2, 24), layout.full_spec()]
    raw = [_update(model, layout, spec, seed=i, n=10) for i, spec in enumerate(specs)]
    weights = [1.5, 4.0, 10.0]
    updates = [R.Update(s, st, n, weight=w) for (s, st, n), w in zip(raw, weights, strict=True)]
    got = R.aggregate(model.state_dict(), updates, layout)
    want = _numpy_reference(
        model.state_dict(), [(s, st, w) for (s, st, _), w in zip(raw, weights, strict=True)], layout
    )
    for key, value in want.items():
        np.testing.assert_allclose(got[key].numpy(), value, rtol=1e-5, atol=1e-6, err_msg=key)


@pytest.mark.parametrize("weight", [0.0, -1.0, float("nan"), float("inf"), True])
def test_a_bad_weight_is_rejected(model, weight):
    layout = R.describe(model)
    spec, state, n = _update(model, layout, layout.full_spec(), seed=0, n=3)
    with pytest.raises(R.UpdateError, match="weight must be a positive finite number"):
        R.aggregate(model.state_dict(), [R.Update(spec, state, n, weight=weight)], layout)


_ELASTIC = (
    "attention.self.query.",
    "attention.self.key.",
    "attention.self.value.",
    "attention.output.dense.weight",
    "intermediate.dense.",
    "output.dense.weight",
)


def _elastic_params(model: torch.nn.Module) -> int:
    """Parameters of a BERT's head and FFN tensors, counted from the module itself."""
    return sum(
        p.numel()
        for name, p in model.named_parameters()
        if ".layer." in name and any(part in name for part in _ELASTIC)
    )


@pytest.mark.parametrize("heads, ffn", [(1, 8), (2, 24), (4, 37)])
def test_elastic_fraction_counts_the_heads_and_neurons_a_real_submodel_holds(model, heads, ffn):
    layout = R.describe(model)
    spec = R.SubnetSpec.uniform(layout.num_layers, heads, ffn)
    sub = R.build_submodel(model, spec)
    want = _elastic_params(sub) / _elastic_params(model)
    assert layout.elastic_fraction(spec) == pytest.approx(want, rel=1e-12)
    assert layout.elastic_fraction(layout.full_spec()) == 1.0


@pytest.mark.parametrize("power", [0.0, 1.0, 2.0])
def test_width_weight_power_scales_by_the_held_elastic_fraction(model, power):
    layout = R.describe(model)
    strategy = RaFFM(layout, "{}", width_weight_power=power)
    spec = R.SubnetSpec.uniform(layout.num_layers, 1, 8)
    weighed = strategy._weigh(R.Update(spec, {}, 40), spec)
    held = _elastic_params(R.build_submodel(model, spec)) / _elastic_params(model)
    got = weighed.weight if weighed.weight is not None else weighed.num_examples
    assert got == pytest.approx(40 * held**power)
    assert power == 0.0 or got < 40  # a smaller sub-model pulls less
    with pytest.raises(ValueError, match="width_weight_power must be >= 0"):
        RaFFM(layout, "{}", width_weight_power=-1.0)


def _two_class_split(n: int = 8) -> datasets.Dataset:
    """Classes 0 and 1 of the tiny model's 3; class 2 is absent."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 60, (n, 6), generator=g).tolist()
    return datasets.Dataset.from_dict(
        {"input_ids": ids, "attention_mask": [[1] * 6] * n, "labels": [i % 2 for i in range(n)]}
    )


class _Pad:
    """The smallest tokenizer stand-in make_loader needs: pad equal-length rows."""

    padding_side = "right"

    def pad(self, rows, return_tensors="pt"):
        return {k: torch.tensor([r[k] for r in rows]) for k in rows[0]}


@pytest.mark.parametrize("masked", [False, True], ids=["plain", "masked"])
def test_masked_loss_leaves_absent_classes_untouched(masked, monkeypatch):
    model = tiny_model("bert")  # 3 classes; the client holds classes 0 and 1
    monkeypatch.setattr(
        "raffm_core.task.encode.PreTrainedTokenizerBase", _Pad
    )  # let the stand-in through make_loader's text path
    before = model.classifier.weight.detach().clone()
    settings = TrainSettings(1e-2, 2, 1.0, 4, 0.0, 0.0, seed=1, masked_loss=masked)
    train_submodel(model, _two_class_split(), _Pad(), settings)
    moved = (model.classifier.weight.detach() - before).abs().sum(1)
    assert bool((moved[[0, 1]] > 0).all())
    if masked:  # no gradient reaches the row of the absent class
        assert float(moved[2]) == 0.0
    else:
        assert float(moved[2]) > 0


def test_masked_loss_needs_class_labels():
    model = tiny_model("bert")
    split = _two_class_split().cast_column("labels", datasets.Value("float32"))
    settings = dataclasses.replace(
        TrainSettings(1e-3, 1, 1.0, 4, 0.0, 0.0, seed=1), masked_loss=True
    )
    from raffm_core import InstructionError

    with pytest.raises(InstructionError, match="masked-loss needs one integer class label"):
        train_submodel(model, split, _Pad(), settings)


@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "scaler"])
def test_width_scaler_setting_trains_the_sub_model_under_the_scaler(scaled, monkeypatch):
    """Oracle: the first step's loss is the forward loss with (or without) the scaler."""

    full = tiny_model("bert")  # no dropout: the training forward equals an eval forward
    sub = R.extract_submodel(full, R.SubnetSpec.uniform(2, 1, 10))
    monkeypatch.setattr("raffm_core.task.encode.PreTrainedTokenizerBase", _Pad)
    split = _two_class_split(8)
    batch = {k: torch.tensor(split[k]) for k in ("input_ids", "attention_mask", "labels")}
    with torch.no_grad():
        with R.width_scaler(sub) if scaled else contextlib.nullcontext():
            expected = float(sub(**batch).loss)
        other = float(sub(**batch).loss) if scaled else None
    settings = TrainSettings(1e-3, 1, 1.0, 8, 0.0, 0.0, seed=1, width_scaler=scaled)
    result = train_submodel(sub, split, _Pad(), settings)
    assert result.loss == pytest.approx(expected, rel=1e-5)
    if scaled:
        assert result.loss != pytest.approx(other, rel=1e-5)  # the scaler changed the forward
