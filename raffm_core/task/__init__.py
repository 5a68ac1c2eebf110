"""The workload around the method: run config, models, data, encoding, metrics.

Nothing here imports Flower. The Flower apps make one call,
:func:`load_task`, and get everything a run needs: the splits, the
preprocessor (tokenizer or pixel processor), what the labels are, and how to
load the model. Whether the run reads text or images is decided here, from
the model (:func:`raffm_core.task.models.is_image_model`), and nowhere else.

Modules
-------
``keys``      wire keys of Messages
``config``    :class:`RunConfig`, the validated run config, and its choices
``models``    model sources (``embedded:``, local, hub, ``vit-tiny:``), loading
``data``      dataset sources, labels and splits (text; shared split routine)
``images``    image dataset sources
``pixels``    images to ``pixel_values``
``prompts``   polarity prompts for causal LMs
``instructions`` prompt/response data for causal LMs, generated-answer exact match
``qa``        extractive QA (SQuAD v1.1/v2.0): data, sliding windows
``qa_metrics`` SQuAD post-processing, exact match and F1
``encode``    tokenizing, batching, sampling
``metrics``   scoring on a held-out split
``device``    what memory a node may use (``budget = "auto"``)
``smollm2``   the offline SmolLM2 conversion
``support``   which tasks each model family runs
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import datasets
from transformers import PreTrainedModel

from ..errors import DataError
from .config import CAUSAL_LM, EXTRACTIVE_QA, SEQ2SEQ, RunConfig
from .data import IMAGE_MODALITY, TEXT_MODALITY, DatasetSpec, Splits, TaskInfo, load_splits
from .encode import encode_task
from .images import load_image_splits
from .instructions import PromptTemplate, load_instruction_splits
from .models import (
    Preprocessor,
    is_image_model,
    load_model,
    load_model_config,
    load_preprocessor,
    tokens_per_example,
)
from .qa import load_qa_splits
from .seq2seq import is_encoder_decoder, load_seq2seq_splits
from .support import check_task

__all__ = ["DatasetSpec", "RunConfig", "Splits", "Task", "TaskInfo", "load_task", "task_spec"]


@dataclass(frozen=True)
class Task:
    """Everything a run needs to know about its workload.

    Attributes
    ----------
    model_name : str
        The run's ``model-name``.
    splits : Splits
        The normalized train and held-out splits, and the task they define.
    preprocessor : Preprocessor
        The tokenizer (text) or :class:`~raffm_core.task.pixels.PixelProcessor` (images).
    """

    model_name: str
    splits: Splits
    preprocessor: Preprocessor

    @property
    def info(self) -> TaskInfo:
        """What the labels are (``splits.task``)."""
        return self.splits.task

    def encode(self, ds: datasets.Dataset, max_length: int) -> datasets.Dataset:
        """A normalized split encoded for the model (tokens, prompts or pixels)."""
        return encode_task(ds, self.preprocessor, max_length, self.info)

    def load_model(self, seed: int) -> PreTrainedModel:
        """The pretrained model with a seeded head for this task, in eval mode."""
        return load_model(self.model_name, self.info, seed)

    def tokens_per_example(self, max_length: int) -> int:
        """Tokens a layer sees per example (the memory model's sequence length)."""
        return tokens_per_example(self.model_name, max_length)


def task_spec(cfg: RunConfig) -> DatasetSpec:
    """The data spec of a run: images for an image model, text otherwise."""
    modality = IMAGE_MODALITY if is_image_model(cfg.model_name) else TEXT_MODALITY
    return DatasetSpec.from_run_config(cfg, modality)


def load_splits_of(spec: DatasetSpec) -> Splits:
    """The splits of ``spec``, read by its modality's loader."""
    return load_image_splits(spec) if spec.modality == IMAGE_MODALITY else load_splits(spec)


def load_task(cfg: RunConfig) -> Task:
    """The run's workload: splits, preprocessor and task.

    Raises
    ------
    DataError
        If the dataset, a split or a column is missing, or the labels do not
        fit the task.
    """
    return Task(cfg.model_name, load_run_splits(cfg), load_preprocessor(cfg.model_name))


def load_run_splits(cfg: RunConfig) -> Splits:
    """The run's splits: SQuAD-format for ``extractive-qa``, prompt/response data for
    ``causal-lm`` with ``response-column``, rendered sources and targets for
    ``seq2seq`` (which ``auto`` means for an encoder-decoder), else labelled
    text or images.

    Raises
    ------
    UnsupportedModelError
        If the model's family does not run the task (``extractive-qa`` on a
        decoder, ``seq2seq`` on an encoder, anything but ``seq2seq`` on a T5;
        :func:`raffm_core.task.support.check_task`), checked before any data
        is read and again for the task ``auto`` resolves to.
    DataError
        As :func:`load_task`.
    """
    model_type = load_model_config(cfg.model_name).model_type
    check_task(cfg.model_name, model_type, cfg.task)
    splits = _load_run_splits(cfg)
    check_task(cfg.model_name, model_type, splits.task.kind)
    return splits


def _load_run_splits(cfg: RunConfig) -> Splits:
    if cfg.task == SEQ2SEQ or (cfg.task == "auto" and is_encoder_decoder(cfg.model_name)):
        return load_seq2seq_splits(cfg)
    if cfg.task == EXTRACTIVE_QA:
        return load_qa_splits(cfg)
    if cfg.task == CAUSAL_LM and cfg.response_column:
        return load_instruction_splits(cfg)
    splits = load_splits_of(task_spec(cfg))
    if cfg.task == CAUSAL_LM and cfg.prompt_template:  # polarity prompts, own template
        if "{text}" not in cfg.prompt_template:
            raise DataError(
                f"prompt-template = {cfg.prompt_template!r}: polarity prompts (no "
                "response-column) need a {text} field for the sentence"
            )
        task = dataclasses.replace(splits.task, settings=PromptTemplate(cfg.prompt_template))
        splits = dataclasses.replace(splits, task=task)
    return splits
