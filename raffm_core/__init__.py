"""RaFFM: resource-aware federated fine-tuning of transformer foundation models.

The method as a library, with no Flower import: prioritize a model's salient
parameters (function-preserving), choose and extract budget-fitted sub-models,
and fuse their updates slice by slice. See the README for a walk-through.
"""

from .aggregate import Update, aggregate, check_update, pseudo_gradient
from .budget import Budget, MemoryProfile, TrainingProfile, training_memory_mb
from .deploy import InferenceProfile, export_submodel
from .errors import (
    BudgetError,
    BudgetTooSmallError,
    RaffmError,
    SpecError,
    UnsupportedModelError,
    UpdateError,
)
from .extract import (
    base_config,
    build_submodel,
    extract_state_dict,
    extract_submodel,
    load_submodel,
    save_submodel,
    spec_of,
)
from .families import FAMILIES, SUPPORTED_MODEL_TYPES, Family
from .layout import ModelLayout, describe
from .prioritize import Permutation, permute_state, prioritize, rank_units
from .select import select_subnet
from .server_opt import SERVER_UPDATES, ServerOptimizer
from .spec import LayerSpec, SubnetSpec

__all__ = [
    "FAMILIES",
    "SERVER_UPDATES",
    "SUPPORTED_MODEL_TYPES",
    "Budget",
    "BudgetError",
    "BudgetTooSmallError",
    "Family",
    "InferenceProfile",
    "LayerSpec",
    "MemoryProfile",
    "ModelLayout",
    "Permutation",
    "RaffmError",
    "ServerOptimizer",
    "SpecError",
    "SubnetSpec",
    "TrainingProfile",
    "UnsupportedModelError",
    "Update",
    "UpdateError",
    "aggregate",
    "base_config",
    "build_submodel",
    "check_update",
    "describe",
    "export_submodel",
    "extract_state_dict",
    "extract_submodel",
    "load_submodel",
    "permute_state",
    "prioritize",
    "pseudo_gradient",
    "rank_units",
    "save_submodel",
    "select_subnet",
    "spec_of",
    "training_memory_mb",
]
