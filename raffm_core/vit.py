"""ViT image classifiers for the app: which models are image models, and loading them.

``model-name`` names an image model in one of three ways:

* a local folder or a hub name of any HF ViT (``AutoModelForImageClassification``;
  e.g. ``google/vit-base-patch16-224``);
* ``vit-tiny:`` for a small ViT built from a config with random weights, the
  offline stand-in (no ViT weights are available offline), with optional
  comma-separated ``ViTConfig`` overrides:
  ``vit-tiny:image_size=8,patch_size=2,hidden_size=48``. Defaults are
  :data:`TINY_VIT_DEFAULTS`.

The run's modality follows from the model: a model whose ``model_type`` is in
:data:`IMAGE_MODEL_TYPES` reads images (``pixel_values``), anything else text.
"""

from __future__ import annotations

import json
import logging
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import PretrainedConfig, PreTrainedModel, ViTConfig

from .data import DataError, DatasetSpec, Splits, TaskInfo, load_splits, resolve_model_source
from .images import (
    PROCESSOR_FILE,
    ImageDatasetSpec,
    PixelProcessor,
    load_image_splits,
    processor_for,
)
from .wire import RunConfig

logger = logging.getLogger(__name__)

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


def _parse_value(text: str) -> Any:
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip()


def tiny_vit_config(name: str) -> ViTConfig:
    """The ``ViTConfig`` of a ``vit-tiny:key=value,...`` model name.

    Raises
    ------
    DataError
        If an override is not ``key=value`` or names no ``ViTConfig`` field.
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
        values[key] = _parse_value(value)
    return ViTConfig(**values)


@lru_cache(maxsize=8)
def load_model_config(model_name: str) -> PretrainedConfig:
    """The config of ``model_name`` (``vit-tiny:...``, a path or a hub name); no weights."""
    if model_name.startswith(TINY_VIT):
        return tiny_vit_config(model_name)
    return transformers.AutoConfig.from_pretrained(resolve_model_source(model_name))


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
        logger.info("no %s for %s (%s); using ViT's mean/std 0.5", PROCESSOR_FILE, source, err)
        return None
    return json.loads(Path(found).read_text()) if found else None


def load_pixel_processor(model_name: str) -> PixelProcessor:
    """The :class:`~raffm_core.images.PixelProcessor` of an image model; no weights.

    Size and channels come from the model's config; ``image_mean`` and
    ``image_std`` from its ``preprocessor_config.json`` when it has one
    (else ViT's 0.5 and 0.5).
    """
    return processor_for(load_model_config(model_name), _saved_processor(model_name))


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
    if task.kind != "classification":
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
        model = transformers.AutoModelForImageClassification.from_pretrained(
            resolve_model_source(model_name), ignore_mismatched_sizes=True, **labels
        )
    return model.eval()


def run_dataset_spec(cfg: RunConfig) -> DatasetSpec | ImageDatasetSpec:
    """The data spec of a run: images for an image model, text otherwise."""
    if is_image_model(cfg.model_name):
        return ImageDatasetSpec.from_run_config(cfg)
    return DatasetSpec.from_run_config(cfg)


def load_run_splits(spec: DatasetSpec | ImageDatasetSpec) -> Splits:
    """:func:`~raffm_core.images.load_image_splits` or :func:`~raffm_core.data.load_splits`."""
    if isinstance(spec, ImageDatasetSpec):
        return load_image_splits(spec)
    return load_splits(spec)
