"""Tiny offline text assets for app-level tests: a corpus, a tokenizer, a saved BERT."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import torch
import transformers as T
from tokenizers import Tokenizer, models, pre_tokenizers, processors

POSITIVE = ["good", "great", "fine", "lovely", "superb", "warm", "bright", "clever"]
NEGATIVE = ["bad", "awful", "dull", "boring", "weak", "cold", "grim", "clumsy"]
FILLER = ["the", "film", "story", "plot", "was", "is", "a", "very", "and", "cast"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def polarity_rows(n: int = 120, seed: int = 0) -> list[tuple[int, str]]:
    """``(label, text)`` rows whose label a bag of words decides; balanced."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        cue = POSITIVE if label else NEGATIVE
        words = rng.sample(FILLER, 4) + rng.sample(cue, 2)
        rng.shuffle(words)
        rows.append((label, " ".join(words)))
    return rows


def write_polarity_csv(path: Path, n: int = 120, seed: int = 0) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["label", "text"])
        writer.writerows(polarity_rows(n, seed))
    return path


def tiny_tokenizer(words: list[str] | None = None) -> T.PreTrainedTokenizerFast:
    """A WordLevel BERT-style tokenizer built offline ([CLS] a [SEP] b [SEP])."""
    vocab = {w: i for i, w in enumerate(SPECIAL + (words or POSITIVE + NEGATIVE + FILLER))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return T.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )


def save_tiny_bert(
    path: Path, num_labels: int = 2, seed: int = 0, extra_words: tuple[str, ...] = ()
) -> Path:
    """A tiny BERT classifier and its tokenizer, saved as an HF folder.

    ``extra_words`` join the vocabulary after the corpus' words; the corpus
    never uses them.
    """
    tokenizer = tiny_tokenizer(POSITIVE + NEGATIVE + FILLER + list(extra_words))
    torch.manual_seed(seed)
    config = T.BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=num_labels,
        id2label={i: str(i) for i in range(num_labels)},
        label2id={str(i): i for i in range(num_labels)},
    )
    model = T.BertForSequenceClassification(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_bert_task(
    folder: Path, rows: int = 150, extra_words: tuple[str, ...] = ()
) -> dict[str, str]:
    """Run-config overrides ``model-name`` and ``dataset``: a tiny BERT and a polarity CSV.

    Both are saved under ``folder`` (``model/`` and ``polarity.csv``, ``rows`` rows).
    """
    return {
        "model-name": str(save_tiny_bert(folder / "model", extra_words=extra_words)),
        "dataset": str(write_polarity_csv(folder / "polarity.csv", rows)),
    }


GPT2_EOS = "<|endoftext|>"
PROMPT_WORDS = ["Review", ":", "Sentiment", "positive", "negative"]


def tiny_gpt2_tokenizer() -> T.PreTrainedTokenizerFast:
    """A WordLevel tokenizer like GPT-2's in what matters here: EOS, and no padding token."""
    words = [GPT2_EOS, "[UNK]"] + POSITIVE + NEGATIVE + FILLER + PROMPT_WORDS
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return T.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        eos_token=GPT2_EOS,
        bos_token=GPT2_EOS,
        model_input_names=["input_ids", "attention_mask"],
    )


def save_tiny_gpt2(path: Path, causal_lm: bool = False, seed: int = 0) -> Path:
    """A tiny GPT-2 (2-way classifier, or tied LM head) and its tokenizer, saved as an HF folder.

    Like the hub's ``gpt2`` and ``distilgpt2``: no ``pad_token_id`` and
    ``n_inner=None`` (4 x ``n_embd`` FFN neurons).
    """
    tokenizer = tiny_gpt2_tokenizer()
    torch.manual_seed(seed)
    eos = tokenizer.eos_token_id
    config = T.GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=32,
        bos_token_id=eos,
        eos_token_id=eos,
        num_labels=2,
        id2label={0: "0", 1: "1"},
        label2id={"0": 0, "1": 1},
    )
    model = (T.GPT2LMHeadModel if causal_lm else T.GPT2ForSequenceClassification)(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
