"""Scoring extractive QA: SQuAD post-processing and the official EM and F1.

Post-processing (as the reference implementations of ``transformers``'
``run_qa.py``): per window, the ``n-best`` start and the ``n-best`` end
logits; a span is valid when both ends lie in the context, the end is not
before the start and it is at most ``max-answer-length`` tokens; its score is
start logit + end logit. An example's answer is its best valid span over all
its windows. With unanswerable questions (SQuAD v2.0) the null score is the
lowest [CLS] start + end logit over its windows, and the answer is ``""``
when the null score exceeds the best span's by more than
``null-score-threshold``.

Metrics (the official SQuAD v2.0 evaluation script, which agrees with v1.1 on
answerable questions): answers are normalized (lower case, punctuation and
the articles a/an/the removed, whitespace collapsed); exact match and token
F1 take the maximum over the gold answers; an unanswerable question's gold is
``""``. Scores are fractions in [0, 1] (the script prints percentages).
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, SequentialSampler

from ..errors import DataError
from .keys import EXACT_MATCH, F1, LOSS, NUM_EXAMPLES
from .qa import CLS_INDEX, CONTEXT, EXAMPLE_ID, GOLD, OFFSETS, QASettings

HAS_ANS_EXACT, HAS_ANS_F1 = "has-ans-exact-match", "has-ans-f1"
NO_ANS_EXACT, NO_ANS_F1 = "no-ans-exact-match", "no-ans-f1"
"""SQuAD v2.0's HasAns/NoAns splits; reported for the splits a scored set has."""

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (official SQuAD)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> float:
    """1.0 when the normalized answers are equal."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    """Token-overlap F1 of the normalized answers; 1.0/0.0 when either is empty."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def squad_scores(
    predictions: Mapping[str, str],
    golds: Mapping[str, Sequence[str]],
    with_splits: bool = True,
) -> dict[str, float]:
    """Exact match and F1 over ``golds`` (example id to gold texts; empty: unanswerable).

    Returns ``exact-match`` and ``f1`` and, if ``with_splits`` (SQuAD v2.0),
    ``has-ans-*`` and ``no-ans-*`` for the splits present among the examples.

    Raises
    ------
    DataError
        If an example has no prediction.
    """
    missing = [i for i in golds if i not in predictions]
    if missing:
        raise DataError(f"no prediction for example(s) {missing[:5]}")
    em, f1, has = {}, {}, {}
    for i, texts in golds.items():
        texts = [t for t in texts if normalize_answer(t)] or [""]
        has[i] = texts != [""]
        em[i] = max(exact_match(predictions[i], t) for t in texts)
        f1[i] = max(token_f1(predictions[i], t) for t in texts)
    if not golds:
        raise DataError("cannot score question answering on an empty split")
    out = {EXACT_MATCH: float(np.mean(list(em.values()))), F1: float(np.mean(list(f1.values())))}
    splits = ((True, HAS_ANS_EXACT, HAS_ANS_F1), (False, NO_ANS_EXACT, NO_ANS_F1))
    for flag, em_key, f1_key in splits if with_splits else ():
        ids = [i for i in golds if has[i] == flag]
        if ids:
            out[em_key] = float(np.mean([em[i] for i in ids]))
            out[f1_key] = float(np.mean([f1[i] for i in ids]))
    return out


def best_answers(
    features: Mapping[str, Sequence],
    start_logits: Sequence[np.ndarray],
    end_logits: Sequence[np.ndarray],
    settings: QASettings,
) -> dict[str, str]:
    """Each example's answer text from the logits of its windows.

    Parameters
    ----------
    features : mapping
        Columns of an :func:`~raffm_core.task.qa.encode_qa`-d split
        (``example_id``, ``offset_mapping``, ``context``, ``cls_index``).
    start_logits, end_logits : sequence of arrays
        Per feature, in the same order, one logit per token (padding may follow).
    settings : QASettings
    """
    best: dict[str, tuple[float, str]] = {}
    null: dict[str, float] = {}
    for k, example in enumerate(features[EXAMPLE_ID]):
        offsets = features[OFFSETS][k]
        n = len(offsets)
        start, end = np.asarray(start_logits[k])[:n], np.asarray(end_logits[k])[:n]
        cls = features[CLS_INDEX][k]
        null[example] = min(null.get(example, np.inf), float(start[cls] + end[cls]))
        best.setdefault(example, (-np.inf, ""))
        top_start = np.argsort(start)[::-1][: settings.n_best]
        top_end = np.argsort(end)[::-1][: settings.n_best]
        for i in top_start:
            for j in top_end:
                if offsets[i][0] < 0 or offsets[j][0] < 0:
                    continue
                if j < i or j - i + 1 > settings.max_answer_length:
                    continue
                score = float(start[i] + end[j])
                if score > best[example][0]:
                    context = features[CONTEXT][k]
                    best[example] = (score, context[offsets[i][0] : offsets[j][1]])
    answers = {}
    for example, (score, text) in best.items():
        if settings.unanswerable and null[example] - score > settings.null_score_threshold:
            text = ""
        answers[example] = text
    return answers


@torch.no_grad()
def evaluate_qa(
    model: torch.nn.Module, loader: DataLoader, settings: QASettings
) -> dict[str, float]:
    """Span loss, SQuAD exact match and F1 (and v2 splits) of a QA model over ``loader``.

    ``loader`` batches an :func:`~raffm_core.task.qa.encode_qa`-d split in
    order (:func:`raffm_core.task.encode.make_loader` without shuffling); the
    post-processing columns are read from ``loader.dataset``. ``loss`` is the
    mean over windows of the model's span loss; ``num-examples`` counts
    questions, not windows. The model is left in eval mode.

    Raises
    ------
    DataError
        If the loader shuffles, or the split is empty.
    """
    if not isinstance(loader.sampler, SequentialSampler):
        raise DataError("question answering is scored on an unshuffled loader (windows in order)")
    model.eval()
    total, windows = 0.0, 0
    starts: list[np.ndarray] = []
    ends: list[np.ndarray] = []
    for batch in loader:
        out = model(**batch)
        n = len(batch["input_ids"])
        total += float(out.loss) * n
        windows += n
        starts.extend(out.start_logits.float().numpy())
        ends.extend(out.end_logits.float().numpy())
    if not windows:
        raise DataError("cannot evaluate question answering on an empty split")
    ds = loader.dataset
    features = {c: list(ds[c]) for c in (EXAMPLE_ID, OFFSETS, CONTEXT, CLS_INDEX, GOLD)}
    predictions = best_answers(features, starts, ends, settings)
    golds = dict(zip(features[EXAMPLE_ID], features[GOLD], strict=True))
    return {
        LOSS: total / windows,
        **squad_scores(predictions, golds, settings.unanswerable),
        NUM_EXAMPLES: len(golds),
    }


__all__ = [
    "best_answers",
    "evaluate_qa",
    "exact_match",
    "normalize_answer",
    "squad_scores",
    "token_f1",
]
