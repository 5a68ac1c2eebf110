"""Scoring a model on a held-out split: loss and the task's metrics.

Classification: accuracy and macro-F1; regression: Pearson's r; causal-LM:
response-token loss, perplexity and exact-answer accuracy, plus, on
prompt/response data, exact match of generated answers
(:mod:`raffm_core.task.instructions`); extractive QA: SQuAD exact match and F1
(:mod:`raffm_core.task.qa_metrics`).
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
from sklearn.metrics import f1_score
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from ..errors import DataError
from ..extract import width_scaler
from .config import CAUSAL_LM, EXTRACTIVE_QA, REGRESSION, SEQ2SEQ
from .data import TaskInfo
from .instructions import InstructionSettings, evaluate_instructions
from .keys import ACCURACY, F1, LOSS, NUM_EXAMPLES, PEARSON
from .prompts import IGNORE_INDEX
from .qa_metrics import evaluate_qa
from .seq2seq import evaluate_seq2seq

PERPLEXITY = "perplexity"
MAJORITY_SHARE = "majority-share"
"""The most predicted class's share of the examples (1.0: a one-class predictor)."""


def compute_metrics(task: TaskInfo, outputs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy and macro-F1 (classification) or Pearson's r (regression).

    ``outputs`` are logits ``(n, num_labels)`` or, for regression, predictions
    ``(n,)`` or ``(n, 1)``. Pearson's r of a constant prediction is undefined;
    it is reported as 0.0 (no linear association).
    """
    if task.kind == REGRESSION:
        pred = np.asarray(outputs, dtype=np.float64).reshape(-1)
        gold = np.asarray(labels, dtype=np.float64).reshape(-1)
        if pred.size < 2 or pred.std() == 0 or gold.std() == 0:
            return {PEARSON: 0.0}
        return {PEARSON: float(np.corrcoef(pred, gold)[0, 1])}
    pred = np.asarray(outputs).argmax(-1)
    gold = np.asarray(labels)
    return {
        ACCURACY: float((pred == gold).mean()) if gold.size else 0.0,
        F1: float(
            f1_score(
                gold, pred, average="macro", labels=list(range(task.num_labels)), zero_division=0
            )
        ),
    }


@torch.no_grad()
def evaluate_model(
    model: torch.nn.Module,
    loader: DataLoader,
    task: TaskInfo,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> dict[str, float]:
    """Mean loss and the task's metrics of ``model`` over ``loader``, plus ``num-examples``.

    Classification and regression: :func:`compute_metrics`; extractive QA:
    :func:`raffm_core.task.qa_metrics.evaluate_qa`; causal LM:
    :func:`evaluate_lm`, and on prompt/response data also the exact match of
    answers generated with ``tokenizer`` (required there). The model is put
    in eval mode and left there.

    Raises
    ------
    DataError
        If the split is empty, or prompt/response data comes without a tokenizer.
    """
    if task.kind == EXTRACTIVE_QA:
        return evaluate_qa(model, loader, task.settings)
    if task.kind == SEQ2SEQ:  # greedy answers: raffm_core.task.seq2seq
        return evaluate_seq2seq(model, loader, task, tokenizer)
    if task.kind == CAUSAL_LM:
        metrics = evaluate_lm(model, loader)
        if not isinstance(task.settings, InstructionSettings):
            return metrics
        if not isinstance(tokenizer, PreTrainedTokenizerBase):
            raise DataError("scoring generated answers needs the tokenizer to decode them")
        return evaluate_instructions(model, loader, tokenizer, task.settings, metrics)
    model.eval()
    total_loss, count = 0.0, 0
    outputs: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    for batch in loader:
        out = model(**batch)
        n = len(batch["labels"])
        total_loss += float(out.loss) * n
        count += n
        outputs.append(out.logits.float().numpy())
        labels.append(batch["labels"].numpy())
    if not count:
        raise DataError("cannot evaluate on an empty split")
    metrics = compute_metrics(task, np.concatenate(outputs), np.concatenate(labels))
    return {LOSS: total_loss / count, **metrics, NUM_EXAMPLES: count}


@torch.no_grad()
def evaluate_lm(model: torch.nn.Module, loader: DataLoader) -> dict[str, float]:
    """Response-token loss, perplexity and exact-answer accuracy of a causal LM.

    ``loss`` is the mean cross-entropy per response token (positions labelled
    ``-100`` excluded); ``accuracy`` is the share of examples whose response
    tokens are all the greedy next-token predictions. The model is left in
    eval mode.

    Raises
    ------
    DataError
        If the loader yields no response token.
    """
    model.eval()
    total, tokens, right, examples = 0.0, 0, 0, 0
    for batch in loader:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        # position t predicts token t + 1
        logits, labels = logits[:, :-1].float(), batch["labels"][:, 1:]
        scored = labels != IGNORE_INDEX
        losses = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), labels.clamp(min=0), reduction="none"
        )
        total += float(losses[scored].sum())
        tokens += int(scored.sum())
        hits = (logits.argmax(-1) == labels) | ~scored
        right += int(hits.all(dim=1).sum())
        examples += len(labels)
    if not tokens:
        raise DataError("cannot evaluate a causal LM without response tokens")
    loss = total / tokens
    return {
        LOSS: loss,
        PERPLEXITY: math.exp(min(loss, 50.0)),
        ACCURACY: right / examples,
        NUM_EXAMPLES: examples,
    }


@torch.no_grad()
def score_classifier(
    model: torch.nn.Module, loader: DataLoader, *, scaled: bool = False
) -> dict[str, float]:
    """Accuracy, mean loss and the most predicted class's share of a classifier on ``loader``.

    The majority share tells a model that learned from one that predicts a
    single class (share 1.0) at the same accuracy.

    Parameters
    ----------
    model : torch.nn.Module
        A sequence or image classifier; batches carry ``labels``.
    loader : DataLoader
    scaled : bool
        Run a sub-model under HeteroFL's scaler (:func:`raffm_core.width_scaler`),
        as it trained with ``width-scaler``.

    Returns
    -------
    dict
        ``accuracy``, ``loss``, ``majority-share`` and ``examples``. The model
        is left in eval mode.

    Raises
    ------
    DataError
        If the loader yields no example.
    """
    model.eval()
    loss, correct, count = 0.0, 0, 0
    predicted: list[torch.Tensor] = []
    with width_scaler(model) if scaled else contextlib.nullcontext():
        for batch in loader:
            out = model(**batch)
            n = len(batch["labels"])
            loss += float(out.loss) * n
            guess = out.logits.argmax(-1)
            correct += int((guess == batch["labels"]).sum())
            predicted.append(guess)
            count += n
    if not count:
        raise DataError("cannot score a classifier on an empty split")
    counts = torch.bincount(torch.cat(predicted))
    return {
        ACCURACY: correct / count,
        LOSS: loss / count,
        MAJORITY_SHARE: float(counts.max()) / count,
        "examples": count,
    }
