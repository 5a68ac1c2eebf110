"""The GPT-2 family (GPT-2, DistilGPT2) against oracles written from its raw tensors.

GPT-2's projections are ``Conv1D``: weight ``(in, out)``, so a unit's weights
are *columns* of ``c_attn`` and ``mlp.c_fc`` and *rows* of the two ``c_proj``.
``attn.c_attn`` is Q, K and V side by side (``(hidden, 3 H)``, ``H = heads x
head_dim``), each grouped by head. The oracles below index these tensors
directly with numpy, never through :mod:`raffm_core.layout`.
"""

from __future__ import annotations

import numpy as np
import peft
import pytest
import torch
import transformers as T
from transformers.pytorch_utils import Conv1D

import raffm_core as R
from raffm_core.families import find_family
from raffm_core.lora import default_target_modules, from_peft_keys, with_lora
from tests.models import tiny_gpt2, tiny_inputs

HEADS = ["seq-cls", "causal-lm"]
VARIANTS = {"gpt2": {}, "distilgpt2": {"n_layer": 3, "n_inner": None}}  # 4 x n_embd FFN


def _out(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def _np(state, key) -> np.ndarray:
    return state[key].detach().numpy().astype(np.float64)


def _dims(model) -> tuple[int, int, int]:
    """Heads, head size and ``H = heads x head_dim`` from the config alone."""
    n, hidden = model.config.n_head, model.config.n_embd
    return n, hidden // n, hidden


def _qkv_cols(heads, d: int, big_h: int) -> np.ndarray:
    """``c_attn`` columns of ``heads`` in Q, then K, then V."""
    return np.array([s * big_h + h * d + j for s in range(3) for h in heads for j in range(d)])


def _units(width) -> list[int]:
    return list(range(width)) if isinstance(width, int) else list(width)


def _mixed_spec(model) -> R.SubnetSpec:
    """Prefix widths in layer 0, non-prefix index sets in every other layer."""
    n, ffn = model.config.n_head, R.describe(model).ffn_size
    rest = [R.LayerSpec([n - 1, 1], list(range(1, ffn, 3)))] * (model.config.n_layer - 1)
    return R.SubnetSpec((R.LayerSpec(2, ffn // 2), *rest))


def kept_index(key: str, spec: R.SubnetSpec, config, ndim: int) -> tuple:
    """Positions of state-dict ``key`` that ``spec`` keeps, per axis (numpy indexing).

    Written from GPT-2's layout as documented, not from :mod:`raffm_core.layout`.
    """
    out: list = [slice(None)] * ndim
    if not key.startswith("transformer.h."):
        return tuple(out)
    d, big_h = config.n_embd // config.n_head, config.n_embd
    kept = spec.layers[int(key.split(".")[2])]
    heads, ffn = _units(kept.heads), np.array(_units(kept.ffn))
    rows = np.array([h * d + j for h in heads for j in range(d)])
    axis_units = {
        "attn.c_attn.weight": (1, _qkv_cols(heads, d, big_h)),
        "attn.c_attn.bias": (0, _qkv_cols(heads, d, big_h)),
        "attn.c_proj.weight": (0, rows),
        "mlp.c_fc.weight": (1, ffn),
        "mlp.c_fc.bias": (0, ffn),
        "mlp.c_proj.weight": (0, ffn),
    }
    name = key.split(".", 3)[3]
    if name in axis_units:
        axis, units = axis_units[name]
        out[axis] = units
    return tuple(out)


def test_gpt2_is_one_family_entry():
    family = find_family("gpt2")
    assert family.transposed and family.fused_qkv
    assert family.query == family.key == family.value == "attn.c_attn"
    assert default_target_modules(family) == ("c_attn",)  # peft's usual GPT-2 target


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("head", HEADS)
def test_prioritize_preserves_outputs(head, attn, variant):
    model = tiny_gpt2(head, attn, **VARIANTS[variant])
    assert model.config._attn_implementation == attn
    inputs = tiny_inputs("gpt2")
    before = _out(model, inputs)
    permutation = R.prioritize(model)
    assert not permutation.is_identity
    after = _out(model, inputs)
    assert float((before - after).abs().max() / before.abs().max()) <= 1e-5


def test_units_are_sorted_by_l1_salience_of_raw_tensors():
    model = tiny_gpt2()
    R.prioritize(model)
    n, d, big_h = _dims(model)
    state = model.state_dict()
    for i in range(model.config.n_layer):
        p = f"transformer.h.{i}."
        qkv = np.abs(_np(state, p + "attn.c_attn.weight"))  # (hidden, 3H)
        out = np.abs(_np(state, p + "attn.c_proj.weight"))  # (H, hidden)
        heads = qkv.reshape(-1, 3, n, d).sum((0, 1, 3)) + out.reshape(n, d, -1).sum((1, 2))
        assert np.all(np.diff(heads) <= 1e-9), heads
        neurons = np.abs(_np(state, p + "mlp.c_fc.weight")).sum(0)
        neurons += np.abs(_np(state, p + "mlp.c_proj.weight")).sum(1)
        assert np.all(np.diff(neurons) <= 1e-9), neurons
        q, k = qkv[:, :big_h].sum(0).reshape(n, d), qkv[:, big_h : 2 * big_h].sum(0).reshape(n, d)
        assert np.all(np.diff((q + k) / 2, axis=1) <= 1e-9)  # Eq. 5 within each head


def test_permutation_moves_q_k_channels_and_whole_v_heads():
    """Column (h, j) of Q and K comes from (heads[h], query_key[h, j]); V keeps j."""
    model = tiny_gpt2()
    n, d, big_h = _dims(model)
    key = "transformer.h.0.attn.c_attn."
    before = {s: _np(model.state_dict(), key + s) for s in ("weight", "bias")}
    perm = R.prioritize(model).layers[0]
    after = {s: _np(model.state_dict(), key + s) for s in ("weight", "bias")}
    assert perm.query_key is not None
    for h, old in enumerate(perm.heads.tolist()):
        for j in range(d):
            for section in range(3):
                channel = int(perm.query_key[h, j]) if section < 2 else j
                new_col, old_col = section * big_h + h * d + j, section * big_h + old * d + channel
                for s in ("weight", "bias"):
                    np.testing.assert_array_equal(after[s][..., new_col], before[s][..., old_col])


@pytest.mark.parametrize("head", HEADS)
def test_extraction_equals_manual_slicing(head):
    model = tiny_gpt2(head)
    R.prioritize(model)
    spec = _mixed_spec(model)
    sub = R.extract_submodel(model, spec)
    assert type(sub) is type(model)
    n, d, big_h = _dims(model)
    full, small = model.state_dict(), sub.state_dict()
    assert set(full) == set(small)
    elastic = set()
    for i, kept in enumerate(spec.layers):
        p = f"transformer.h.{i}."
        heads, ffn = _units(kept.heads), np.array(_units(kept.ffn))
        cols = _qkv_cols(heads, d, big_h)
        rows = np.array([h * d + j for h in heads for j in range(d)])
        expected = {
            p + "attn.c_attn.weight": _np(full, p + "attn.c_attn.weight")[:, cols],
            p + "attn.c_attn.bias": _np(full, p + "attn.c_attn.bias")[cols],
            p + "attn.c_proj.weight": _np(full, p + "attn.c_proj.weight")[rows, :],
            p + "mlp.c_fc.weight": _np(full, p + "mlp.c_fc.weight")[:, ffn],
            p + "mlp.c_fc.bias": _np(full, p + "mlp.c_fc.bias")[ffn],
            p + "mlp.c_proj.weight": _np(full, p + "mlp.c_proj.weight")[ffn, :],
        }
        for key, value in expected.items():
            np.testing.assert_array_equal(_np(small, key), value, err_msg=key)
        elastic |= set(expected)
        attn = sub.transformer.h[i].attn
        assert isinstance(attn.c_attn, Conv1D) and attn.c_attn.nf == 3 * len(heads) * d
        assert attn.split_size == len(heads) * d
        assert isinstance(sub.transformer.h[i].mlp.c_fc, Conv1D)
    for key in set(full) - elastic:
        assert torch.equal(full[key], small[key]), key


@pytest.mark.parametrize("head", HEADS)
def test_submodel_equals_full_model_with_removed_units_zeroed(head):
    """Dropping a head or neuron equals zeroing its rows of the output projection."""
    model = tiny_gpt2(head)
    R.prioritize(model)
    spec = _mixed_spec(model)
    sub = R.extract_submodel(model, spec)
    _, d, _ = _dims(model)
    with torch.no_grad():
        for i, kept in enumerate(spec.layers):
            block = model.transformer.h[i]
            keep = torch.zeros(block.attn.c_proj.weight.shape[0], dtype=torch.bool)
            keep[[h * d + j for h in _units(kept.heads) for j in range(d)]] = True
            block.attn.c_proj.weight[~keep] = 0
            keep = torch.zeros(block.mlp.c_proj.weight.shape[0], dtype=torch.bool)
            keep[_units(kept.ffn)] = True
            block.mlp.c_proj.weight[~keep] = 0
    inputs = tiny_inputs("gpt2")
    torch.testing.assert_close(_out(sub, inputs), _out(model, inputs), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("head", HEADS)
def test_submodel_save_pretrained_round_trip(head, tmp_path):
    model = tiny_gpt2(head)
    R.prioritize(model)
    inputs = tiny_inputs("gpt2")
    sub = R.extract_submodel(model, _mixed_spec(model))
    sub.save_pretrained(tmp_path / "sub")
    loaded = R.load_submodel(tmp_path / "sub")
    assert type(loaded) is type(model) and R.spec_of(loaded) == R.spec_of(sub)
    assert torch.equal(_out(loaded, inputs), _out(sub, inputs))
    # All heads and fewer neurons everywhere: a stock GPT-2 config says so (n_inner).
    spec = R.SubnetSpec.uniform(model.config.n_layer, model.config.n_head, 24)
    assert R.export_submodel(model, spec, tmp_path / "plain") == "transformers"
    plain = type(model).from_pretrained(tmp_path / "plain").eval()
    assert plain.config.n_inner == 24
    torch.testing.assert_close(
        _out(plain, inputs), _out(R.extract_submodel(model, spec), inputs), rtol=1e-6, atol=1e-6
    )


def test_aggregation_with_partial_coverage_matches_numpy():
    model = tiny_gpt2("causal-lm")  # tied lm_head: aggregated once, through wte
    R.prioritize(model)
    layout = R.describe(model)
    n, d, big_h = _dims(model)
    specs = [
        R.SubnetSpec.uniform(2, 1, 8),
        R.SubnetSpec.uniform(2, 2, 24),
        R.SubnetSpec((R.LayerSpec([2], [3, 5, 30, 39]), R.LayerSpec(1, list(range(10, 20))))),
    ]
    updates = []
    for seed, (spec, examples) in enumerate(zip(specs, [5, 17, 3], strict=True)):
        g = torch.Generator().manual_seed(seed)
        sliced = R.extract_state_dict(model.state_dict(), layout, spec)
        noisy = {k: v + torch.randn(v.shape, generator=g) for k, v in sliced.items()}
        updates.append((spec, noisy, examples))
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    new = R.aggregate(global_state, updates, layout)

    for key, old_tensor in global_state.items():
        old = old_tensor.numpy().astype(np.float64)
        num, den = np.zeros_like(old), np.zeros_like(old)
        for spec, state, examples in updates:
            where = kept_index(key, spec, model.config, old.ndim)
            num[where] += examples * state[key].numpy()
            den[where] += examples
        expected = np.where(den > 0, num / np.where(den > 0, den, 1), old)
        np.testing.assert_allclose(new[key].numpy(), expected, rtol=2e-6, atol=2e-6, err_msg=key)
    # Head 3 of layer 0 is in no slice: its Q, K and V columns keep their values.
    qkv = "transformer.h.0.attn.c_attn.weight"
    untouched = _qkv_cols([3], d, big_h)
    assert torch.equal(new[qkv][:, untouched], global_state[qkv][:, untouched])
    assert not torch.equal(new[qkv], global_state[qkv])


@pytest.mark.parametrize("head", HEADS)
def test_budget_counts_the_submodel_it_builds(head):
    model = tiny_gpt2(head)
    layout = R.describe(model)
    n, d, _ = _dims(model)
    hidden = model.config.n_embd
    # Per head: Q, K, V columns and biases of c_attn, rows of c_proj.
    assert layout.unit_params() == (3 * (hidden + 1) * d + d * hidden, 2 * hidden + 1)
    spec = _mixed_spec(model)
    sub = R.extract_submodel(model, spec)
    assert layout.count_params(spec) == sum(p.numel() for p in sub.parameters())
    assert layout.total_params == sum(p.numel() for p in model.parameters())
    assert layout.hidden_size == hidden


def test_lora_on_c_attn_slices_b_by_q_k_v_sections():
    model = tiny_gpt2()
    R.prioritize(model)
    n, d, big_h = _dims(model)
    layout = with_lora(R.describe(model), ["c_attn"], rank=4)
    spec = _mixed_spec(model)  # before peft replaces c_attn in place
    config = peft.LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True)
    wrapped = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p))
    adapters = from_peft_keys(peft.get_peft_model_state_dict(wrapped))
    sliced = R.extract_state_dict(adapters, layout, spec)
    for i, kept in enumerate(spec.layers):
        key = f"transformer.h.{i}.attn.c_attn.lora_"
        cols = _qkv_cols(_units(kept.heads), d, big_h)
        b, a = _np(adapters, key + "B.weight"), _np(adapters, key + "A.weight")
        assert b.shape == (3 * big_h, 4) and a.shape == (4, model.config.n_embd)
        np.testing.assert_array_equal(_np(sliced, key + "B.weight"), b[cols])
        np.testing.assert_array_equal(_np(sliced, key + "A.weight"), a)


def test_unsupported_architecture_still_lists_gpt2_among_the_supported():
    config = T.GPTNeoXConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4
    )
    with pytest.raises(R.UnsupportedModelError, match="'gpt_neox'.*bert.*llama.*gpt2"):
        R.describe(T.GPTNeoXForCausalLM(config))
