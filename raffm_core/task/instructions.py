"""Instruction data for causal LMs: any dataset with prompt and response columns.

``task = "causal-lm"`` with ``response-column`` set reads instruction data
as FlowerTune and OpenFedLLM users bring it: ``prompt-template`` is a
``str.format`` template over the dataset's columns that makes the prompt,
and ``response-column`` holds the answer. For example SVAMP
(``prompt-template = "{Body} {Question}\\nAnswer:"``, ``response-column =
"Answer"``) or Alpaca (``"### Instruction:\\n{instruction}\\n{input}\\n###
Response:"``, ``"output"``). Without ``response-column`` the run keeps the
polarity prompts of :mod:`raffm_core.task.prompts` (one template of this:
``prompt-template`` may replace its ``Review: {text}\\nSentiment:``).

Normalized rows have ``prompt`` and ``response`` (text). Encoded, an example
is prompt tokens + response tokens + EOS, its ``labels`` ``-100`` on the
prompt (and, batched, on padding), so the loss covers the response only.
Too long an example loses the start of its prompt (the template's tail, with
the question, stays) and, only if the response alone fills ``max-length``,
the end of the response. Evaluation generates greedily, at most
``max-new-tokens`` tokens, and scores exact match of the answer
(:func:`answers_match`: numbers compare as numbers, ``"5" == "5.0"``).
"""

from __future__ import annotations

import math
import re
import string
from dataclasses import dataclass
from typing import Any

import datasets
import torch
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from ..errors import DataError
from .config import CAUSAL_LM, RunConfig
from .data import DatasetSpec, Splits, TaskInfo, _load_split, build_splits
from .keys import EXACT_MATCH
from .maps import map_batches
from .prompts import IGNORE_INDEX

PROMPT, RESPONSE, PROMPT_LENGTH = "prompt", "response", "prompt_length"
"""Normalized columns, and the encoded column with the prompt's token count."""

INSTRUCTION_METADATA = (PROMPT_LENGTH, RESPONSE)
"""Encoded columns that are not model inputs: what generation and scoring read."""


@dataclass(frozen=True)
class InstructionSettings:
    """How answers are generated for scoring: greedy, at most ``max_new_tokens`` tokens."""

    max_new_tokens: int = 16

    @property
    def primary_metric(self) -> str:
        return EXACT_MATCH


@dataclass(frozen=True)
class PromptTemplate:
    """The polarity prompts' template when ``prompt-template`` replaces the default."""

    template: str


def template_fields(template: str) -> list[str]:
    """The column names a ``str.format`` template reads (``{a.b}``, ``{a[0]}``: ``a``)."""
    fields = [f for _, f, _, _ in string.Formatter().parse(template) if f]
    return list(dict.fromkeys(re.split(r"[.\[]", f, maxsplit=1)[0] for f in fields))


def as_text(value: Any) -> str:
    """A cell as prompt or response text: ``""`` for none, ``5.0`` as ``"5"``."""
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def load_instruction_splits(cfg: RunConfig) -> Splits:
    """Train and held-out splits of ``prompt`` and ``response`` made by the run's template.

    Raises
    ------
    DataError
        If a column the template or ``response-column`` names is missing
        (the message names it and lists the columns there are).
    """
    template, response = cfg.prompt_template, cfg.response_column
    fields = template_fields(template)

    def normalize(ds: datasets.Dataset, spec: DatasetSpec, name: str) -> datasets.Dataset:
        missing = [c for c in dict.fromkeys([*fields, response]) if c not in ds.column_names]
        if missing:
            raise DataError(
                f"{name}: no column(s) {missing} (named by prompt-template {template!r} and "
                f"response-column {response!r}); the columns are {ds.column_names}"
            )

        def build(batch: dict[str, list]) -> dict[str, list]:
            rows = range(len(batch[response]))
            return {
                PROMPT: [
                    template.format(**{f: as_text(batch[f][i]) for f in fields}) for i in rows
                ],
                RESPONSE: [as_text(batch[response][i]) for i in rows],
            }

        return map_batches(ds, build, "instructions", template, response)

    def task_of(train: datasets.Dataset) -> TaskInfo:
        return TaskInfo(CAUSAL_LM, (), InstructionSettings(cfg.max_new_tokens))

    return build_splits(DatasetSpec.from_run_config(cfg), _load_split, normalize, task_of)


