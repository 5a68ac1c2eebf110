"""The T5 family (T5, T5 v1.1 / FLAN-T5, mT5): prioritization, extraction, budgets, aggregation.

The oracle for which positions a spec keeps is written here from T5's module
names (:func:`_kept`), not from the family table or the layout.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import transformers as T

import raffm_core as R
from raffm_core.export import export_submodel
from raffm_core.prioritize import LayerPermutation
from tests.models import SEQ2SEQ_NAMES, UNTIED, tiny_seq2seq, tiny_seq2seq_inputs

ENCODER_LAYERS, DECODER_LAYERS, HEADS, D_KV, D_FF = 2, 3, 4, 8, 40

_ELASTIC = re.compile(
    r"^(encoder|decoder)\.block\.(\d+)\.layer\.\d\."
    r"(?:(SelfAttention|EncDecAttention)\.(q|k|v|o|relative_attention_bias)"
    r"|DenseReluDense\.(wi|wi_0|wi_1|wo))\.weight$"
)


def _kept(key: str, spec: R.SubnetSpec) -> tuple[int, np.ndarray] | None:
    """Oracle: ``(axis, kept positions)`` of a T5 state-dict key under ``spec``, or None."""
    match = _ELASTIC.match(key)
    if match is None:
        return None
    stack, block, _, attn, ffn = match.groups()
    layer = spec.layers[int(block) + (ENCODER_LAYERS if stack == "decoder" else 0)]

    def units(width, size):
        return np.array(list(range(width)) if isinstance(width, int) else width) * size

    if attn == "relative_attention_bias":
        return 1, units(layer.heads, 1)
    if attn is not None:
        rows = (units(layer.heads, D_KV)[:, None] + np.arange(D_KV)).reshape(-1)
        return (1 if attn == "o" else 0), rows
    return (1 if ffn == "wo" else 0), units(layer.ffn, 1)


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def _encoder_out(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model.get_encoder()(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
        ).last_hidden_state


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))


def _stack_spec(enc_heads, enc_ffn, dec_heads, dec_ffn) -> R.SubnetSpec:
    return R.SubnetSpec(
        (
            *[R.LayerSpec(enc_heads, f) for f in enc_ffn],
            *[R.LayerSpec(dec_heads, f) for f in dec_ffn],
        )
    )


# A spec with prefixes in the encoder and index sets in the decoder; the FFN
# differs per layer, the heads per stack (they share a position bias).
MIXED = _stack_spec(2, [20, 7], [0, 3], [[1, 5, 39], 10, list(range(2, 40, 2))])


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("name", SEQ2SEQ_NAMES)
def test_prioritize_preserves_encoder_and_decoder(name, attn):
    model = tiny_seq2seq(name, attn)
    assert model.config._attn_implementation == attn
    inputs = tiny_seq2seq_inputs()
    logits, encoded = _logits(model, inputs), _encoder_out(model, inputs)
    bias_keys = [k for k in model.state_dict() if k.endswith("relative_attention_bias.weight")]
    assert len(bias_keys) == 2  # one per stack, in its first layer
    bias_before = {k: model.state_dict()[k].clone() for k in bias_keys}

    permutation = R.prioritize(model)

    assert not permutation.is_identity
    assert _rel(encoded, _encoder_out(model, inputs)) <= 1e-5
    assert _rel(logits, _logits(model, inputs)) <= 1e-5
    # One head order per stack, and the bias columns follow it.
    enc = [p.heads for p in permutation.layers[:ENCODER_LAYERS]]
    dec = [p.heads for p in permutation.layers[ENCODER_LAYERS:]]
    assert all(torch.equal(h, enc[0]) for h in enc) and all(torch.equal(h, dec[0]) for h in dec)
    for key, order in zip(bias_keys, (enc[0], dec[0]), strict=True):
        assert not torch.equal(order, torch.arange(HEADS)), "the test needs a real reordering"
        assert torch.equal(model.state_dict()[key], bias_before[key][:, order])


def test_per_layer_head_orders_would_break_the_shared_bias():
    """Why one order per stack: permuting one later layer's heads alone changes the output."""
    model = tiny_seq2seq("t5")
    inputs = tiny_seq2seq_inputs()
    before = _encoder_out(model, inputs)
    layout = R.describe(model)
    layers = [
        LayerPermutation(torch.arange(HEADS), torch.arange(D_FF), None)
        for _ in range(layout.num_layers)
    ]
    flipped = torch.tensor([3, 2, 1, 0])
    layers[1] = LayerPermutation(flipped, torch.arange(D_FF), None)  # encoder layer 1 only
    with torch.no_grad():
        R.permute_state(model.state_dict(), layout, R.Permutation(tuple(layers)))
    assert _rel(before, _encoder_out(model, inputs)) > 1e-3


@pytest.mark.parametrize("name", SEQ2SEQ_NAMES)
def test_prioritize_is_a_fixed_point(name):
    model = tiny_seq2seq(name)
    R.prioritize(model)
    assert R.prioritize(model).is_identity


