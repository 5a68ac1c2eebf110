"""Causal-LM instruction data, its metrics, and RaFFM + LoRA fine-tuning of a LLaMA causal LM."""

from __future__ import annotations

import json
import math
import os

import datasets
import numpy as np
import pytest
import torch
import transformers as T
from tokenizers import Tokenizer, models, pre_tokenizers

import raffm_core as R
from client_app.training import TrainSettings, train_submodel
from raffm_core.errors import DataError
from raffm_core.lora import LoraSettings, build_lora_submodel, place_spec, with_lora
from raffm_core.task.encode import make_loader
from raffm_core.task.metrics import evaluate_lm
from raffm_core.task.prompts import IGNORE_INDEX, encode_instructions, response_words
from tests.assets import FILLER, NEGATIVE, POSITIVE

WORDS = ["<pad>", "<unk>", "</s>", "Review", ":", "Sentiment"] + POSITIVE + NEGATIVE + FILLER


def word_tokenizer(padding_side: str = "right") -> T.PreTrainedTokenizerFast:
    """One token per word or punctuation mark: token counts can be worked out by hand."""
    vocab = {w: i for i, w in enumerate(dict.fromkeys(WORDS + ["positive", "negative"]))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return T.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token="</s>",
        padding_side=padding_side,
    )


def tiny_causal_llama(tok: T.PreTrainedTokenizerFast) -> T.LlamaForCausalLM:
    """A tiny LLaMA causal LM over ``tok``'s words (GQA: 6 query heads on 3 key/value heads).

    Seeded: ``torch.manual_seed(0)`` just before it is built.
    """
    torch.manual_seed(0)
    config = T.LlamaConfig(
        vocab_size=len(tok),
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=3,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=True,
    )
    return T.LlamaForCausalLM(config)


def labelled(n: int, seed: int = 0) -> datasets.Dataset:
    """Sentences of one sentiment word among fillers; label 1 for positive words."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for i in range(n):
        label = i % 2
        word = rng.choice(POSITIVE if label else NEGATIVE)
        fill = rng.choice(FILLER, size=int(rng.integers(1, 5))).tolist()
        texts.append(" ".join([*fill, str(word)]))
        labels.append(label)
    return datasets.Dataset.from_dict({"text": texts, "label": labels})


def test_response_words_map_polarity_labels_and_reject_clashes():
    assert response_words(("-1", "1")) == ["negative", "positive"]
    assert response_words(("bad", "good"), {"bad": "no"}) == ["no", "good"]
    with pytest.raises(DataError, match="clashing"):
        response_words(("a", "b"), {"a": "x", "b": "x"})


def test_prompt_tokens_are_masked_and_the_response_ends_with_eos():
    tok = word_tokenizer()
    ds = labelled(6)
    enc = encode_instructions(ds, tok, 32, ["negative", "positive"])
    eos = tok.eos_token_id
    for row, text, label in zip(enc, ds["text"], ds["label"], strict=True):
        words = ["Review", ":", *text.split(), "Sentiment", ":"]  # by hand
        answer = ["negative", "positive"][label]
        assert row["input_ids"] == tok.convert_tokens_to_ids([*words, answer]) + [eos]
        assert row["labels"] == [IGNORE_INDEX] * len(words) + [
            tok.convert_tokens_to_ids(answer),
            eos,
        ]
        assert row["attention_mask"] == [1] * (len(words) + 2)
    # a tight max-length cuts the sentence, never the answer
    short = encode_instructions(ds, tok, 7, ["negative", "positive"])
    assert all(len(r["input_ids"]) <= 7 and r["labels"][-1] == eos for r in short)
    with pytest.raises(DataError, match="no room"):
        encode_instructions(ds, tok, 6, ["negative", "positive"])


@pytest.mark.parametrize("side", ["right", "left"])
def test_loader_pads_token_labels_with_ignore_index_on_the_padding_side(side):
    tok = word_tokenizer(side)
    enc = encode_instructions(labelled(4), tok, 32, ["negative", "positive"])
    batch = next(iter(make_loader(enc, tok, 4)))
    assert batch["labels"].shape == batch["input_ids"].shape
    for i, row in enumerate(enc):
        n = len(row["labels"])
        kept = batch["labels"][i, -n:] if side == "left" else batch["labels"][i, :n]
        assert kept.tolist() == row["labels"]
        pad = batch["labels"][i, :-n] if side == "left" else batch["labels"][i, n:]
        assert (pad == IGNORE_INDEX).all()
        assert (batch["attention_mask"][i].sum()) == n


class FixedLogits(torch.nn.Module):
    """A 'model' whose logits are given."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, input_ids, attention_mask):
        return T.modeling_outputs.CausalLMOutput(logits=self.logits[: len(input_ids)])


def test_evaluate_lm_matches_a_hand_computed_loss_and_exact_match():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 4, 5)).astype(np.float32)
    labels = np.array([[-100, -100, 3, 1], [-100, 2, 4, -100]])
    logits[0, 1, 3] = logits[0, 2, 1] = 9.0  # example 0: both response tokens greedy
    logits[1, 0, 2] = 9.0  # example 1: first right, second wrong
    logits[1, 1, 4] = -9.0
    batch = {
        "input_ids": torch.zeros(2, 4, dtype=torch.long),
        "attention_mask": torch.ones(2, 4, dtype=torch.long),
        "labels": torch.tensor(labels),
    }
    metrics = evaluate_lm(FixedLogits(torch.tensor(logits)), [batch])
    nll = []
    for b in range(2):
        for t in range(1, 4):
            if labels[b, t] != -100:
                z = logits[b, t - 1].astype(np.float64)
                nll.append(np.log(np.exp(z).sum()) - z[labels[b, t]])
    assert metrics["loss"] == pytest.approx(np.mean(nll), rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(np.mean(nll)), rel=1e-5)
    assert metrics["accuracy"] == 0.5 and metrics["num-examples"] == 2


