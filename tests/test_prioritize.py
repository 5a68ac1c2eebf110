"""Prioritization preserves the function and orders units by salience."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers as T

import raffm_core as R
from tests.models import FAMILY_NAMES, LINEAR_FAMILIES, minilm_path, tiny_inputs, tiny_model


def _output(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def _max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("norm", ["l1", "l2"])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_prioritize_preserves_outputs(family, attn, norm):
    model = tiny_model(family, attn)
    assert model.config._attn_implementation == attn
    inputs = tiny_inputs(family)
    before = _output(model, inputs)
    weights_before = {k: v.clone() for k, v in model.state_dict().items()}

    permutation = R.prioritize(model, norm=norm)

    assert not permutation.is_identity, "a random model should need reordering"
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, weights_before[k])]
    assert changed, "prioritization changed no weight"
    assert _max_rel_diff(before, _output(model, inputs)) <= 1e-5


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_prioritize_is_a_fixed_point(family):
    model = tiny_model(family)
    R.prioritize(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert R.prioritize(model).is_identity
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def _np(model, key) -> np.ndarray:
    return model.state_dict()[key].detach().numpy().astype(np.float64)


@pytest.mark.parametrize("family", LINEAR_FAMILIES)  # GPT-2's oracle: tests/test_gpt2.py
def test_units_are_sorted_by_l1_salience(family):
    """Oracle: salience recomputed with numpy from the module weights directly."""
    model = tiny_model(family)
    R.prioritize(model, norm="l1")
    layout = R.describe(model)
    n_q = model.config.num_attention_heads if family != "distilbert" else model.config.n_heads
    n_kv = getattr(model.config, "num_key_value_heads", n_q)
    d = layout.head_dim
    for layer in layout.layers:
        mods = layer.modules
        q = _np(model, mods["query"] + ".weight").reshape(
            n_kv, -1, q_in := _np(model, mods["query"] + ".weight").shape[1]
        )
        k = _np(model, mods["key"] + ".weight").reshape(n_kv, d, q_in)
        v = _np(model, mods["value"] + ".weight").reshape(n_kv, d, q_in)
        o = _np(model, mods["attn_out"] + ".weight").reshape(q_in, n_kv, -1)
        head_salience = (
            np.abs(q).sum((1, 2))
            + np.abs(k).sum((1, 2))
            + np.abs(v).sum((1, 2))
            + np.abs(o).sum((0, 2))
        )
        assert np.all(np.diff(head_salience) <= 1e-9), head_salience

        ffn_in = [k for k in mods if k.startswith("ffn_in")]
        neuron = sum(np.abs(_np(model, mods[r] + ".weight")).sum(1) for r in ffn_in)
        neuron = neuron + np.abs(_np(model, mods["ffn_out"] + ".weight")).sum(0)
        assert np.all(np.diff(neuron) <= 1e-9)

        if layer.query_key:  # Eq. 5 within each head
            qc = np.abs(_np(model, mods["query"] + ".weight")).sum(1).reshape(n_q, d)
            kc = np.abs(_np(model, mods["key"] + ".weight")).sum(1).reshape(n_q, d)
            assert np.all(np.diff((qc + kc) / 2, axis=1) <= 1e-9)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_rotary_families_keep_channel_order_within_heads(family):
    layout = R.describe(tiny_model(family))
    assert all(not layer.query_key for layer in layout.layers)
    assert layout.group_size > 1  # the tiny configs use grouped-query attention


@pytest.mark.parametrize("family", ["bert", "distilbert", "vit"])
def test_absolute_families_rank_query_key_channels(family):
    layout = R.describe(tiny_model(family))
    assert all(layer.query_key for layer in layout.layers)


def test_gqa_group_moves_with_its_query_heads():
    """Oracle: the permuted K rows of group g pair with Q rows of the same group."""
    model = tiny_model("llama")
    layout = R.describe(model)
    layer = layout.layers[0]
    k_before = _np(model, layer.modules["key"] + ".weight")
    q_before = _np(model, layer.modules["query"] + ".weight")
    perm = R.prioritize(model).layers[0].heads.numpy()
    d, g = layout.head_dim, layout.group_size
    k_after = _np(model, layer.modules["key"] + ".weight")
    q_after = _np(model, layer.modules["query"] + ".weight")
    for new, old in enumerate(perm):
        np.testing.assert_array_equal(
            k_after[new * d : (new + 1) * d], k_before[old * d : (old + 1) * d]
        )
        np.testing.assert_array_equal(
            q_after[new * g * d : (new + 1) * g * d], q_before[old * g * d : (old + 1) * g * d]
        )


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_prioritize_preserves_pretrained_minilm(attn):
    model = T.AutoModelForSequenceClassification.from_pretrained(
        minilm_path(), num_labels=2, attn_implementation=attn
    ).eval()
    tok = T.AutoTokenizer.from_pretrained(minilm_path())
    batch = tok(
        ["a gripping, beautifully acted film .", "dull and far too long ."],
        padding=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        before = model.bert(**batch).last_hidden_state
    permutation = R.prioritize(model)
    with torch.no_grad():
        after = model.bert(**batch).last_hidden_state
    assert _max_rel_diff(before, after) <= 1e-5
    # Real weights give a non-trivial ranking in every layer.
    assert all(not torch.equal(p.ffn, torch.arange(len(p.ffn))) for p in permutation.layers)
    assert any(not torch.equal(p.heads, torch.arange(len(p.heads))) for p in permutation.layers)


def test_unknown_norm_is_an_error_and_changes_nothing():
    model = tiny_model("bert")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(R.RaffmError, match="unknown norm 'l3'.*l1, l2"):
        R.prioritize(model, norm="l3")
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_unsupported_architecture_lists_supported_ones():
    config = T.OPTConfig(
        num_hidden_layers=1, hidden_size=32, num_attention_heads=4, ffn_dim=40, vocab_size=50
    )
    model = T.OPTForSequenceClassification(config)
    with pytest.raises(R.UnsupportedModelError, match="'opt'.*bert.*distilbert.*vit.*llama.*gpt2"):
        R.prioritize(model)


def test_permute_state_keeps_a_mirror_aligned():
    """A copy permuted with the returned permutation equals the prioritized model."""
    model = tiny_model("qwen2")
    mirror = {k: v.clone() for k, v in model.state_dict().items()}
    layout = R.describe(model)
    permutation = R.prioritize(model)
    R.permute_state(mirror, layout, permutation)
    for key, value in model.state_dict().items():
        assert torch.equal(value, mirror[key]), key
