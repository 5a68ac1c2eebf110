"""Extractive question answering (``task = "extractive-qa"``): SQuAD v1.1 and v2.0 data.

A split is SQuAD-shaped: one row per question with an id, the question, the
context and ``answers = {"text": [...], "answer_start": [...]}`` (character
offsets into the context; both lists empty for an unanswerable SQuAD v2.0
question). It comes from the hub (``squad``, ``squad_v2``) or from a local
json/jsonl/parquet file; the column names are run-config keys
(``id-column``, ``question-column``, ``context-column``, ``answers-column``).

Long contexts are cut into windows of ``max-length`` tokens that overlap by
``doc-stride`` tokens (the tokenizer's overflow), question first. Each
window is a *feature*; its target span is the gold answer's first and last
token, found through the fast tokenizer's offset mapping, or the [CLS]
position when the window does not hold the whole answer (or there is none).
Partitioning happens before encoding, on examples, so the windows of one
question never straddle two nodes. Scoring is in :mod:`raffm_core.task.qa_metrics`.

The model is ``AutoModelForQuestionAnswering`` of an encoder family
(:data:`QA_MODEL_TYPES`); its span head ``qa_outputs`` (a ``Linear(hidden, 2)``,
weight ``(2, hidden)``) is not elastic and travels whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import datasets
from transformers import PreTrainedTokenizerBase

from ..errors import DataError
from .config import EXTRACTIVE_QA, RunConfig
from .data import DatasetSpec, Splits, TaskInfo, _load_split, build_splits, take_columns
from .keys import F1
from .maps import map_batches
from .support import model_types_for

ID, QUESTION, CONTEXT, ANSWERS = "id", "question", "context", "answers"
"""The normalized columns of a question-answering split."""

QA_MODEL_TYPES = model_types_for(EXTRACTIVE_QA)
"""``config.model_type`` values with an extractive-QA head here (the encoder families,
:data:`raffm_core.task.support.FAMILY_TASKS`)."""

EXAMPLE_ID, OFFSETS, GOLD, CLS_INDEX = "example_id", "offset_mapping", "gold_answers", "cls_index"
QA_METADATA = (EXAMPLE_ID, OFFSETS, CONTEXT, GOLD, CLS_INDEX)
"""Feature columns that are not model inputs: what post-processing reads (never batched)."""

NO_TOKEN = (-1, -1)
"""Offset stored for a token outside the context (question, special tokens)."""


@dataclass(frozen=True)
class QASettings:
    """How features are cut and answers chosen.

    Attributes
    ----------
    doc_stride : int
        Overlap, in tokens, of consecutive windows over one context.
    max_answer_length : int
        Longest predicted span, in tokens.
    n_best : int
        Start and end candidates taken per window (highest logits).
    null_score_threshold : float
        SQuAD v2: answer ``""`` when the null score (start and end at [CLS])
        exceeds the best span's score by more than this.
    unanswerable : bool
        Whether the data has unanswerable questions (SQuAD v2.0): only then
        may a prediction be empty, and the metrics have HasAns/NoAns splits.
    """

    doc_stride: int = 16
    max_answer_length: int = 30
    n_best: int = 20
    null_score_threshold: float = 0.0
    unanswerable: bool = False

    @property
    def primary_metric(self) -> str:
        return F1


def _normalize(cfg: RunConfig) -> Any:
    wanted = {
        cfg.id_column: ID,
        cfg.question_column: QUESTION,
        cfg.context_column: CONTEXT,
        cfg.answers_column: ANSWERS,
    }

    def normalize(ds: datasets.Dataset, spec: DatasetSpec, name: str) -> datasets.Dataset:
        if {"data", "version"} <= set(ds.column_names) and QUESTION not in ds.column_names:
            raise DataError(
                f"{name}: this is the nested SQuAD json (data/paragraphs/qas); give one row "
                "per question with id, question, context and answers (the hub's 'squad' "
                "layout), e.g. as jsonl"
            )
        return take_columns(ds, wanted, name)

    return normalize


def load_qa_splits(cfg: RunConfig) -> Splits:
    """The SQuAD-format train and held-out splits of the run, and their :class:`TaskInfo`.

    Raises
    ------
    DataError
        If the source, a split or one of the four columns is missing (the
        message names it and lists the columns there are).
    """
    spec = DatasetSpec.from_run_config(cfg)

    def task_of(train: datasets.Dataset) -> TaskInfo:
        unanswerable = any(len(a["text"]) == 0 for a in train[ANSWERS])
        settings = QASettings(
            cfg.doc_stride,
            cfg.max_answer_length,
            cfg.n_best,
            cfg.null_score_threshold,
            unanswerable,
        )
        return TaskInfo(EXTRACTIVE_QA, (), settings)

    return build_splits(spec, _load_split, _normalize(cfg), task_of)


def _answer_of(row_id: str, context: str, answers: Any) -> tuple[list[str], int, int]:
    """Gold texts and the first answer's character span ``[start, end)`` (``-1, -1`` if none).

    Raises
    ------
    DataError
        If ``answers`` is not ``{text: [...], answer_start: [...]}`` of equal
        lengths, or a start lies outside the context; names the example.
    """
    if not isinstance(answers, dict) or not {"text", "answer_start"} <= answers.keys():
        raise DataError(
            f"example {row_id!r}: answers must be {{'text': [...], 'answer_start': [...]}}, "
            f"got {answers!r}"
        )
    texts, starts = list(answers["text"] or []), list(answers["answer_start"] or [])
    if len(texts) != len(starts):
        raise DataError(
            f"example {row_id!r}: {len(texts)} answer texts but {len(starts)} answer_start values"
        )
    if not texts:
        return [], -1, -1
    start, end = int(starts[0]), int(starts[0]) + len(texts[0])
    if start < 0 or end > len(context):
        raise DataError(
            f"example {row_id!r}: answer {texts[0]!r} at {start} lies outside its context "
            f"of {len(context)} characters"
        )
    return texts, start, end


def token_span(
    offsets: list[tuple[int, int]], sequence_ids: list[int | None], start: int, end: int
) -> tuple[int, int] | None:
    """First and last token of the character span ``[start, end)`` in a window's context.

    ``None`` when the window's context does not hold the whole span (the
    feature then points at [CLS]).
    """
    in_context = [i for i, s in enumerate(sequence_ids) if s == 1]
    if start < 0 or not in_context:
        return None
    first, last = in_context[0], in_context[-1]
    if not (offsets[first][0] <= start and offsets[last][1] >= end):
        return None
    i = first
    while i <= last and offsets[i][0] <= start:
        i += 1
    j = last
    while j >= first and offsets[j][1] >= end:
        j -= 1
    return i - 1, j + 1


def encode_qa(
    ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int, settings: QASettings
) -> datasets.Dataset:
    """Windows (features) of a normalized QA split, with span targets and post-processing data.

    Returns
    -------
    datasets.Dataset
        One row per window: the tokenizer's inputs, ``start_positions`` and
        ``end_positions`` (token indices; [CLS] if the window lacks the
        answer), and :data:`QA_METADATA`: the example id, per-token context
        offsets (:data:`NO_TOKEN` outside the context), the context, the gold
        texts and the [CLS] index.

    Raises
    ------
    DataError
        If the tokenizer is not a fast one (no offset mapping), a question
        leaves no room for its context in ``max_length``, or an answer is malformed.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(
            f"{type(tokenizer).__name__} is not a fast tokenizer; extractive QA maps answers "
            "to tokens through offset mappings, which only fast tokenizers give"
        )

    def tokenize(batch: dict[str, list]) -> dict[str, Any]:
        questions = [q.lstrip() for q in batch[QUESTION]]
        try:
            enc = tokenizer(
                questions,
                batch[CONTEXT],
                truncation="only_second",
                max_length=max_length,
                stride=settings.doc_stride,
                return_overflowing_tokens=True,
                return_offsets_mapping=True,
            )
        except Exception as err:  # the tokenizers library raises plain exceptions
            raise DataError(
                f"cannot cut windows of max-length {max_length} with doc-stride "
                f"{settings.doc_stride} (a question may be too long for the window): {err}"
            ) from err
        sample_of = enc.pop("overflow_to_sample_mapping")
        all_offsets = enc.pop("offset_mapping")
        out: dict[str, list] = {k: list(v) for k, v in enc.items()}
        for key in ("start_positions", "end_positions", *QA_METADATA):
            out[key] = []
        for i, offsets in enumerate(all_offsets):
            s = sample_of[i]
            row_id, context = str(batch[ID][s]), batch[CONTEXT][s]
            texts, start, end = _answer_of(row_id, context, batch[ANSWERS][s])
            ids = enc["input_ids"][i]
            cls = ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in ids else 0
            seq = enc.sequence_ids(i)
            span = token_span(offsets, seq, start, end) or (cls, cls)
            out["start_positions"].append(span[0])
            out["end_positions"].append(span[1])
            out[EXAMPLE_ID].append(row_id)
            out[OFFSETS].append(
                [list(o) if seq[k] == 1 else list(NO_TOKEN) for k, o in enumerate(offsets)]
            )
            out[CONTEXT].append(context)
            out[GOLD].append(texts)
            out[CLS_INDEX].append(cls)
        return out

    return map_batches(ds, tokenize, "qa", tokenizer, max_length, settings)


__all__ = [
    "QA_METADATA",
    "QA_MODEL_TYPES",
    "QASettings",
    "encode_qa",
    "load_qa_splits",
    "token_span",
]