def test_raffm_lora_sub_model_of_a_causal_lm_learns_to_answer_with_a_frozen_base(tmp_path):
    tok = word_tokenizer()
    model = tiny_causal_llama(tok)
    with torch.no_grad():  # non-trivial salience ranking
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(tmp_path / "lm")
    layout = R.describe(model)
    spec = place_spec(
        R.select_subnet(layout, "params=0.7"), R.rank_units(model.state_dict(), layout)
    )
    assert not spec.is_prefix
    settings = LoraSettings(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj", "down_proj"))
    lora_layout = with_lora(layout, settings.target_modules, settings.rank)
    adapters = {  # what the server sends: adapters only, no task head under causal LM
        k: torch.randn(shape) * 0.01
        for k, shape in lora_layout.sub_shapes(spec).items()
        if ".lora_" in k
    }
    sub = build_lora_submodel(
        R.base_config(model), spec, tmp_path / "lm", settings, adapters, layout
    )
    trainable = {n for n, p in sub.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)

    data = encode_instructions(labelled(48), tok, 24, ["negative", "positive"])
    before = evaluate_lm(sub, make_loader(data, tok, 16))
    steps = TrainSettings(
        lr=2e-2,
        local_steps=30,
        local_epochs=0,
        batch_size=8,
        weight_decay=0.0,
        proximal_mu=0.0,
        seed=0,
    )
    train_submodel(sub, data, tok, steps)
    after = evaluate_lm(sub, make_loader(data, tok, 16))
    assert after["loss"] < 0.5 * before["loss"]
    # the frozen base is bit-identical to the slices of the original checkpoint
    oracle = R.extract_state_dict(model.state_dict(), layout, spec)
    state = sub.base_model.model.state_dict()
    for key, expected in oracle.items():
        wrapped = key.removesuffix(".weight") + ".base_layer.weight"  # peft moved it
        assert torch.equal(state[wrapped] if wrapped in state else state[key], expected), key


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("RAFFM_SLOW_TESTS") != "1", reason="set RAFFM_SLOW_TESTS=1 (about 1-3 min)"
)
def test_embedded_smollm2_converts_once_to_a_folder_with_the_gguf_models_outputs(tmp_path):
    """The real SmolLM2 (about a minute and 1.2 GB): converted folder == GGUF-dequantized model."""
    from raffm_core.task.smollm2 import gguf_path, materialize_smollm2

    folder = materialize_smollm2(tmp_path)
    assert materialize_smollm2(tmp_path) == folder  # second call: no conversion
    ours = T.AutoModelForCausalLM.from_pretrained(folder).eval()
    source = gguf_path()
    reference = T.AutoModelForCausalLM.from_pretrained(
        source.parent, gguf_file=source.name, dtype=torch.float32
    ).eval()
    tok = T.AutoTokenizer.from_pretrained(folder)
    batch = tok(["Review: a gorgeous, witty film\nSentiment:"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).logits, reference(**batch).logits)
    assert ours.config.num_key_value_heads < ours.config.num_attention_heads  # GQA
    layout = R.describe(T.AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2))
    assert layout.family.name == "LLaMA"


def test_a_federated_causal_lm_lora_round_trains_adapters_only(tmp_path):
    """``task = "causal-lm"`` with ``peft = "lora"``: 2 nodes, 1 round, adapters only travel."""
    from safetensors.torch import load_file

    from tests.assets import write_polarity_csv
    from tests.sim import simulate

    tok = word_tokenizer()
    tiny_causal_llama(tok).save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    overrides = {
        "model-name": str(tmp_path / "lm"),
        "dataset": str(write_polarity_csv(tmp_path / "polarity.csv", 60)),
        "task": "causal-lm",
        "results-dir": str(tmp_path / "results"),
        "min-available-nodes": 2,
        "num-server-rounds": 1,
        "min-replies": 2,
        "budget-profile": "params=0.6,params=1.0",
        "partitioner": "iid",
        "max-length": 24,
        "local-steps": 2,
        "batch-size": 8,
        "lr": 1e-2,
        "peft": "lora",
        "lora-rank": 2,
        "lora-dropout": 0.0,
        "save-models": True,
    }
    simulate(overrides, 2)
    results = tmp_path / "results"
    clients = json.loads((results / "rounds.json").read_text())[1]["clients"]
    assert [c["status"] for c in clients] == ["accepted", "accepted"]
    adapters = load_file(str(results / "final-adapters.safetensors"))
    assert adapters and all(".lora_" in k for k in adapters)  # no head under causal LM
    sizes = {c["budget"]: c["bytes-down"] for c in clients}
    assert sizes["params=0.6"] < sizes["params=1"]
    summary = json.loads((results / "summary.json").read_text())
    assert 0.0 <= summary["final-accuracy"] <= 1.0
