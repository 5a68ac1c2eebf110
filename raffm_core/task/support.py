"""Which tasks each model family runs here, as data, and the one check against it.

:data:`FAMILY_TASKS` holds, per family of :data:`raffm_core.families.FAMILIES`
(by name), the ``task`` values a model of that family can be fine-tuned on:
the head the task needs exists for the architecture and the whole path
(loading, encoding, training, scoring) is tested for it. A family added to
the family table needs an entry here too (``tests/test_support.py`` checks).

:func:`check_task` is the only place that says no: a decoder-only model
(GPT-2, LLaMA) cannot point at a span of its input (``extractive-qa``), an
encoder (BERT) cannot generate text (``seq2seq``), a T5 model is fine-tuned
text-to-text only. The error names the model, its family, the task, what the
family supports and which families run the task.
"""

from __future__ import annotations

from ..errors import UnsupportedModelError
from ..families import FAMILIES, find_family
from .config import CAUSAL_LM, CLASSIFICATION, EXTRACTIVE_QA, REGRESSION, SEQ2SEQ

FAMILY_TASKS: dict[str, tuple[str, ...]] = {
    "BERT": (CLASSIFICATION, REGRESSION, EXTRACTIVE_QA),
    "DistilBERT": (CLASSIFICATION, REGRESSION, EXTRACTIVE_QA),
    "ViT": (CLASSIFICATION,),  # images
    "LLaMA": (CLASSIFICATION, REGRESSION, CAUSAL_LM),
    "GPT-2": (CLASSIFICATION, CAUSAL_LM),
    "T5": (SEQ2SEQ,),  # labels become words: sentiment is text-to-text too
}
"""Family name to the ``task`` values its models run (``auto`` resolves to one of them)."""

TASK_NEEDS: dict[str, str] = {
    CLASSIFICATION: "a sequence or image classification head",
    REGRESSION: "a sequence classification head with one output",
    CAUSAL_LM: "a decoder-only language model (AutoModelForCausalLM)",
    EXTRACTIVE_QA: "an encoder with a span head (AutoModelForQuestionAnswering)",
    SEQ2SEQ: "an encoder-decoder that generates text (AutoModelForSeq2SeqLM)",
}
"""What a model must be to run a task, said in the error."""


def supported_tasks(model_type: str) -> tuple[str, ...]:
    """The ``task`` values a model of ``model_type`` runs here.

    Raises
    ------
    UnsupportedModelError
        If no family covers ``model_type`` (the message lists the supported ones).
    """
    return FAMILY_TASKS[find_family(model_type).name]


def families_for(task: str) -> tuple[str, ...]:
    """Names of the families whose models run ``task``, in the family table's order."""
    return tuple(f.name for f in FAMILIES if task in FAMILY_TASKS.get(f.name, ()))


def model_types_for(task: str) -> tuple[str, ...]:
    """Every ``config.model_type`` whose models run ``task``."""
    return tuple(t for f in FAMILIES if task in FAMILY_TASKS.get(f.name, ()) for t in f.model_types)


def check_task(model_name: str, model_type: str, task: str) -> None:
    """Raise unless a ``model_type`` model runs ``task``; ``"auto"`` always passes.

    ``auto`` is resolved later, from the model and the labels
    (:func:`raffm_core.task.load_run_splits`), which then checks the resolved task.

    Parameters
    ----------
    model_name : str
        The run's ``model-name``, named in the message.
    model_type : str
        Its ``config.model_type``.
    task : str
        A ``task`` value (:data:`raffm_core.task.config.TASKS`).

    Raises
    ------
    UnsupportedModelError
        If the family of ``model_type`` does not run ``task``, e.g. "task =
        'extractive-qa' is not supported for 'gpt2' (model_type 'gpt2', the
        GPT-2 family); the GPT-2 family supports task = 'classification',
        'causal-lm'. 'extractive-qa' needs an encoder with a span head
        (AutoModelForQuestionAnswering): the BERT, DistilBERT families"; or
        if no family covers ``model_type``.
    """
    family = find_family(model_type)
    tasks = FAMILY_TASKS[family.name]
    if task == "auto" or task in tasks:
        return
    if task not in TASK_NEEDS:
        raise UnsupportedModelError(
            f"task = {task!r} is not a task; expected one of {', '.join(TASK_NEEDS)} or 'auto'"
        )
    runs = families_for(task)
    raise UnsupportedModelError(
        f"task = {task!r} is not supported for {model_name!r} (model_type {model_type!r}, "
        f"the {family.name} family); the {family.name} family supports task = "
        f"{', '.join(repr(t) for t in tasks)}. {task!r} needs {TASK_NEEDS[task]}: "
        f"the {', '.join(runs)} famil{'y' if len(runs) == 1 else 'ies'}"
    )


__all__ = [
    "FAMILY_TASKS",
    "TASK_NEEDS",
    "check_task",
    "families_for",
    "model_types_for",
    "supported_tasks",
]
