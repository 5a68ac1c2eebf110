"""RaFFM with LoRA: the pretrained base stays frozen on the devices; adapters and head travel.

``layout``    the LoRA layout: which axis each adapter shares with its base weight
``settings``  :class:`LoraSettings`, rank, alpha, dropout and target modules
``weights``   reading a device's base slices from its ``model.safetensors``
``model``     building and loading the LoRA sub-model on a device
"""

from .layout import from_peft_keys, lora_keys, to_peft_keys, with_lora
from .model import (
    HEAD_MODULES,
    attach_lora,
    build_lora_submodel,
    config_base_prefix,
    count_trainable,
    is_adapter_key,
    is_head_key,
    load_trainable_state,
    place_spec,
    trainable_state,
)
from .settings import LoraSettings, default_target_modules, parse_target_modules
from .weights import checkpoint_file, read_base_slices, untied_in_checkpoint

__all__ = [
    "HEAD_MODULES",
    "LoraSettings",
    "attach_lora",
    "build_lora_submodel",
    "checkpoint_file",
    "config_base_prefix",
    "count_trainable",
    "default_target_modules",
    "from_peft_keys",
    "is_adapter_key",
    "is_head_key",
    "load_trainable_state",
    "lora_keys",
    "parse_target_modules",
    "place_spec",
    "read_base_slices",
    "to_peft_keys",
    "trainable_state",
    "untied_in_checkpoint",
    "with_lora",
]
