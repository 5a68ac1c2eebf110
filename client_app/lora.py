"""The client side of ``peft = "lora"``: frozen base slices from the local checkpoint.

The instruction carries only the adapters and the task head. The node reads
the frozen base weights of its sub-network from its own copy of the
pretrained checkpoint (the run config's ``model-name``: a local folder, a hub
name already in the local HF cache, or an ``embedded:`` model), slice by
slice, so the full model never sits in its memory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel
from transformers.utils import cached_file

from raffm_core import ModelLayout, SubnetSpec, describe
from raffm_core.extract import model_class
from raffm_core.lora import LoraSettings, build_lora_submodel, trainable_state
from raffm_core.task.keys import LORA_ALPHA, LORA_DROPOUT, LORA_RANK, LORA_TARGET_MODULES
from raffm_core.task.models import resolve_model_source

from .training import InstructionError, config_value


def lora_settings_from(config: Mapping[str, Any]) -> LoraSettings:
    """The LoRA settings an instruction carries (targets already resolved by the server)."""
    try:
        settings = LoraSettings(
            rank=config_value(config, LORA_RANK, int),
            alpha=config_value(config, LORA_ALPHA, float),
            dropout=config_value(config, LORA_DROPOUT, float),
            target_modules=config_value(config, LORA_TARGET_MODULES, str),
        )
    except ValueError as err:
        raise InstructionError(f"bad LoRA settings in the instruction: {err}") from None
    if not settings.target_modules:
        raise InstructionError(f"instruction {LORA_TARGET_MODULES!r} names no module")
    return settings


@lru_cache(maxsize=4)
def base_checkpoint(model_name: str) -> Path:
    """This node's ``model.safetensors`` of the pretrained base named ``model_name``."""
    source = resolve_model_source(model_name)
    if os.path.isdir(source):
        return Path(source) / "model.safetensors"
    if os.path.isfile(source):
        return Path(source)
    return Path(cached_file(source, "model.safetensors"))  # hub name: the local HF cache


@lru_cache(maxsize=4)
def _layout(config_json: str) -> ModelLayout:
    """The full model's layout, from a weightless (meta) instance; cached per config."""
    config = AutoConfig.for_model(**json.loads(config_json))
    with torch.device("meta"):
        return describe(model_class(config)(config))


def build_lora_model(
    model_name: str,
    base: PretrainedConfig,
    spec: SubnetSpec,
    arrays: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
) -> tuple[PreTrainedModel, Callable[[], dict[str, torch.Tensor]]]:
    """The node's LoRA sub-model, and a function that reads its adapters and head.

    Parameters
    ----------
    model_name : str
        The run config's ``model-name``: where this node's base checkpoint is.
    base : PretrainedConfig
        The full model's config, from the instruction.
    spec : SubnetSpec
        The node's sub-network (index sets into the unpermuted base).
    arrays : mapping
        Adapters and head as received.
    config : mapping
        The instruction's ConfigRecord (LoRA settings).
    """
    settings = lora_settings_from(config)
    layout = _layout(base.to_json_string())
    model = build_lora_submodel(base, spec, base_checkpoint(model_name), settings, arrays, layout)
    return model, lambda: trainable_state(model)
