"""Text-to-text fine-tuning of encoder-decoder models (``task = "seq2seq"``, the T5 family).

:func:`load_seq2seq_splits` normalizes rows to ``text``, the source rendered
from ``prompt-template`` (the same ``str.format`` template over the columns
as causal-LM instruction data, :mod:`raffm_core.task.instructions`), and
``label``, the target: either a label index (whose word,
:func:`raffm_core.task.prompts.response_words`, is the target: ``"sst2
sentence: ..."`` -> ``positive``) or, with ``response-column``, a free-form
answer with every gold answer in ``references`` (``"question: ... context:
..."`` -> the answer).

Encoded splits hold ``input_ids`` and ``attention_mask`` (the source, cut to
``max-length``), ``labels`` (the target's tokens and EOS, cut to
``max-new-tokens``) and ``references`` (gold strings, for scoring only:
batches carry them as an attribute, so ``model(**batch)`` never sees them).

Central and federated evaluation generate greedily, at most
``max-new-tokens`` new tokens, and compare normalized text (SQuAD's
normalization: lowercase, no punctuation, no articles, whitespace collapsed):
label words score ``accuracy``; free-form answers ``exact-match`` and token
``f1``, each the maximum over the gold answers (SQuAD's official metrics).
"""

from __future__ import annotations

import dataclasses
import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import torch
from torch.utils.data import DataLoader
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..errors import DataError
from .config import CLASSIFICATION, SEQ2SEQ, RunConfig
from .data import LABEL, TEXT, DatasetSpec, Splits, TaskInfo, _load_split, build_splits
from .instructions import as_text, template_fields
from .keys import ACCURACY, EXACT_MATCH, F1, LOSS, NUM_EXAMPLES
from .maps import map_batches
from .models import load_model_config
from .prompts import IGNORE_INDEX, response_words

REFERENCES = "references"
"""Normalized and encoded column: every gold answer of an example (scoring only)."""


@dataclass(frozen=True)
class Seq2SeqSettings:
    """A seq2seq run's targets: free text or label words, and the generation bound.

    ``max_new_tokens`` bounds both the target's tokens (EOS included) and
    the greedy answers generated for scoring.
    """

    max_new_tokens: int = 16
    free_form: bool = False

    @property
    def primary_metric(self) -> str:
        return F1 if self.free_form else ACCURACY  # token F1 of answers, as SQuAD reports


def is_encoder_decoder(model_name: str) -> bool:
    """Whether ``model_name`` is an encoder-decoder (text-to-text) model; no weights."""
    return bool(getattr(load_model_config(model_name), "is_encoder_decoder", False))


def _answers(value: Any) -> list[str]:
    """Every gold answer of one target cell: a string, a list, or SQuAD's ``{"text": [...]}``."""
    if isinstance(value, dict):
        value = value.get("text", [])
    if isinstance(value, (list, tuple)):
        return [as_text(v) for v in value]
    return [] if value is None else [as_text(value)]


def load_seq2seq_splits(cfg: RunConfig) -> Splits:
    """Train and held-out splits of rendered sources and targets (see the module docstring).

    Without ``response-column`` the labels of ``label-column`` are the targets
    (as words) and the splits are labelled like a classification's.

    Raises
    ------
    DataError
        If a column the template, ``response-column`` or ``label-column``
        names is missing (the message names it), or the labels do not fit.
    """
    template = cfg.prompt_template or "{" + cfg.text_column + "}"
    fields = template_fields(template)
    free_form = bool(cfg.response_column)
    target = cfg.response_column or cfg.label_column

    def normalize(ds: datasets.Dataset, spec: DatasetSpec, name: str) -> datasets.Dataset:
        missing = [c for c in dict.fromkeys([*fields, target]) if c not in ds.column_names]
        if missing:
            raise DataError(
                f"{name}: no column(s) {missing} (named by prompt-template {template!r} and "
                f"{'response' if free_form else 'label'}-column {target!r}); the columns "
                f"are {ds.column_names}"
            )

        def render(batch: dict[str, list]) -> dict[str, list]:
            rows = range(len(batch[target]))
            texts = [template.format(**{f: as_text(batch[f][i]) for f in fields}) for i in rows]
            if not free_form:
                return {TEXT: texts, LABEL: batch[target]}
            refs = [_answers(v) for v in batch[target]]
            return {TEXT: texts, LABEL: [r[0] if r else "" for r in refs], REFERENCES: refs}

        text = datasets.Value("string")
        features = {TEXT: text, LABEL: ds.features[target]}
        if free_form:
            features.update({LABEL: text, REFERENCES: datasets.Sequence(text)})
        return map_batches(
            ds, render, "seq2seq", template, target, free_form, features=datasets.Features(features)
        )

    settings = Seq2SeqSettings(cfg.max_new_tokens, free_form)
    spec = dataclasses.replace(DatasetSpec.from_run_config(cfg), task=CLASSIFICATION)
    if free_form:
        task_of = lambda train: TaskInfo(SEQ2SEQ, (), settings)  # noqa: E731
        return build_splits(spec, _load_split, normalize, task_of)
    splits = build_splits(spec, _load_split, normalize)  # label words: labelled splits
    return dataclasses.replace(splits, task=TaskInfo(SEQ2SEQ, splits.task.label_names, settings))