@pytest.mark.parametrize("name", SEQ2SEQ_NAMES)
def test_submodel_is_a_smaller_t5_equal_to_manual_slices(name):
    model = tiny_seq2seq(name)
    R.prioritize(model)
    sub = R.extract_submodel(model, MIXED)
    assert type(sub) is type(model)
    full, small = model.state_dict(), sub.state_dict()
    assert set(full) == set(small)
    sliced = 0
    for key, value in full.items():
        kept = _kept(key, MIXED)
        if kept is None:
            assert torch.equal(small[key], value), key
            continue
        axis, index = kept
        want = np.take(value.numpy(), index, axis=axis)
        np.testing.assert_array_equal(small[key].numpy(), want, err_msg=key)
        sliced += 1
    assert sliced == 2 + ENCODER_LAYERS * 4 + DECODER_LAYERS * 8 + 5 * (
        2 if name == "t5" else 3
    )  # position biases, attention, FFN
    # Heads per attention module, self and cross, as the reshapes use them.
    assert sub.encoder.block[1].layer[0].SelfAttention.n_heads == 2
    assert sub.decoder.block[2].layer[1].EncDecAttention.n_heads == 2
    assert sub.decoder.block[2].layer[1].EncDecAttention.inner_dim == 2 * D_KV
    assert (sub.lm_head.weight is sub.shared.weight) == (name not in UNTIED)
    logits = _logits(sub, tiny_seq2seq_inputs())
    assert logits.shape == (3, 6, model.config.vocab_size) and torch.isfinite(logits).all()


@pytest.mark.parametrize("name", SEQ2SEQ_NAMES)
def test_full_width_submodel_equals_the_model(name):
    model = tiny_seq2seq(name)
    R.prioritize(model)
    layout = R.describe(model)
    inputs = tiny_seq2seq_inputs()
    sub = R.extract_submodel(model, layout.full_spec())
    assert torch.equal(_logits(sub, inputs), _logits(model, inputs))


@pytest.mark.parametrize("name", SEQ2SEQ_NAMES)
def test_save_load_and_generate(name, tmp_path):
    model = tiny_seq2seq(name)
    R.prioritize(model)
    sub = R.extract_submodel(model, MIXED)
    R.save_submodel(sub, tmp_path / "sub")
    loaded = R.load_submodel(tmp_path / "sub")
    assert type(loaded) is type(sub) and R.spec_of(loaded) == MIXED
    for key, value in sub.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    inputs = tiny_seq2seq_inputs()
    assert torch.equal(_logits(loaded, inputs), _logits(sub, inputs))
    with torch.no_grad():
        out = loaded.generate(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            max_new_tokens=4,
            do_sample=False,
            # transformers 5.23 sizes the decoder's KV cache by num_layers (the
            # encoder's depth), here 2 < 3 decoder layers; real checkpoints match.
            use_cache=False,
        )
    assert out.shape[0] == 3 and out.shape[1] <= 5


def test_spec_with_different_heads_in_one_stack_is_an_error():
    model = tiny_seq2seq("t5")
    spec = R.SubnetSpec((R.LayerSpec(2, 10), R.LayerSpec(3, 10), *[R.LayerSpec(4, 10)] * 3))
    with pytest.raises(R.SpecError, match="share a relative position bias"):
        R.extract_submodel(model, spec)


@pytest.mark.parametrize("name", ["t5", "t5-v1_1"])
def test_budget_counts_both_stacks(name):
    model = tiny_seq2seq(name)
    layout = R.describe(model)
    assert layout.num_layers == ENCODER_LAYERS + DECODER_LAYERS
    for spec in (layout.full_spec(), MIXED):
        sub = R.extract_submodel(model, spec)
        assert layout.count_params(spec) == sum(p.numel() for p in sub.parameters())
    spec = R.select_subnet(layout, "params=0.8")
    assert layout.count_params(spec) <= 0.8 * layout.total_params
    for seed in range(5):
        drawn = R.select_subnet(layout, "params=0.8", mode="sample", seed=seed)
        layout.check_spec(drawn)  # heads tied within each stack
        assert layout.count_params(drawn) <= 0.8 * layout.total_params
        assert len({drawn.layers[i].heads for i in range(ENCODER_LAYERS)}) == 1
        assert len({x.heads for x in drawn.layers[ENCODER_LAYERS:]}) == 1
    assert R.TrainingProfile().memory_mb(layout, MIXED) > 0


