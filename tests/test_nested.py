"""Nested dropout: a narrowed step runs exactly the extracted prefix sub-model.

Oracle: :func:`raffm_core.extract_submodel` of the drawn prefix (itself tested
against manual slicing) gives the same outputs as the whole model under the
hooks; the units past the prefix get no gradient.
"""

from __future__ import annotations

import pytest
import torch

import raffm_core as R
from raffm_core.nested import nested_dropout
from tests.models import FAMILY_NAMES, tiny_gpt2, tiny_inputs, tiny_model


def prefix_spec(widths, vocab=None) -> R.SubnetSpec:
    return R.SubnetSpec(tuple(R.LayerSpec(h, f) for h, f in widths), vocab)


def narrowed_draw(controller):
    for _ in range(100):
        widths = controller.draw()
        if widths is not None:
            return widths
    raise AssertionError("no narrowed step in 100 draws at rate 0.9")


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_a_narrowed_step_is_the_prefix_submodel(family, attn):
    model = tiny_model(family, attn)
    inputs = tiny_inputs(family)
    with nested_dropout(model, 0.9, seed=5) as nested:
        widths = narrowed_draw(nested)
        with torch.no_grad():
            got = model(**inputs).logits
    expected_model = R.extract_submodel(model, prefix_spec(widths))
    with torch.no_grad():
        expected = expected_model(**inputs).logits
        whole = model(**inputs).logits  # hooks are gone: the whole model again
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, whole)


def test_prefixes_of_a_submodel_and_gpt2_causal_lm():
    model = tiny_gpt2("causal-lm")
    layout = R.describe(model)
    sub = R.extract_submodel(model, R.SubnetSpec.uniform(layout.num_layers, 3, 40))
    ids = torch.randint(
        0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0)
    )
    with nested_dropout(sub, 0.9, seed=1) as nested:
        widths = narrowed_draw(nested)
        assert all(1 <= h <= 3 and 1 <= f <= 40 for h, f in widths)
        with torch.no_grad():
            got = sub(input_ids=ids).logits
    with torch.no_grad():
        expected = R.extract_submodel(model, prefix_spec(widths))(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_units_past_the_prefix_get_no_gradient():
    model = tiny_model("bert")
    layout = R.describe(model)
    inputs = tiny_inputs("bert")
    model.train()
    with nested_dropout(model, 0.9, seed=2) as nested:
        widths = narrowed_draw(nested)
        model(**inputs, labels=torch.tensor([0, 1, 0])).loss.backward()
    head_cols = layout.group_size * layout.head_dim
    for layer, (heads, ffn) in zip(layout.layers, widths, strict=True):
        query = dict(model.named_parameters())[layer.modules["query"] + ".weight"].grad
        down = dict(model.named_parameters())[layer.modules["ffn_out"] + ".weight"].grad
        assert torch.count_nonzero(query[heads * head_cols :]) == 0
        assert torch.count_nonzero(down[:, ffn:]) == 0
        assert torch.count_nonzero(query[: heads * head_cols]) > 0


def test_rate_sets_the_share_of_narrowed_steps_and_draws_are_seeded():
    model = tiny_model("bert")
    with nested_dropout(model, 0.0, seed=0) as nested:
        assert all(nested.draw() is None for _ in range(50))
    with nested_dropout(model, 0.5, seed=3) as a, nested_dropout(model, 0.5, seed=3) as b:
        draws_a = [a.draw() for _ in range(400)]
        draws_b = [b.draw() for _ in range(400)]
    assert draws_a == draws_b
    assert 0.4 < sum(d is not None for d in draws_a) / 400 < 0.6
    with pytest.raises(ValueError, match=r"nested-dropout rate must be in \[0, 1\), got 1.0"):
        with nested_dropout(model, 1.0, seed=0):
            pass


def test_t5_stacks_draw_one_head_width_per_stack():
    from tests.models import tiny_seq2seq

    model = tiny_seq2seq("t5")
    layout = R.describe(model)
    with nested_dropout(model, 0.9, seed=4) as nested:
        for _ in range(20):
            widths = nested.draw()
            if widths is None:
                continue
            for group in layout.head_ties:
                assert len({widths[i][0] for i in group}) == 1
