"""Slice-aware aggregation against a numpy reference, and its input validation."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import raffm_core as R
from tests.models import tiny_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model():
    m = tiny_model("llama")  # GQA: head blocks differ between Q and K/V
    R.prioritize(m)
    return m


@pytest.fixture(scope="module")
def layout(model):
    return R.describe(model)


def _update(model, layout, spec, seed, n):
    """A client's reply: its slice of the global model plus seeded noise."""
    g = torch.Generator().manual_seed(seed)
    sub = R.extract_state_dict(model.state_dict(), layout, spec)
    state = {k: v + torch.randn(v.shape, generator=g) for k, v in sub.items()}
    return spec, state, n


def _numpy_reference(global_state, updates, layout):
    """Per element: examples-weighted mean over the updates holding it, else the old value.

    Written with explicit per-update index arrays and a full-size count of
    contributions, independently of the implementation's slice handling.
    """
    out = {}
    n_q = layout.num_groups * layout.group_size
    for key, old in global_state.items():
        old = old.numpy().astype(np.float64)
        num = np.zeros_like(old)
        den = np.zeros_like(old)
        for spec, state, n in updates:
            mask = np.zeros(old.shape, dtype=bool)
            index = [slice(None)] * old.ndim
            for layer, kept in zip(layout.layers, spec.layers, strict=True):
                for coupled in (*layer.heads, *layer.ffn):
                    if coupled.key == key:
                        width = kept.heads if coupled in layer.heads else kept.ffn
                        units = range(width) if isinstance(width, int) else width
                        index[coupled.axis] = np.array(
                            [u * coupled.block + j for u in units for j in range(coupled.block)]
                        )
            mask[tuple(index)] = True
            full = np.zeros_like(old)
            full[tuple(index)] = state[key].numpy()
            num += n * full * mask
            den += n * mask
        out[key] = np.where(den > 0, num / np.where(den > 0, den, 1), old)
    assert n_q  # keep the reference honest about what it models
    return out


def test_partial_coverage_matches_numpy(model, layout):
    g, f = layout.num_groups, layout.ffn_size
    specs = [
        R.SubnetSpec.uniform(2, 1, 8),  # prefix, narrow
        R.SubnetSpec.uniform(2, 2, 24),  # prefix, wider
        R.SubnetSpec(
            (
                R.LayerSpec([1], [3, 5, 30, 39]),  # index sets, rolling-window style
                R.LayerSpec(1, list(range(10, 20))),
            )
        ),
    ]
    updates = [
        _update(model, layout, s, seed=i, n=n)
        for i, (s, n) in enumerate(zip(specs, [5, 17, 3], strict=True))
    ]
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    new = R.aggregate(global_state, updates, layout)
    reference = _numpy_reference(global_state, updates, layout)
    for key in global_state:
        np.testing.assert_allclose(
            new[key].numpy(), reference[key], rtol=2e-6, atol=2e-6, err_msg=key
        )
    # Elements nobody trained keep their value exactly; here the last FFN neuron
    # of layer 1 and the last head group in both layers.
    down = layout.layers[1].modules["ffn_out"] + ".weight"
    assert torch.equal(new[down][:, f - 1], global_state[down][:, f - 1])
    assert g == 2
    k_key = layout.layers[0].modules["key"] + ".weight"
    assert not torch.equal(new[k_key], global_state[k_key])


def test_equal_full_width_updates_equal_fedavg(model, layout):
    spec = layout.full_spec()
    updates = [_update(model, layout, spec, seed=i, n=n) for i, n in enumerate([10, 30, 60])]
    new = R.aggregate(model.state_dict(), updates, layout)
    for key in model.state_dict():
        expected = np.average(
            np.stack([u[1][key].numpy() for u in updates]), axis=0, weights=[u[2] for u in updates]
        )
        np.testing.assert_allclose(new[key].numpy(), expected, rtol=1e-6, atol=1e-6)


def test_coverage_and_pseudo_gradient(model, layout):
    updates = [_update(model, layout, R.SubnetSpec.uniform(2, 1, 8), seed=0, n=4)]
    global_state = model.state_dict()
    new, coverage = R.aggregate_with_coverage(global_state, updates, layout)
    delta = R.pseudo_gradient(global_state, new)
    for key, covered in coverage.items():
        covered = covered.expand_as(global_state[key])
        assert torch.all(delta[key][~covered] == 0), key
        torch.testing.assert_close(delta[key], global_state[key] - new[key])
    q = layout.layers[0].modules["query"] + ".weight"
    rows = layout.group_size * layout.head_dim
    assert coverage[q].expand_as(global_state[q])[:rows].all()
    assert not coverage[q].expand_as(global_state[q])[rows:].any()


