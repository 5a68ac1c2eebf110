"""From a normalized split to batches: tokenizing (or pixels), padding, sampling.

A *preprocessor* is a tokenizer for text, or a
:class:`~raffm_core.task.pixels.PixelProcessor` for images, which encodes and
batches a split itself (it has ``encode_split`` and ``make_loader``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from .config import CAUSAL_LM, EXTRACTIVE_QA, SEQ2SEQ
from .data import LABEL, TEXT, TEXT_PAIR, TaskInfo
from .instructions import INSTRUCTION_METADATA, InstructionSettings, PromptTemplate, encode_prompts
from .maps import map_batches
from .prompts import IGNORE_INDEX, PROMPT_TEMPLATE, encode_instructions, response_words
from .qa import QA_METADATA, encode_qa
from .seq2seq import REFERENCES, encode_seq2seq, make_seq2seq_loader

METADATA = (*QA_METADATA, *INSTRUCTION_METADATA)
"""Encoded columns that scoring reads and batches leave out (never model inputs)."""

SPAN_TARGETS = ("start_positions", "end_positions")
"""Extractive QA's targets: token indices of the answer's first and last token."""


def encode(
    ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> datasets.Dataset:
    """Tokenize a normalized split (truncated, unpadded) into ``input_ids``, ..., ``labels``.

    Modality hook: any other preprocessor (an image
    :class:`~raffm_core.task.pixels.PixelProcessor`) encodes the split itself.
    """
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        return tokenizer.encode_split(ds)
    pair = TEXT_PAIR in ds.column_names

    def tokenize(batch: dict[str, list]) -> dict[str, Any]:
        texts = [t or "" for t in batch[TEXT]]
        pairs = [t or "" for t in batch[TEXT_PAIR]] if pair else None
        enc = tokenizer(texts, pairs, truncation=True, max_length=max_length)
        return {**enc, "labels": batch[LABEL]}

    return map_batches(ds, tokenize, "tokenized", tokenizer, max_length)


def encode_task(
    ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int, task: TaskInfo
) -> datasets.Dataset:
    """:func:`encode`, or the task's own encoding.

    ``extractive-qa``: :func:`raffm_core.task.qa.encode_qa` (windows);
    ``causal-lm``: :func:`raffm_core.task.instructions.encode_prompts` for
    prompt/response data, else the polarity prompts of
    :func:`raffm_core.task.prompts.encode_instructions`.
    """
    if task.kind == EXTRACTIVE_QA:
        return encode_qa(ds, tokenizer, max_length, task.settings)
    if task.kind == SEQ2SEQ:  # sources and targets: raffm_core.task.seq2seq
        return encode_seq2seq(ds, tokenizer, max_length, task)
    if task.kind != CAUSAL_LM:
        return encode(ds, tokenizer, max_length)
    if isinstance(task.settings, InstructionSettings):
        return encode_prompts(ds, tokenizer, max_length)
    template = task.settings.template if isinstance(task.settings, PromptTemplate) else None
    words = response_words(task.label_names)
    return encode_instructions(ds, tokenizer, max_length, words, template or PROMPT_TEMPLATE)


def make_loader(
    ds: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
) -> DataLoader:
    """Batches of an :func:`encode`-d split, padded per batch to its longest example.

    Token-level labels (a causal-LM split, :func:`raffm_core.task.prompts.encode_instructions`)
    are padded with ``-100`` on the tokenizer's padding side. Modality hook: any
    other preprocessor (an image :class:`~raffm_core.task.pixels.PixelProcessor`)
    batches the split itself.
    """
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        return tokenizer.make_loader(ds, batch_size, shuffle=shuffle, seed=seed)
    if REFERENCES in ds.column_names:  # seq2seq: targets, and gold answers for scoring
        return make_seq2seq_loader(ds, tokenizer, batch_size, shuffle=shuffle, seed=seed)
    if SPAN_TARGETS[0] in ds.column_names:  # extractive QA: span targets, no labels
        return DataLoader(
            ds,
            batch_size=batch_size,
            shuffle=shuffle,
            generator=torch.Generator().manual_seed(seed) if shuffle else None,
            collate_fn=lambda rows: _collate_spans(rows, tokenizer),
        )
    feature = ds.features["labels"]
    per_token = isinstance(feature, (datasets.Sequence, datasets.List))
    regression = not per_token and feature.dtype.startswith("float")
    left_out = ("labels", *METADATA)

    def collate(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        labels = [row["labels"] for row in rows]
        batch = tokenizer.pad(
            [{k: v for k, v in row.items() if k not in left_out} for row in rows],
            return_tensors="pt",
        )
        if per_token:
            width = batch["input_ids"].shape[1]
            fill = [[IGNORE_INDEX] * (width - len(row)) for row in labels]
            left = tokenizer.padding_side == "left"
            labels = [f + row if left else row + f for f, row in zip(fill, labels, strict=True)]
        batch["labels"] = torch.tensor(labels, dtype=torch.float32 if regression else torch.long)
        return dict(batch)

    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(
        ds, batch_size=batch_size, shuffle=shuffle, generator=generator, collate_fn=collate
    )


def _collate_spans(
    rows: list[dict[str, Any]], tokenizer: PreTrainedTokenizerBase
) -> dict[str, torch.Tensor]:
    """A padded batch of QA windows with ``start_positions`` and ``end_positions``."""
    left_out = (*SPAN_TARGETS, *METADATA)
    batch = tokenizer.pad(
        [{k: v for k, v in row.items() if k not in left_out} for row in rows], return_tensors="pt"
    )
    for key in SPAN_TARGETS:
        batch[key] = torch.tensor([row[key] for row in rows], dtype=torch.long)
    return dict(batch)


def cycle(loader: DataLoader) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of ``loader`` forever, reshuffled each pass."""
    while True:
        yield from loader


def sort_by_length(ds: datasets.Dataset) -> datasets.Dataset:
    """An :func:`encode`-d split ordered by token count, so batches pad little (for scoring).

    A split without ``input_ids`` (images) is returned as is.
    """
    if "input_ids" not in ds.column_names:
        return ds
    lengths = [len(ids) for ids in ds["input_ids"]]
    return ds.select(np.argsort(lengths, kind="stable").tolist())


def take(ds: datasets.Dataset, limit: int, seed: int) -> datasets.Dataset:
    """At most ``limit`` examples of ``ds`` (a seeded sample; all of it for 0)."""
    if limit <= 0 or limit >= len(ds):
        return ds
    rng = np.random.default_rng(seed)
    return ds.select(sorted(rng.choice(len(ds), size=limit, replace=False).tolist()))
