"""Vocabulary trimming: a sub-model keeps only the token-embedding rows a node uses.

Oracles: the full model itself (a trimmed sub-model that keeps every id of
the inputs gives the full model's outputs), manual row indexing of the
embedding, and a numpy per-row average for aggregation.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import raffm_core as R
from raffm_core.vocab import TrimmedEmbedding
from tests.models import tiny_gpt2, tiny_inputs, tiny_model

TRIMMABLE = ["bert", "roberta", "distilbert"]


def ids_of(inputs: dict, model) -> tuple[int, ...]:
    """Every id of ``inputs`` and the padding id: what a node would report."""
    pad = model.config.pad_token_id
    return tuple(sorted(set(inputs["input_ids"].reshape(-1).tolist()) | {pad}))


def embedding_key(layout: R.ModelLayout) -> str:
    assert layout.vocab_key is not None
    return layout.vocab_key


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", TRIMMABLE)
def test_trimmed_vocab_keeps_the_full_models_outputs(family, attn):
    model = tiny_model(family, attn)
    layout = R.describe(model)
    inputs = tiny_inputs(family, batch=4, seq=9)
    vocab = ids_of(inputs, model)
    assert len(vocab) < layout.vocab_size  # the oracle means something only if rows are dropped
    sub = R.extract_submodel(model, layout.full_spec().with_vocab(vocab))
    key = embedding_key(layout)
    assert torch.equal(sub.state_dict()[key], model.state_dict()[key][list(vocab)])
    with torch.no_grad():
        torch.testing.assert_close(
            sub(**inputs).logits, model(**inputs).logits, rtol=1e-6, atol=1e-6
        )
    assert layout.count_params(layout.full_spec().with_vocab(vocab)) == (
        layout.total_params - (layout.vocab_size - len(vocab)) * layout.hidden_size
    )


@pytest.mark.parametrize("family", TRIMMABLE)
def test_trimming_composes_with_narrower_layers(family):
    model = tiny_model(family)
    layout = R.describe(model)
    inputs = tiny_inputs(family)
    narrow = R.SubnetSpec.uniform(layout.num_layers, (0, 2), 5)
    plain = R.extract_submodel(model, narrow)
    trimmed = R.extract_submodel(model, narrow.with_vocab(ids_of(inputs, model)))
    with torch.no_grad():
        torch.testing.assert_close(trimmed(**inputs).logits, plain(**inputs).logits)


def test_an_id_outside_the_kept_rows_is_an_error_that_names_it():
    model = tiny_model("bert")
    layout = R.describe(model)
    inputs = tiny_inputs("bert")
    vocab = ids_of(inputs, model)
    dropped = vocab[-1]
    sub = R.extract_submodel(model, layout.full_spec().with_vocab(vocab[:-1]))
    with pytest.raises(ValueError, match=rf"1 token id\(s\) are not in .* e\.g\. \[{dropped}\]"):
        sub(**inputs)


def test_padding_row_keeps_its_place_and_gets_no_gradient():
    model = tiny_model("bert")
    layout = R.describe(model)
    pad = model.config.pad_token_id
    vocab = (pad, 5, 9, 17)
    sub = R.extract_submodel(model, layout.full_spec().with_vocab(vocab))
    table = sub.get_input_embeddings()
    assert isinstance(table, TrimmedEmbedding)
    assert table.padding_idx == vocab.index(pad)
    ids = torch.tensor([[5, 9, 17, pad]])
    sub.train()
    sub(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.sum().backward()
    grad = table.weight.grad
    assert torch.count_nonzero(grad[vocab.index(pad)]) == 0
    assert all(torch.count_nonzero(grad[vocab.index(t)]) > 0 for t in (5, 9, 17))


@pytest.mark.parametrize(
    "make",
    [lambda: tiny_gpt2("causal-lm"), lambda: tiny_model("llama"), lambda: tiny_model("vit")],
    ids=["gpt2-tied-lm-head", "llama", "vit"],
)
def test_a_model_without_an_input_only_embedding_refuses_a_vocab(make):
    layout = R.describe(make())
    assert layout.vocab_key is None
    with pytest.raises(R.SpecError, match="no token embedding that can be trimmed"):
        layout.check_spec(layout.full_spec().with_vocab((0, 1, 2)))


def test_an_id_beyond_the_vocabulary_is_a_spec_error():
    layout = R.describe(tiny_model("bert"))
    with pytest.raises(R.SpecError, match=f"token id {layout.vocab_size} is outside"):
        layout.check_spec(layout.full_spec().with_vocab((1, layout.vocab_size)))


def test_spec_json_round_trip_with_vocab_and_unknown_keys():
    spec = R.SubnetSpec.uniform(2, 3, 8, vocab=(0, 1, 2, 7, 8, 30))
    data = spec.to_dict()
    assert data["vocab"] == "0-2,7-8,30"
    assert R.SubnetSpec.from_json(spec.to_json()) == spec
    assert "vocab" not in R.SubnetSpec.uniform(2, 3, 8).to_dict()
    with pytest.raises(R.SpecError, match=r"unknown keys \['vocabulary'\]"):
        R.SubnetSpec.from_dict({**data, "vocabulary": "0-3"})


def test_save_and_load_a_trimmed_submodel(tmp_path):
    model = tiny_model("distilbert")
    layout = R.describe(model)
    inputs = tiny_inputs("distilbert")
    spec = R.SubnetSpec.uniform(layout.num_layers, 2, 7, vocab=ids_of(inputs, model))
    sub = R.extract_submodel(model, spec)
    R.save_submodel(sub, tmp_path)
    again = R.load_submodel(tmp_path)
    assert R.extract.spec_of(again) == spec
    with torch.no_grad():
        assert torch.equal(again(**inputs).logits, sub(**inputs).logits)


def test_aggregation_averages_each_row_over_the_updates_that_hold_it():
    """numpy oracle: each embedding row is the weighted mean over its holders, else kept."""
    model = tiny_model("bert")
    layout = R.describe(model)
    key = embedding_key(layout)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = np.random.default_rng(0)
    vocabs = [(0, 3, 5, 9), (3, 9, 40), None]
    weights = [3, 5, 2]
    updates = []
    for vocab, n in zip(vocabs, weights, strict=True):
        spec = layout.full_spec().with_vocab(vocab)
        shapes = layout.sub_shapes(spec)
        sub_state = {
            k: torch.tensor(rng.normal(size=shapes[k]), dtype=v.dtype)
            if v.is_floating_point()
            else v.clone()
            for k, v in state.items()
        }
        updates.append(R.Update(spec, sub_state, n))
    fused = R.aggregate(state, updates, layout)

    old = state[key].numpy()
    expected = np.zeros_like(old)
    for row in range(old.shape[0]):
        values, ws = [], []
        for (vocab, n), update in zip(zip(vocabs, weights, strict=True), updates, strict=True):
            if vocab is None:
                values.append(update.state[key][row].numpy())
                ws.append(n)
            elif row in vocab:
                values.append(update.state[key][vocab.index(row)].numpy())
                ws.append(n)
        expected[row] = np.average(values, axis=0, weights=ws) if ws else old[row]
    np.testing.assert_allclose(fused[key].numpy(), expected, rtol=1e-5, atol=1e-6)

    # Without the untrimmed update, rows nobody held keep their value bit for bit.
    fused = R.aggregate(state, updates[:2], layout)
    untouched = sorted(set(range(old.shape[0])) - {0, 3, 5, 9, 40})
    assert torch.equal(fused[key][untouched], state[key][untouched])


def test_select_fits_more_of_the_body_once_the_vocabulary_is_trimmed():
    model = tiny_model("bert")
    layout = R.describe(model)
    vocab = (0, 2, 3, 5, 8, 13, 21, 34)
    full = layout.count_params(layout.full_spec())
    trimmed = layout.count_params(layout.full_spec().with_vocab(vocab))
    budget = R.Budget.parse(f"params={(trimmed + 1) / full:.6f}")
    narrow = R.select_subnet(layout, budget)
    assert narrow.vocab is None and narrow.layers != layout.full_spec().layers
    whole = R.select_subnet(layout, budget, vocab=vocab)
    assert whole == layout.full_spec().with_vocab(vocab)
    drawn = R.select_subnet(layout, budget, "sample", seed=3, vocab=vocab)
    assert drawn.vocab == vocab and layout.count_params(drawn) <= budget.limit(layout)


def test_budget_profile_check_counts_the_rows_a_node_could_need_at_least():
    layout = R.describe(tiny_model("bert"))
    whole = layout.count_params(R.SubnetSpec.uniform(layout.num_layers, 1, 1)) / layout.total_params
    budget = f"params={whole * 0.9:.4f}"  # below the smallest whole-vocabulary sub-network
    with pytest.raises(R.BudgetTooSmallError, match="every budget"):
        R.check_budgets(layout, [budget])
    assert R.check_budgets(layout, [budget], vocab=1) == [R.Budget.parse(budget)]
