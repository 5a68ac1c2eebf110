"""Tiny offline text-to-text assets: a T5 tokenizer, saved tiny T5s, sentiment and QA files."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
import transformers as T
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from tests.assets import FILLER, NEGATIVE, POSITIVE, write_polarity_csv

T5_SPECIAL = ["<pad>", "</s>", "<unk>"]  # T5's ids 0, 1, 2
ANIMALS = ["cat", "dog", "fox", "owl", "bee", "cow"]
COLOURS = ["red", "blue", "green", "black", "white", "pink"]
PROMPT_WORDS = ["sst2", "sentence", ":", "question", "context", "what", "colour", "positive"]
PROMPT_WORDS += ["negative", "?", "."]
SENTIMENT_TEMPLATE = "sst2 sentence: {text}"
QA_TEMPLATE = "question: {question} context: {context}"


def t5_tokenizer() -> T.PreTrainedTokenizerFast:
    """A WordLevel tokenizer with T5's special tokens; every text ends with ``</s>``."""
    words = dict.fromkeys(POSITIVE + NEGATIVE + FILLER + ANIMALS + COLOURS + PROMPT_WORDS)
    vocab = {w: i for i, w in enumerate(T5_SPECIAL + list(words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", vocab["</s>"])]
    )
    return T.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_input_names=["input_ids", "attention_mask"],
    )


def save_tiny_t5(path: Path, gated: bool = True, seed: int = 0) -> Path:
    """A tiny T5 (gated FFN and untied lm_head, as FLAN-T5; or the original's) and tokenizer."""
    tokenizer = t5_tokenizer()
    torch.manual_seed(seed)
    config = T.T5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu" if gated else "relu",
        tie_word_embeddings=not gated,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    model = T.T5ForConditionalGeneration(config)
    if gated:  # a checkpoint with its own lm_head: from_pretrained keeps it apart
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.shared.weight))
        model.all_tied_weights_keys.pop("lm_head.weight", None)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def qa_rows(n: int, seed: int = 0) -> list[dict]:
    """SQuAD-format rows: which colour an animal of the context is."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        animals, colours = rng.sample(ANIMALS, 2), rng.sample(COLOURS, 2)
        context = f"the {animals[0]} is {colours[0]} and the {animals[1]} is {colours[1]} ."
        asked = i % 2
        answer = colours[asked]
        rows.append(
            {
                "id": str(i),
                "question": f"what colour is the {animals[asked]} ?",
                "context": context,
                "answers": {"text": [answer], "answer_start": [context.index(f" {answer}") + 1]},
            }
        )
    return rows


def write_qa_jsonl(path: Path, n: int = 60, seed: int = 0) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in qa_rows(n, seed)))
    return path


def tiny_t5_task(folder: Path, rows: int = 90, qa: bool = False) -> dict[str, str]:
    """Run-config overrides for a seq2seq run of a tiny T5 saved under ``folder``.

    Sentiment as words (``sst2 sentence: ...`` -> ``positive``), or with
    ``qa`` generative QA (``question: ... context: ...`` -> the colour).
    """
    overrides = {"model-name": str(save_tiny_t5(folder / "t5")), "task": "seq2seq"}
    if qa:
        dataset = write_qa_jsonl(folder / "qa.jsonl", rows)
        return {
            **overrides,
            "dataset": str(dataset),
            "prompt-template": QA_TEMPLATE,
            "response-column": "answers",
        }
    dataset = write_polarity_csv(folder / "polarity.csv", rows)
    return {**overrides, "dataset": str(dataset), "prompt-template": SENTIMENT_TEMPLATE}
