"""Server-side updates: FedAvg passes through, FedAdam respects coverage and permutations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import raffm_core as R
from tests.models import tiny_model


def _round(model, layout, spec, seed):
    g = torch.Generator().manual_seed(seed)
    sub = R.extract_state_dict(model.state_dict(), layout, spec)
    update = (spec, {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in sub.items()}, 4)
    return R.aggregate_with_coverage(model.state_dict(), [update], layout)


def test_fedavg_returns_the_aggregate():
    model = tiny_model("bert")
    layout = R.describe(model)
    aggregated, coverage = _round(model, layout, layout.full_spec(), 0)
    new = R.ServerOptimizer("fedavg").step(model.state_dict(), aggregated, coverage)
    assert all(torch.equal(new[k], aggregated[k]) for k in aggregated)


def test_fedadam_matches_a_numpy_adam_step_and_keeps_uncovered_elements():
    model = tiny_model("bert")
    layout = R.describe(model)
    spec = R.SubnetSpec.uniform(2, 1, 10)
    aggregated, coverage = _round(model, layout, spec, 0)
    opt = R.ServerOptimizer("fedadam", lr=0.01, beta1=0.9, beta2=0.99, tau=1e-3)
    old = model.state_dict()
    new = opt.step(old, aggregated, coverage)
    key = layout.layers[0].modules["ffn_out"] + ".weight"
    x, a = old[key].numpy().astype(np.float64), aggregated[key].numpy().astype(np.float64)
    delta = a - x
    m, v = 0.1 * delta, 0.01 * delta**2
    expected = x + 0.01 * m / (np.sqrt(v) + 1e-3)
    np.testing.assert_allclose(new[key].numpy()[:, :10], expected[:, :10], rtol=1e-5, atol=1e-6)
    assert torch.equal(new[key][:, 10:], old[key][:, 10:])  # nobody trained these


def test_moments_follow_prioritization():
    """Permuting model and moments together equals stepping in the permuted frame."""
    model = tiny_model("qwen2")
    layout = R.describe(model)
    opt = R.ServerOptimizer("fedadam", lr=0.01)
    aggregated, coverage = _round(model, layout, layout.full_spec(), 0)
    model.load_state_dict(opt.step(model.state_dict(), aggregated, coverage))
    twin = R.ServerOptimizer.from_state_dict(opt.state_dict())

    permutation = R.prioritize(model)
    opt.permute(layout, permutation)
    unpermuted = {k: v.clone() for k, v in twin.m.items()}
    R.permute_state(unpermuted, layout, permutation)
    assert all(torch.equal(opt.m[k], unpermuted[k]) for k in opt.m)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"name": "fedsgd"}, "unknown server update 'fedsgd'.*fedavg"),
        ({"lr": 0}, "lr"),
        ({"beta1": 1.0}, "beta1"),
    ],
    ids=["name", "lr", "beta"],
)
def test_bad_server_optimizer_settings(kwargs, message):
    with pytest.raises(R.RaffmError, match=message):
        R.ServerOptimizer(**kwargs)
