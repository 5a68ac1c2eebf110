"""Extraction gives a real smaller model equal to manual slicing; it rebuilds and reloads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as T

import raffm_core as R
from tests.models import FAMILY_NAMES, LINEAR_FAMILIES, tiny_inputs, tiny_model

ROOT = Path(__file__).resolve().parents[1]


def _heads(model) -> tuple[int, int]:
    cfg = model.config
    n_q = cfg.n_heads if cfg.model_type == "distilbert" else cfg.num_attention_heads
    return n_q, getattr(cfg, "num_key_value_heads", n_q)


def _mixed_spec(layout) -> R.SubnetSpec:
    """Prefix widths in layer 0, explicit (non-prefix) index sets in layer 1."""
    g, f = layout.num_groups, layout.ffn_size
    return R.SubnetSpec(
        (
            R.LayerSpec(heads=max(1, g // 2), ffn=f // 2),
            R.LayerSpec(heads=[g - 1, 0] if g > 1 else [0], ffn=list(range(1, f, 3))),
        )
    )


def _prioritized_and_extracted(family: str):
    """A prioritized tiny ``family`` model, its layout, :func:`_mixed_spec` and that sub-model."""
    model = tiny_model(family)
    R.prioritize(model)
    layout = R.describe(model)
    spec = _mixed_spec(layout)
    return model, layout, spec, R.extract_submodel(model, spec)


def _rows(width, block: int) -> np.ndarray:
    """Oracle for kept positions: written from the definition, not from layout.expand."""
    units = range(width) if isinstance(width, int) else width
    return np.array([u * block + j for u in units for j in range(block)])


@pytest.mark.parametrize("family", LINEAR_FAMILIES)  # GPT-2: tests/test_gpt2.py
def test_extracted_weights_equal_manual_slices(family):
    model, layout, spec, sub = _prioritized_and_extracted(family)
    n_q, n_kv = _heads(model)
    d, g = layout.head_dim, n_q // n_kv
    full, small = model.state_dict(), sub.state_dict()
    assert set(full) == set(small)
    for layer, kept in zip(layout.layers, spec.layers, strict=True):
        m = layer.modules
        q_rows, kv_rows = _rows(kept.heads, g * d), _rows(kept.heads, d)
        ffn = _rows(kept.ffn, 1)
        expected = {
            m["query"] + ".weight": full[m["query"] + ".weight"].numpy()[q_rows],
            m["key"] + ".weight": full[m["key"] + ".weight"].numpy()[kv_rows],
            m["value"] + ".weight": full[m["value"] + ".weight"].numpy()[kv_rows],
            m["attn_out"] + ".weight": full[m["attn_out"] + ".weight"].numpy()[:, q_rows],
            m["ffn_out"] + ".weight": full[m["ffn_out"] + ".weight"].numpy()[:, ffn],
        }
        for role in (r for r in m if r.startswith("ffn_in")):
            expected[m[role] + ".weight"] = full[m[role] + ".weight"].numpy()[ffn]
        for role, rows in (("query", q_rows), ("key", kv_rows), ("value", kv_rows)):
            if m[role] + ".bias" in full:
                expected[m[role] + ".bias"] = full[m[role] + ".bias"].numpy()[rows]
        for key, value in expected.items():
            np.testing.assert_array_equal(small[key].numpy(), value, err_msg=key)
            assert isinstance(sub.get_submodule(key.rsplit(".", 1)[0]), torch.nn.Linear)
    elastic = {c.key for x in layout.layers for c in (*x.heads, *x.ffn)}
    for key in set(full) - elastic:
        assert torch.equal(full[key], small[key]), key
    assert sum(p.numel() for p in sub.parameters()) < sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family", LINEAR_FAMILIES)  # GPT-2: tests/test_gpt2.py
def test_submodel_computes_the_full_model_with_removed_units_zeroed(family):
    """Oracle: dropping a head or neuron equals zeroing its output-projection columns."""
    model, layout, spec, sub = _prioritized_and_extracted(family)
    n_q, n_kv = _heads(model)
    d, g = layout.head_dim, n_q // n_kv
    masked = tiny_model(family)
    masked.load_state_dict(model.state_dict())
    with torch.no_grad():
        for layer, kept in zip(layout.layers, spec.layers, strict=True):
            out = masked.get_submodule(layer.modules["attn_out"]).weight
            keep = torch.zeros(out.shape[1], dtype=torch.bool)
            keep[_rows(kept.heads, g * d)] = True
            out[:, ~keep] = 0
            down = masked.get_submodule(layer.modules["ffn_out"]).weight
            keep = torch.zeros(down.shape[1], dtype=torch.bool)
            keep[_rows(kept.ffn, 1)] = True
            down[:, ~keep] = 0
    inputs = tiny_inputs(family)
    with torch.no_grad():
        expected, got = masked(**inputs).logits, sub(**inputs).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_full_width_spec_reproduces_the_model_exactly(family, attn):
    model = tiny_model(family, attn)
    layout = R.describe(model)
    sub = R.extract_submodel(model, layout.full_spec())
    for key, value in model.state_dict().items():
        assert torch.equal(sub.state_dict()[key], value), key
    for key, value in dict(model.named_buffers()).items():
        assert torch.equal(dict(sub.named_buffers())[key], value), key
    inputs = tiny_inputs(family)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, sub(**inputs).logits)
    assert sub.config._attn_implementation == attn


def test_extraction_shares_no_storage_and_leaves_the_model_alone():
    model = tiny_model("bert")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    sub = R.extract_submodel(model, R.select_subnet(model, "params=0.8"))
    with torch.no_grad():
        for p in sub.parameters():
            p.add_(1.0)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_rebuild_from_config_spec_and_arrays(family):
    """What a client does: (base config, spec JSON, flat arrays) -> the same sub-model."""
    model, layout, spec, sub = _prioritized_and_extracted(family)
    wire_config = R.base_config(model).to_json_string()
    arrays = {
        k: v.numpy().copy()
        for k, v in R.extract_state_dict(model.state_dict(), layout, spec).items()
    }

    config = T.AutoConfig.for_model(**json.loads(wire_config))
    rebuilt = R.build_submodel(
        config,
        R.SubnetSpec.from_json(spec.to_json()),
        {k: torch.from_numpy(v) for k, v in arrays.items()},
    )
    inputs = tiny_inputs(family)
    with torch.no_grad():
        assert torch.equal(rebuilt(**inputs).logits, sub(**inputs).logits)
    assert R.spec_of(rebuilt) == spec


def test_rebuild_rejects_weights_that_do_not_match_the_spec():
    model = tiny_model("bert")
    layout = R.describe(model)
    spec = R.SubnetSpec.uniform(layout.num_layers, 2, 20)
    state = R.extract_state_dict(model.state_dict(), layout, spec)
    key = layout.layers[0].modules["ffn_out"] + ".weight"
    state[key] = state[key][:, :10]
    with pytest.raises(R.SpecError, match=r"ffn_out|output\.dense.*\(48, 10\).*\(48, 20\)"):
        R.build_submodel(R.base_config(model), spec, state)


def test_rebuild_does_not_materialize_the_full_model(tmp_path):
    """A 4 GB full model rebuilt as a tiny sub-model stays far below 4 GB of memory."""
    script = textwrap.dedent("""
        import resource, torch, transformers as T, raffm_core as R
        cfg = T.BertConfig(vocab_size=100, hidden_size=1024, num_hidden_layers=1,
                           num_attention_heads=16, intermediate_size=500_000,
                           max_position_embeddings=16)
        cfg.architectures = ["BertForSequenceClassification"]
        spec = R.SubnetSpec.uniform(1, 2, 64)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        sub = R.build_submodel(cfg, spec)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((after - before) / 1024, sum(p.numel() for p in sub.parameters()))
    """)
    out = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "PYTHONPATH": str(ROOT)},  # this checkout's raffm_core
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    grew_mb, params = out.stdout.split()
    assert float(grew_mb) < 200, f"rebuilding grew peak memory by {grew_mb} MB"
    assert int(params) < 3_000_000  # the full model has 1.03 billion


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_save_load_round_trip_is_exact(family, tmp_path):
    model = tiny_model(family)
    R.prioritize(model)
    layout = R.describe(model)
    sub = R.extract_submodel(model, _mixed_spec(layout))
    R.save_submodel(sub, tmp_path / "sub")
    loaded = R.load_submodel(tmp_path / "sub")
    assert type(loaded) is type(sub)
    assert R.spec_of(loaded) == R.spec_of(sub)
    for key, value in sub.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    inputs = tiny_inputs(family)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, sub(**inputs).logits)


def test_extracting_from_a_submodel_is_an_error():
    model = tiny_model("bert")
    sub = R.extract_submodel(model, R.SubnetSpec.uniform(2, 2, 20))
    with pytest.raises(R.SpecError, match="full model"):
        R.extract_submodel(sub, R.SubnetSpec.uniform(2, 1, 10))


@pytest.mark.parametrize(
    "spec, message",
    [
        (R.SubnetSpec.uniform(3, 2, 20), "3 layers.*has 2"),
        (R.SubnetSpec.uniform(2, 5, 20), "heads 5 exceed the 4 head groups"),
        (R.SubnetSpec.uniform(2, 2, 41), "ffn 41 exceeds the 40 neurons"),
        (R.SubnetSpec.uniform(2, [0, 4], 20), r"heads \(0, 4\) exceed"),
    ],
    ids=["layers", "heads", "ffn", "index-out-of-range"],
)
def test_spec_that_does_not_fit_is_an_error(spec, message):
    with pytest.raises(R.SpecError, match=message):
        R.extract_submodel(tiny_model("bert"), spec)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_width_scaler_equals_output_columns_scaled_by_kept_fraction(family):
    """Oracle: the scaler is the sub-model with its output-projection weights times G/g, F/f."""
    model, layout, spec, sub = _prioritized_and_extracted(family)
    scaled = R.extract_submodel(model, spec)
    with torch.no_grad():
        for layer, kept in zip(layout.layers, spec.layers, strict=True):
            for role, size, width in (
                ("attn_out", layout.num_groups, kept.heads),
                ("ffn_out", layout.ffn_size, kept.ffn),
            ):
                count = width if isinstance(width, int) else len(width)
                scaled.get_submodule(layer.modules[role]).weight.mul_(size / count)
    inputs = tiny_inputs(family)
    with torch.no_grad():
        plain = sub(**inputs).logits
        with R.width_scaler(sub):
            got = sub(**inputs).logits
        after = sub(**inputs).logits
        expected = scaled(**inputs).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, plain)
    torch.testing.assert_close(after, plain, rtol=0, atol=0)  # hooks removed on exit


def test_width_scaler_leaves_a_full_model_alone():
    model = tiny_model("bert")
    inputs = tiny_inputs("bert")
    with torch.no_grad():
        plain = model(**inputs).logits
        with R.width_scaler(model):
            got = model(**inputs).logits
    torch.testing.assert_close(got, plain, rtol=0, atol=0)