def encode_seq2seq(
    ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int, task: TaskInfo
) -> datasets.Dataset:
    """Tokenize sources and targets of a normalized split (unpadded).

    Raises
    ------
    DataError
        If the tokenizer has no EOS token to end the target with.
    """
    if tokenizer.eos_token_id is None:
        raise DataError(f"{type(tokenizer).__name__} has no EOS token to end targets with")
    settings = task.settings or Seq2SeqSettings()
    words = None if settings.free_form else response_words(task.label_names)
    target_length = settings.max_new_tokens

    def tokenize(batch: dict[str, list]) -> dict[str, Any]:
        enc = tokenizer([t or "" for t in batch[TEXT]], truncation=True, max_length=max_length)
        if words is None:
            targets, refs = batch[LABEL], batch[REFERENCES]
        else:
            targets = [words[label] for label in batch[LABEL]]
            refs = [[t] for t in targets]
        labels = tokenizer(text_target=targets, truncation=True, max_length=target_length)
        return {
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "labels": labels["input_ids"],
            REFERENCES: refs,
        }

    settings = f"{tokenizer.name_or_path}|{max_length}|{target_length}|{words}"
    return map_batches(ds, tokenize, "seq2seq", settings)


class Seq2SeqBatch(dict):
    """A batch of model inputs (the dict) and its gold answers (``references``)."""

    references: list[list[str]]


class Seq2SeqLoader(DataLoader):
    """Batches of an :func:`encode_seq2seq`-d split, with the tokenizer that decodes answers."""

    tokenizer: PreTrainedTokenizerBase


def make_seq2seq_loader(
    ds: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
) -> Seq2SeqLoader:
    """Batches padded to their longest source and target (targets with ``-100``)."""

    def collate(rows: list[dict[str, Any]]) -> Seq2SeqBatch:
        sources = [{k: row[k] for k in ("input_ids", "attention_mask")} for row in rows]
        batch = Seq2SeqBatch(tokenizer.pad(sources, return_tensors="pt"))
        width = max(len(row["labels"]) for row in rows)
        batch["labels"] = torch.tensor(
            [row["labels"] + [IGNORE_INDEX] * (width - len(row["labels"])) for row in rows]
        )
        batch.references = [list(row[REFERENCES]) for row in rows]
        return batch

    generator = torch.Generator().manual_seed(seed) if shuffle else None
    loader = Seq2SeqLoader(
        ds, batch_size=batch_size, shuffle=shuffle, generator=generator, collate_fn=collate
    )
    loader.tokenizer = tokenizer
    return loader


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalization: lowercase, no punctuation or articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction: str, gold: str) -> float:
    """SQuAD's token F1 of two answers (1.0 if both normalize to nothing)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def answer_scores(prediction: str, golds: Sequence[str]) -> tuple[float, float]:
    """Exact match and token F1 of ``prediction``, each the maximum over ``golds``.

    No gold answer (an unanswerable SQuAD v2 question) means the empty answer.
    """
    golds = list(golds) or [""]
    exact = max(float(normalize_answer(prediction) == normalize_answer(g)) for g in golds)
    return exact, max(token_f1(prediction, g) for g in golds)


@torch.no_grad()
def evaluate_seq2seq(
    model: PreTrainedModel,
    loader: DataLoader,
    task: TaskInfo,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> dict[str, float]:
    """Target-token loss, then greedy answers scored against the references.

    Returns ``loss`` (mean cross-entropy per target token, teacher-forced),
    ``num-examples`` and, for label words, ``accuracy``; for free-form
    answers ``exact-match`` and ``f1``. The model is left in eval mode.

    Raises
    ------
    DataError
        If there is no tokenizer (neither given nor the :class:`Seq2SeqLoader`'s)
    or the loader yields no example.
    """
    tokenizer = tokenizer or getattr(loader, "tokenizer", None)
    if tokenizer is None:
        raise DataError("seq2seq evaluation needs batches from make_loader of an encoded split")
    model.eval()
    settings = task.settings or Seq2SeqSettings()
    bound = settings.max_new_tokens
    total, tokens, exact, f1, count = 0.0, 0, 0.0, 0.0, 0
    for batch in loader:
        scored = int((batch["labels"] != IGNORE_INDEX).sum())
        total += float(model(**batch).loss) * scored
        tokens += scored
        generated = model.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            max_new_tokens=bound,
            do_sample=False,
            num_beams=1,
        )
        answers = tokenizer.batch_decode(generated, skip_special_tokens=True)
        for answer, golds in zip(answers, batch.references, strict=True):
            e, f = answer_scores(answer, golds)
            exact, f1, count = exact + e, f1 + f, count + 1
    if not count:
        raise DataError("cannot evaluate on an empty split")
    metrics = {LOSS: total / max(tokens, 1), NUM_EXAMPLES: count}
    if settings.free_form:
        return {**metrics, EXACT_MATCH: exact / count, F1: f1 / count}
    return {**metrics, ACCURACY: exact / count}


__all__ = [
    "REFERENCES",
    "Seq2SeqBatch",
    "Seq2SeqSettings",
    "is_encoder_decoder",
    "load_seq2seq_splits",
    "Seq2SeqLoader",
    "answer_scores",
    "encode_seq2seq",
    "evaluate_seq2seq",
    "make_seq2seq_loader",
    "normalize_answer",
    "token_f1",
]