def _ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def encode_prompts(
    ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> datasets.Dataset:
    """Tokenize ``prompt`` + ``response`` + EOS with the prompt masked out of the loss.

    The response follows the prompt after a space unless the prompt ends in
    whitespace. Returns ``input_ids``, ``attention_mask``, ``labels``
    (``-100`` on the prompt), ``prompt_length`` and the gold ``response`` text.

    Raises
    ------
    DataError
        If the tokenizer has no EOS token, or ``max_length < 2``.
    """
    if tokenizer.eos_token_id is None:
        raise DataError(f"{type(tokenizer).__name__} has no EOS token to end the response with")
    if max_length < 2:
        raise DataError(f"max-length {max_length} leaves no room for a prompt and a response")

    def tokenize(batch: dict[str, list]) -> dict[str, Any]:
        out: dict[str, list] = {k: [] for k in ("input_ids", "attention_mask", "labels")}
        out[PROMPT_LENGTH] = []
        for prompt, response in zip(batch[PROMPT], batch[RESPONSE], strict=True):
            sep = "" if not prompt or prompt[-1].isspace() else " "
            answer = (_ids(tokenizer, sep + response) + [tokenizer.eos_token_id])[: max_length - 1]
            head = _ids(tokenizer, prompt)[-(max_length - len(answer)) :]
            out["input_ids"].append(head + answer)
            out["attention_mask"].append([1] * (len(head) + len(answer)))
            out["labels"].append([IGNORE_INDEX] * len(head) + answer)
            out[PROMPT_LENGTH].append(len(head))
        return {**out, RESPONSE: batch[RESPONSE]}

    return map_batches(ds, tokenize, "prompt-response", tokenizer, max_length)


_THOUSANDS = re.compile(r"^[-+]?\d{1,3}(,\d{3})+(\.\d*)?$")


def parse_number(text: str) -> float | None:
    """``text`` as a number (``"5"``, ``"5.0"``, ``"-2.5"``, ``"1,000"``), else ``None``."""
    text = text.strip()
    if _THOUSANDS.match(text):
        text = text.replace(",", "")
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def clean_answer(text: str) -> str:
    """The answer as scored: its first line, stripped, whitespace collapsed."""
    lines = text.strip().splitlines()
    return " ".join(lines[0].split()) if lines else ""


def answers_match(prediction: str, gold: str) -> bool:
    """Exact match of cleaned answers; two numbers match when equal as numbers."""
    pred, ref = clean_answer(prediction), clean_answer(gold)
    a, b = parse_number(pred), parse_number(ref)
    if a is not None and b is not None:
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)
    return pred == ref


@torch.no_grad()
def generate_answers(
    model: torch.nn.Module,
    ds: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    settings: InstructionSettings,
    batch_size: int,
) -> list[str]:
    """Greedy answers to the prompts of an :func:`encode_prompts`-d split, in order.

    Prompts are left-padded per batch; generation stops at EOS or after
    ``max_new_tokens``. The model is left in eval mode.
    """
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers: list[str] = []
    for start in range(0, len(ds), batch_size):
        rows = ds[start : start + batch_size]
        prompts = [ids[:n] for ids, n in zip(rows["input_ids"], rows[PROMPT_LENGTH], strict=True)]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=settings.max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
        )
        for row in out[:, width:].tolist():
            if tokenizer.eos_token_id in row:
                row = row[: row.index(tokenizer.eos_token_id)]
            answers.append(tokenizer.decode(row, skip_special_tokens=True))
    return answers


def evaluate_instructions(
    model: torch.nn.Module,
    loader: DataLoader,
    tokenizer: PreTrainedTokenizerBase,
    settings: InstructionSettings,
    lm_metrics: dict[str, float],
) -> dict[str, float]:
    """``lm_metrics`` (teacher-forced loss) plus ``exact-match`` of the generated answers.

    ``loader.dataset`` is the :func:`encode_prompts`-d split; its prompts are
    answered in batches of ``loader.batch_size``.
    """
    ds = loader.dataset
    answers = generate_answers(model, ds, tokenizer, settings, loader.batch_size or 1)
    hits = sum(answers_match(a, g) for a, g in zip(answers, ds[RESPONSE], strict=True))
    return {**lm_metrics, EXACT_MATCH: hits / len(answers)}


__all__ = [
    "INSTRUCTION_METADATA",
    "InstructionSettings",
    "PromptTemplate",
    "answers_match",
    "encode_prompts",
    "evaluate_instructions",
    "generate_answers",
    "load_instruction_splits",
    "parse_number",
    "template_fields",
]
