"""raffm_core.cut: a budget to a real, smaller model in one call.

Oracles: the original model's outputs (a full-budget cut preserves the
function); BERT weights sliced by hand, key by key, from the model
prioritized in place (a cut keeps exactly those rows and columns); the
input's weights before the call (a cut never changes them).
"""

from __future__ import annotations

import copy

import pytest
import torch

import raffm_core as R
from tests.models import FAMILY_NAMES, tiny_inputs, tiny_model, tiny_seq2seq, tiny_seq2seq_inputs

HEAD_DIM = 12  # tiny BERT: hidden 48, 4 heads
LAYER = "bert.encoder.layer.{}."


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def hand_sliced_bert(state: dict[str, torch.Tensor], heads, ffn) -> dict[str, torch.Tensor]:
    """Per layer ``i``, the kept head groups ``heads[i]`` and FFN neurons ``ffn[i]`` of a BERT."""
    out = dict(state)
    for i, (h, f) in enumerate(zip(heads, ffn, strict=True)):
        rows = torch.cat([torch.arange(g * HEAD_DIM, (g + 1) * HEAD_DIM) for g in h])
        neurons = torch.tensor(f)
        p = LAYER.format(i)
        for name in ("query", "key", "value"):
            out[p + f"attention.self.{name}.weight"] = state[p + f"attention.self.{name}.weight"][
                rows
            ]
            out[p + f"attention.self.{name}.bias"] = state[p + f"attention.self.{name}.bias"][rows]
        out[p + "attention.output.dense.weight"] = state[p + "attention.output.dense.weight"][
            :, rows
        ]
        out[p + "intermediate.dense.weight"] = state[p + "intermediate.dense.weight"][neurons]
        out[p + "intermediate.dense.bias"] = state[p + "intermediate.dense.bias"][neurons]
        out[p + "output.dense.weight"] = state[p + "output.dense.weight"][:, neurons]
    return out


def assert_same_state(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert torch.equal(got[key], value), key


@pytest.mark.parametrize("salience", ["l1", "l2"])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_a_full_budget_computes_what_the_model_computes(family, salience):
    model = tiny_model(family)
    inputs = tiny_inputs(family)
    with torch.no_grad():
        want = model(**inputs).logits
    result = R.cut(model, "params=1.0", salience=salience)
    assert result.spec == R.describe(model).full_spec()
    assert not result.permutation.is_identity  # the units did move: the check is not vacuous
    with torch.no_grad():
        torch.testing.assert_close(result.model(**inputs).logits, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["t5", "t5-v1_1"])
def test_a_full_budget_preserves_an_encoder_decoder(name):
    model = tiny_seq2seq(name)
    inputs = tiny_seq2seq_inputs()
    with torch.no_grad():
        want = model(**inputs).logits
        got = R.cut(model, "params=1.0").model(**inputs).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "budget, mode",
    [("params=0.6", "largest"), ("params=0.7", "sample")],
    ids=["largest", "sample"],
)
def test_a_cut_keeps_the_prefix_of_the_prioritized_model(budget, mode):
    model = tiny_model("bert")
    result = R.cut(model, budget, mode=mode, seed=3)
    prioritized = copy.deepcopy(model)
    R.prioritize(prioritized)
    heads = [range(layer.heads) for layer in result.spec.layers]
    ffn = [list(range(layer.ffn)) for layer in result.spec.layers]
    assert any(len(h) < 4 for h in heads) and any(len(f) < 40 for f in ffn)  # a real cut
    assert_same_state(
        result.model.state_dict(), hand_sliced_bert(snapshot(prioritized), heads, ffn)
    )


def test_a_spec_is_cut_as_given_and_index_sets_pick_those_units():
    model = tiny_model("bert")
    spec = R.SubnetSpec((R.LayerSpec((0, 2), (1, 5, 39)), R.LayerSpec(3, 20)))
    result = R.cut(model, spec, salience=None)
    assert result.spec == spec and result.permutation is None
    heads = [(0, 2), range(3)]
    ffn = [[1, 5, 39], list(range(20))]
    assert_same_state(result.model.state_dict(), hand_sliced_bert(snapshot(model), heads, ffn))