def test_partial_coverage_aggregation_matches_numpy():
    model = tiny_seq2seq("t5-v1_1")
    R.prioritize(model)
    layout = R.describe(model)
    specs = [
        _stack_spec(1, [4, 4], 2, [8, 8, 8]),
        MIXED,
        _stack_spec([1, 3], [[0, 39], 30], 4, [[7], 5, 40]),
    ]
    counts = [5, 17, 3]
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    updates = []
    for i, (spec, n) in enumerate(zip(specs, counts, strict=True)):
        g = torch.Generator().manual_seed(i)
        sub = R.extract_state_dict(global_state, layout, spec)
        updates.append(
            (spec, {k: v + torch.randn(v.shape, generator=g) for k, v in sub.items()}, n)
        )
    new = R.aggregate(global_state, updates, layout)
    untouched = 0
    for key, old in global_state.items():
        old = old.numpy().astype(np.float64)
        num, den = np.zeros_like(old), np.zeros_like(old)
        for spec, state, n in updates:
            kept = _kept(key, spec)
            index = [slice(None)] * old.ndim
            if kept is not None:
                index[kept[0]] = kept[1]
            full = np.zeros_like(old)
            mask = np.zeros(old.shape, dtype=bool)
            full[tuple(index)], mask[tuple(index)] = state[key].numpy(), True
            num += n * full
            den += n * mask
        want = np.where(den > 0, num / np.where(den > 0, den, 1), old)
        np.testing.assert_allclose(new[key].numpy(), want, rtol=2e-6, atol=2e-6, err_msg=key)
        untouched += int((den == 0).sum())
    assert untouched > 0  # partial coverage: some elements keep their old value
    # The decoder's last FFN neuron is trained only by the third update's layer 4.
    wo = "decoder.block.1.layer.2.DenseReluDense.wo.weight"
    assert torch.equal(new[wo][:, 39], global_state[wo][:, 39])


@pytest.mark.parametrize(
    "name, heads, expected", [("t5", 2, "transformers"), ("t5-v1_1", 3, "transformers")]
)
def test_export_uniform_spec_reloads_as_plain_t5(name, heads, expected, tmp_path):
    model = tiny_seq2seq(name)
    R.prioritize(model)
    layout = R.describe(model)
    spec = R.SubnetSpec.uniform(layout.num_layers, heads, 24)
    reference = R.extract_submodel(model, spec)
    assert export_submodel(model, spec, tmp_path / "out") == expected
    inputs = tiny_seq2seq_inputs()
    want = _logits(reference, inputs)
    plain = T.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "out").eval()
    assert plain.config.num_heads == heads and plain.config.d_kv == D_KV
    torch.testing.assert_close(_logits(plain, inputs), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(
        _logits(R.load_submodel(tmp_path / "out"), inputs), want, rtol=1e-6, atol=1e-6
    )


def test_unsupported_architecture_lists_t5():
    config = T.BartConfig(
        vocab_size=61, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=8, decoder_ffn_dim=8,
    )  # fmt: skip
    with pytest.raises(R.UnsupportedModelError, match=r"'bart' is not supported.*t5, mt5"):
        R.describe(T.BartForConditionalGeneration(config))


def test_width_scaler_rescales_self_and_cross_attention():
    """HeteroFL's scaler: every attention output projection's input times G / g.

    Pre-hooks run in registration order, so a hook registered before the
    scaler's sees the input unscaled and one registered after sees it scaled,
    in the same forward pass.
    """
    from raffm_core.extract import width_scaler

    sub = R.extract_submodel(tiny_seq2seq("t5-v1_1"), MIXED)  # decoder: 2 of 4 heads
    modules = {
        "self": (sub.decoder.block[1].layer[0].SelfAttention.o, 2.0),
        "cross": (sub.decoder.block[1].layer[1].EncDecAttention.o, 2.0),
        "ffn": (sub.decoder.block[1].layer[2].DenseReluDense.wo, 4.0),  # 10 of 40
    }
    seen: dict[tuple[str, str], torch.Tensor] = {}

    def capture(name, when):
        def hook(_module, args):
            seen[name, when] = args[0].clone()

        return hook

    handles = [m.register_forward_pre_hook(capture(n, "in")) for n, (m, _) in modules.items()]
    with width_scaler(sub):
        handles += [
            m.register_forward_pre_hook(capture(n, "scaled")) for n, (m, _) in modules.items()
        ]
        _logits(sub, tiny_seq2seq_inputs())
    for handle in handles:
        handle.remove()
    for name, (_, factor) in modules.items():
        torch.testing.assert_close(seen[name, "scaled"], seen[name, "in"] * factor)


@pytest.mark.parametrize("tail", [None, 0.5], ids=["fedrolex", "rolling-tail"])
def test_rolling_windows_keep_one_head_set_per_stack(tail):
    from raffm_core.rolling import rolling_spec, rolling_tail_spec

    layout = R.describe(tiny_seq2seq("t5"))
    widths = _stack_spec(3, [20, 10], 2, [8, 30, 40])
    for server_round in range(5):
        if tail is None:
            spec = rolling_spec(layout, widths, server_round)
        else:
            spec = rolling_tail_spec(layout, widths, server_round, tail)
        layout.check_spec(spec)  # a stack's layers keep the same heads
        assert [R.spec.width_count(x.heads) for x in spec.layers] == [3, 3, 2, 2, 2]