def test_no_updates_keeps_the_model(model, layout):
    new = R.aggregate(model.state_dict(), [], layout)
    assert all(torch.equal(new[k], v) for k, v in model.state_dict().items())


def _bad(kind, model, layout):
    spec = R.SubnetSpec.uniform(2, 1, 8)
    spec_, state, n = _update(model, layout, spec, seed=9, n=5)
    q = layout.layers[0].modules["query"] + ".weight"
    if kind == "wrong-shape":
        state[q] = torch.zeros(state[q].shape[0] + 1, state[q].shape[1])
    elif kind == "nan":
        state[q] = state[q].clone()
        state[q][0, 0] = float("nan")
    elif kind == "inf":
        state[q] = state[q].clone()
        state[q][1, 2] = float("inf")
    elif kind == "missing-key":
        del state[q]
    elif kind == "extra-key":
        state["classifier.extra"] = torch.zeros(2)
    elif kind == "spec-mismatch":
        spec_ = R.SubnetSpec.uniform(2, 2, 8)  # claims two groups, sends one
    else:
        n = {
            "zero-examples": 0,
            "negative-examples": -3,
            "float-examples": 2.5,
            "bool-examples": True,
        }[kind]
    return spec_, state, n


@pytest.mark.parametrize(
    "kind, message",
    [
        ("wrong-shape", r"has shape \(25, 48\), expected \(24, 48\)"),
        ("nan", "contains NaN or Inf"),
        ("inf", "contains NaN or Inf"),
        ("missing-key", "missing 1 key"),
        ("extra-key", "unexpected 1 key.*classifier.extra"),
        ("spec-mismatch", r"k_proj.weight' has shape \(8, 48\), expected \(16, 48\)"),
        ("zero-examples", "num-examples must be a positive integer, got 0"),
        ("negative-examples", "positive integer, got -3"),
        ("float-examples", "positive integer, got 2.5"),
        ("bool-examples", "positive integer, got True"),
    ],
    ids=lambda value: value if not any(c in value for c in " (\\") else "",
)
def test_bad_update_is_rejected_and_nothing_changes(kind, message, model, layout):
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    snapshot = {k: v.clone() for k, v in global_state.items()}
    good = _update(model, layout, layout.full_spec(), seed=1, n=7)
    with pytest.raises(R.UpdateError, match=f"update 1: .*{message}"):
        R.aggregate(global_state, [good, _bad(kind, model, layout)], layout)
    assert all(torch.equal(global_state[k], snapshot[k]) for k in snapshot)


def test_keys_subset_aggregates_only_those(model, layout):
    """Only some tensors travel (as with adapters); the others are copied."""
    keys = [k for k in model.state_dict() if k.startswith("score")]
    assert keys
    spec = R.SubnetSpec.uniform(2, 1, 8)
    _, state, _ = _update(model, layout, spec, seed=3, n=2)
    new = R.aggregate(
        model.state_dict(), [(spec, {k: state[k] for k in keys}, 2)], layout, keys=keys
    )
    for key, value in model.state_dict().items():
        if key in keys:
            assert torch.equal(new[key], state[key])
        else:
            assert torch.equal(new[key], value)


def test_aggregate_memory_is_streaming():
    """Peak extra memory grows with the model, not with the number of updates.

    ``ru_maxrss`` only grows, so one process aggregates 2 and then 16 updates:
    if memory grew per update, the second peak would be far above the first.
    """
    script = textwrap.dedent("""
        import resource, torch, transformers as T, raffm_core as R
        cfg = T.BertConfig(vocab_size=30, hidden_size=512, num_hidden_layers=4,
                           num_attention_heads=8, intermediate_size=4096)
        with torch.device("meta"):
            model = T.BertForSequenceClassification(cfg)
        model.to_empty(device="cpu")
        state = {k: torch.nn.init.ones_(v) if v.is_floating_point() else v
                 for k, v in model.state_dict().items()}
        layout = R.describe(model)
        spec = R.SubnetSpec.uniform(4, 4, 2048)
        sub = R.extract_state_dict(state, layout, spec)
        peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        before = peak()
        for n in (2, 16):
            R.aggregate(state, [(spec, sub, 3)] * n, layout)  # shared tensors: inputs cost 0
            print(peak() - before)
    """)
    out = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "PYTHONPATH": str(ROOT)},  # this checkout's raffm_core
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    grown_2, grown_16 = (float(x) for x in out.stdout.split())
    model_mb = (4 * (4 * 512 * 512 + 2 * 512 * 4096) + 30 * 512 + 512 * 512) * 4 / 2**20
    assert grown_16 < grown_2 + 0.25 * model_mb, (grown_2, grown_16, model_mb)
    assert grown_16 < 2.5 * model_mb, (grown_2, grown_16, model_mb)