def test_salience_none_cuts_the_stored_order():
    model = tiny_model("bert")
    result = R.cut(model, "params=0.6", salience=None)
    heads = [range(layer.heads) for layer in result.spec.layers]
    ffn = [list(range(layer.ffn)) for layer in result.spec.layers]
    assert_same_state(result.model.state_dict(), hand_sliced_bert(snapshot(model), heads, ffn))


def test_scores_replace_the_weight_norms():
    model = tiny_model("bert")
    layout = R.describe(model)
    # the last head group and the last neurons are the most important, in reverse order
    scores = [(torch.arange(4.0), torch.arange(40.0)) for _ in range(layout.num_layers)]
    result = R.cut(model, R.SubnetSpec.uniform(2, 2, 10), scores=scores)
    assert [p.heads.tolist() for p in result.permutation.layers] == [[3, 2, 1, 0]] * 2
    assert [p.ffn.tolist()[:3] for p in result.permutation.layers] == [[39, 38, 37]] * 2
    # the within-head Q/K channel order still follows the norm, so compare the FFN only
    state, expected = result.model.state_dict(), snapshot(model)
    for i in range(2):
        p = LAYER.format(i)
        kept = torch.arange(39, 29, -1)
        torch.testing.assert_close(
            state[p + "intermediate.dense.weight"],
            expected[p + "intermediate.dense.weight"][kept],
            rtol=0,
            atol=0,
        )
        torch.testing.assert_close(
            state[p + "output.dense.weight"],
            expected[p + "output.dense.weight"][:, kept],
            rtol=0,
            atol=0,
        )


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_the_input_model_is_unchanged_and_shares_nothing(family):
    model = tiny_model(family)
    before = snapshot(model)
    result = R.cut(model, "params=0.6")
    assert_same_state(snapshot(model), before)
    with torch.no_grad():
        for p in result.model.parameters():
            p.add_(1.0)
    assert_same_state(snapshot(model), before)
    assert R.spec_of(model) is None and R.spec_of(result.model) == result.spec


def test_the_sub_model_keeps_the_inputs_mode_and_sample_draws_are_seeded():
    model = tiny_model("bert").train()
    assert R.cut(model, "params=0.6").model.training
    draws = [R.cut(model, "params=0.7", mode="sample", seed=s).spec for s in (1, 1, 2)]
    assert draws[0] == draws[1] != draws[2]


def test_an_inference_profile_admits_a_wider_model_than_training():
    model = tiny_model("bert")
    layout = R.describe(model)
    training = R.TrainingProfile(batch_size=64, seq_len=64)
    limit = training.memory_mb(layout, R.SubnetSpec.uniform(2, 2, 20))
    budget = f"memory-mb={limit}"
    trained = R.cut(model, budget, profile=training).spec
    deployed = R.cut(model, budget, profile=R.InferenceProfile(batch_size=1, seq_len=64)).spec
    assert layout.count_params(deployed) > layout.count_params(trained)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda m: R.cut(m, "params=0.01"), R.BudgetTooSmallError, "below the smallest"),
        (lambda m: R.cut(m, "bogus"), R.BudgetError, "bogus"),
        (lambda m: R.cut(m, "params=0.6", salience="l3"), R.RaffmError, "unknown norm 'l3'"),
        (
            lambda m: R.cut(m, "params=0.6", salience=None, scores=[]),
            R.RaffmError,
            "need a salience",
        ),
        (lambda m: R.cut(m, "params=0.6", scores=[]), R.RaffmError, "scores has 0 layers"),
        (
            lambda m: R.cut(m, R.SubnetSpec.uniform(2, 2, 20), seed=1, mode="sample"),
            R.SpecError,
            "mode, seed choose a spec",
        ),
        (lambda m: R.cut(m, R.SubnetSpec.uniform(3, 2, 20)), R.SpecError, "3 layers"),
        (lambda m: R.cut(R.cut(m, "params=0.6").model, "params=0.5"), R.SpecError, "sub-model"),
    ],
    ids=[
        "too-small",
        "unparsable",
        "norm",
        "scores-alone",
        "scores-layers",
        "spec-and-seed",
        "spec-depth",
        "sub-model",
    ],
)
def test_bad_calls_are_errors_that_say_what_and_change_nothing(call, error, message):
    model = tiny_model("bert")
    before = snapshot(model)
    with pytest.raises(error, match=message):
        call(model)
    assert_same_state(snapshot(model), before)
