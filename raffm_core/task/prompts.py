"""Instruction-style causal-LM text made from a labelled text dataset.

The paper fine-tunes LLaMA-2 with LoRA on instruction data. Offline, a small
instruction set is made from local data: each labelled sentence of a
classification split (the polarity corpus by default) becomes a prompt and a
one-word response::

    Review: the rock is destined to be the 21st century's new conan ...
    Sentiment: positive<eos>

The loss covers the response tokens only (prompt tokens are labelled
``-100``, as ``transformers`` causal-LM heads ignore them), so a model learns
to answer, and :func:`raffm_core.task.metrics.evaluate_lm` scores its answers exactly: an example is
right when every response token is the model's greedy next-token choice.

Split rows are those of :func:`raffm_core.task.data.load_splits` (``text`` and an
integer ``label``); :func:`raffm_core.task.encode.make_loader` batches the encoded
rows (it pads token-level labels with ``-100``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import datasets
from transformers import PreTrainedTokenizerBase

from ..errors import DataError
from .data import LABEL, TEXT
from .maps import map_batches

PROMPT_TEMPLATE = "Review: {text}\nSentiment:"
"""Default prompt; ``{text}`` is the sentence. The response follows after a space."""

POLARITY_WORDS = {"-1": "negative", "1": "positive", "0": "negative"}
"""Response words for the polarity corpus's labels (``1``/``-1``; ``0``/``1`` in SST-2)."""

IGNORE_INDEX = -100


def response_words(label_names: Sequence[str], words: dict[str, str] | None = None) -> list[str]:
    """The response word of each label index.

    Parameters
    ----------
    label_names : sequence of str
        :attr:`raffm_core.task.data.TaskInfo.label_names`, in label-index order.
    words : dict, optional
        Label name to word; :data:`POLARITY_WORDS` by default. Names that are
        already words (``"positive"``) may be left out.

    Raises
    ------
    DataError
        If two labels would get the same word.
    """
    words = POLARITY_WORDS if words is None else words
    out = [words.get(name, name) for name in label_names]
    if len(set(out)) != len(out):
        raise DataError(f"labels {list(label_names)} map to clashing response words {out}")
    return out


def encode_instructions(
    ds: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    words: Sequence[str],
    template: str = PROMPT_TEMPLATE,
) -> datasets.Dataset:
    """Tokenize a labelled split as prompt + response + EOS, the prompt masked out of the loss.

    Parameters
    ----------
    ds : datasets.Dataset
        Rows with ``text`` and an integer ``label``.
    tokenizer : PreTrainedTokenizerBase
        Must have an EOS token.
    max_length : int
        Upper bound on tokens per example; the sentence is cut short so that
        the response and EOS always fit.
    words : sequence of str
        Response word per label index (:func:`response_words`).
    template : str
        Prompt with a ``{text}`` field.

    Returns
    -------
    datasets.Dataset
        ``input_ids``, ``attention_mask`` and ``labels`` (the same length;
        ``-100`` on the prompt).

    Raises
    ------
    DataError
        If the tokenizer has no EOS token, ``template`` lacks ``{text}``, or
        ``max_length`` leaves no room for the sentence.
    """
    if tokenizer.eos_token_id is None:
        raise DataError(f"{type(tokenizer).__name__} has no EOS token to end the response with")
    if "{text}" not in template:
        raise DataError(f"prompt template {template!r} has no {{text}} field")
    head, tail = template.split("{text}", 1)
    head_ids = _ids(tokenizer, head)
    tail_ids = _ids(tokenizer, tail)
    answers = [_ids(tokenizer, " " + w) + [tokenizer.eos_token_id] for w in words]
    room = max_length - len(head_ids) - len(tail_ids) - max(len(a) for a in answers)
    if room < 1:
        raise DataError(f"max-length {max_length} leaves no room for the sentence in {template!r}")

    def tokenize(batch: dict[str, list]) -> dict[str, Any]:
        ids, masks, labels = [], [], []
        for text, label in zip(batch[TEXT], batch[LABEL], strict=True):
            prompt = head_ids + _ids(tokenizer, text or "")[:room] + tail_ids
            answer = answers[label]
            ids.append(prompt + answer)
            masks.append([1] * (len(prompt) + len(answer)))
            labels.append([IGNORE_INDEX] * len(prompt) + answer)
        return {"input_ids": ids, "attention_mask": masks, "labels": labels}

    return map_batches(ds, tokenize, "prompts", tokenizer, max_length, words, template)


def _ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


__all__ = [
    "IGNORE_INDEX",
    "POLARITY_WORDS",
    "PROMPT_TEMPLATE",
    "encode_instructions",
    "response_words",
]
