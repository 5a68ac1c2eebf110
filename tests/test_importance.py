"""Taylor importance of heads and FFN neurons, and ranking by given scores.

Oracle for the importance: the derivative of the loss with respect to a gate
that scales one unit's output (at 1), taken by autograd one example at a
time; its absolute value, summed over examples, is the first-order Taylor
importance the hooks compute from activations and their gradients.
"""

from __future__ import annotations

import pytest
import torch

import raffm_core as R
from raffm_core.importance import taylor_importance
from tests.models import tiny_inputs, tiny_model


def gated_importance(model, layout, examples):
    """Per layer, |dL/d gate| summed over examples, with one gate per unit."""
    heads = [torch.zeros(layout.num_groups, dtype=torch.float64) for _ in layout.layers]
    ffn = [torch.zeros(layout.ffn_size, dtype=torch.float64) for _ in layout.layers]
    block = layout.group_size * layout.head_dim
    for example in examples:
        gates, handles = {}, []
        for layer in layout.layers:
            for kind, size, width in (
                ("attn_out", layout.num_groups, block),
                ("ffn_out", layout.ffn_size, 1),
            ):
                gate = torch.ones(size, requires_grad=True)
                gates[(layer.index, kind)] = gate
                module = model.get_submodule(layer.modules[kind])

                def hook(module, args, gate=gate, width=width):
                    return (args[0] * gate.repeat_interleave(width), *args[1:])

                handles.append(module.register_forward_pre_hook(hook))
        model.zero_grad(set_to_none=True)
        model(**example).loss.backward()
        for handle in handles:
            handle.remove()
        for layer in layout.layers:
            heads[layer.index] += gates[(layer.index, "attn_out")].grad.abs().double()
            ffn[layer.index] += gates[(layer.index, "ffn_out")].grad.abs().double()
    return list(zip(heads, ffn, strict=True))


@pytest.mark.parametrize("family", ["bert", "distilbert", "llama"])
def test_taylor_importance_is_the_gate_derivative(family):
    model = tiny_model(family, "eager")
    layout = R.describe(model)
    inputs = tiny_inputs(family, batch=4)
    labels = torch.tensor([0, 1, 1, 0])
    examples = [
        {"input_ids": inputs["input_ids"][i : i + 1], "labels": labels[i : i + 1]} for i in range(4)
    ]
    batch = {"input_ids": inputs["input_ids"], "labels": labels}
    # One batch of 4 against 4 single examples: per-example absolute values either way
    # (the loss is a mean over the batch, so the batch's gradients are a quarter).
    got = taylor_importance(model, [batch])
    assert all(p.grad is None for p in model.parameters())  # gradients cleared
    expected = gated_importance(model, layout, examples)
    for (gh, gf), (eh, ef) in zip(got, expected, strict=True):
        torch.testing.assert_close(gh * 4, eh, rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(gf * 4, ef, rtol=1e-4, atol=1e-9)
        assert gh.sum() > 0 and gf.sum() > 0


def test_rank_units_by_given_scores():
    model = tiny_model("bert")
    layout = R.describe(model)
    state = model.state_dict()
    g = torch.Generator().manual_seed(0)
    scores = [
        (torch.rand(layout.num_groups, generator=g), torch.rand(layout.ffn_size, generator=g))
        for _ in layout.layers
    ]
    perm = R.rank_units(state, layout, "l1", scores)
    for layer, (heads, ffn) in zip(perm.layers, scores, strict=True):
        assert layer.heads.tolist() == torch.argsort(heads, descending=True).tolist()
        assert layer.ffn.tolist() == torch.argsort(ffn, descending=True).tolist()
    with pytest.raises(R.RaffmError, match="scores has 1 layers"):
        R.rank_units(state, layout, "l1", scores[:1])
