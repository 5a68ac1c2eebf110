"""LoRA adapters on sub-models: slicing and aggregation against independent oracles."""

from __future__ import annotations

import numpy as np
import peft
import pytest
import torch

import raffm_core as R
from raffm_core.lora import from_peft_keys, lora_keys, to_peft_keys, with_lora
from tests.models import tiny_inputs, tiny_model

TARGETS = {
    "llama": ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
    "bert": ["query", "value", "dense"],  # "dense" hits attention output, intermediate, output
    "gpt2": ["c_attn", "c_proj", "c_fc"],  # Conv1D; "c_proj" hits attention and FFN outputs
}


def _wrap(model, family, seed=0):
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS[family], task_type="SEQ_CLS", lora_dropout=0.0
    )
    wrapped = peft.get_peft_model(model, config)
    torch.manual_seed(seed)
    with torch.no_grad():  # B starts at zero; make the adapters matter
        for name, p in wrapped.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    return wrapped


def _spec(layout):
    return R.SubnetSpec(
        (
            R.LayerSpec(heads=1, ffn=list(range(3, 40, 2))),
            R.LayerSpec(heads=[layout.num_groups - 1], ffn=17),
        )
    )


@pytest.mark.parametrize("family", ["llama", "bert", "gpt2"])
def test_sliced_adapters_merge_to_slices_of_the_merged_full_model(family):
    base = tiny_model(family)
    R.prioritize(base)
    layout = R.describe(base)
    spec = _spec(layout)
    lora_layout = with_lora(layout, TARGETS[family], rank=4)
    sub_base = R.extract_submodel(base, spec)  # before peft wraps `base` in place

    full = _wrap(base, family)
    adapters = from_peft_keys(peft.get_peft_model_state_dict(full))
    sliced = R.extract_state_dict(adapters, lora_layout, spec)
    for key in lora_keys(lora_layout):
        assert tuple(sliced[key].shape) == lora_layout.sub_shapes(spec)[key]

    sub = _wrap(sub_base, family, seed=1)  # other random values, then overwritten
    result = peft.set_peft_model_state_dict(sub, to_peft_keys(sliced))
    assert not result.unexpected_keys
    inputs = tiny_inputs(family)
    with torch.no_grad():
        sub_out = sub(**inputs).logits
    merged_full = full.merge_and_unload().state_dict()
    merged_sub = sub.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged_sub(**inputs).logits, sub_out, rtol=1e-5, atol=1e-6)
    # Oracle: slice the merged full weights by hand with the layout's positions.
    for key, (axis, index) in layout.slices(spec).items():
        expected = merged_full[key].index_select(
            axis, torch.arange(index.stop) if isinstance(index, slice) else index
        )
        torch.testing.assert_close(merged_sub.state_dict()[key], expected, rtol=1e-6, atol=1e-6)


def test_lora_aggregation_matches_numpy_with_partial_coverage():
    base = tiny_model("llama")
    layout = with_lora(R.describe(base), TARGETS["llama"], rank=4)
    full = _wrap(base, "llama")
    adapters = from_peft_keys(peft.get_peft_model_state_dict(full))
    keys = list(adapters)
    specs = [_spec(layout), R.SubnetSpec.uniform(2, 2, 30), R.SubnetSpec.uniform(2, 1, 5)]
    ns = [3, 8, 5]
    updates = []
    for i, (spec, n) in enumerate(zip(specs, ns, strict=True)):
        g = torch.Generator().manual_seed(i)
        sliced = R.extract_state_dict(adapters, layout, spec)
        updates.append(
            (spec, {k: v + torch.randn(v.shape, generator=g) for k, v in sliced.items()}, n)
        )
    new = R.aggregate(adapters, updates, layout, keys=keys)

    for key in keys:
        old = adapters[key].numpy().astype(np.float64)
        num, den = np.zeros_like(old), np.zeros_like(old)
        for spec, state, n in updates:
            index = [np.arange(s) for s in old.shape]
            for layer, kept in zip(layout.layers, spec.layers, strict=True):
                for c in (*layer.heads, *layer.ffn):
                    if c.key == key:
                        width = kept.heads if c in layer.heads else kept.ffn
                        units = range(width) if isinstance(width, int) else width
                        index[c.axis] = np.array(
                            [u * c.block + j for u in units for j in range(c.block)]
                        )
            grid = np.ix_(*index)
            num[grid] += n * state[key].numpy()
            den[grid] += n
        expected = np.where(den > 0, num / np.where(den > 0, den, 1), old)
        np.testing.assert_allclose(new[key].numpy(), expected, rtol=2e-6, atol=2e-6, err_msg=key)
    assert any(not torch.equal(new[k], adapters[k]) for k in keys)  # the round moved something


def test_unknown_lora_target_lists_the_elastic_modules():
    layout = R.describe(tiny_model("bert"))
    with pytest.raises(R.UnsupportedModelError, match=r"\['nope'\].*query"):
        with_lora(layout, ["nope"], rank=4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"alpha": 0.0}, "LoRA alpha must be > 0, got 0.0"),
        ({"rank": 0}, "LoRA rank must be an integer >= 1, got 0"),
        ({"dropout": 1.0}, r"LoRA dropout must be in \[0, 1\), got 1.0"),
    ],
    ids=["alpha", "rank", "dropout"],
)
def test_bad_lora_settings_are_settings_errors_naming_the_value(kwargs, message):
    from raffm_core.lora import LoraSettings

    with pytest.raises(R.SettingsError, match=message):
        LoraSettings(**kwargs)
