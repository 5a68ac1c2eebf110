"""RaFFM: resource-aware federated fine-tuning of transformer foundation models.

The method as a library, with no Flower import, in the paper's order:

``families``    which weights of each architecture share which axis (data)
``layout``      a model's elastic structure (:func:`describe`)
``spec``        a sub-network: kept heads and FFN neurons per layer
``prioritize``  salience ranking and the function-preserving reordering
``budget``      resource budgets and the training / inference memory models
``select``      the sub-network a budget allows
``extract``     cutting a real, smaller sub-model
``cutting``     all of it in one call (:func:`cut`): rank, reorder, select, extract, build
``aggregate``   slice-aware fusion of the returned sub-models
``server_opt``  the server update (FedAvg, FedProx, FedAdam) on the fused result
``rolling``     FedRolex's rolling windows
``export``      writing a sub-model for a device after training
``errors``      the exception hierarchy

Subpackages: :mod:`raffm_core.lora` (LoRA on sub-models) and
:mod:`raffm_core.task` (the workload: run config, models, data, metrics).
"""

from .aggregate import (
    Aggregated,
    Update,
    aggregate,
    aggregate_with_coverage,
    check_update,
    label_keys,
    pseudo_gradient,
)
from .budget import Budget, InferenceProfile, MemoryProfile, TrainingProfile, training_memory_mb
from .cutting import CutResult, cut
from .errors import (
    BudgetError,
    BudgetTooSmallError,
    CheckpointError,
    ConfigError,
    DataError,
    InstructionError,
    RaffmError,
    SettingsError,
    SpecError,
    UnsupportedModelError,
    UpdateError,
)
from .export import export_model, export_submodel
from .extract import (
    base_config,
    build_submodel,
    extract_state_dict,
    extract_submodel,
    load_submodel,
    save_submodel,
    spec_of,
    width_scaler,
)
from .families import FAMILIES, SUPPORTED_MODEL_TYPES, Family
from .importance import ImportanceTracker
from .layout import ModelLayout, describe
from .prioritize import Permutation, permute_state, prioritize, prioritize_state, rank_units
from .select import check_budgets, select_subnet
from .server_opt import SERVER_UPDATES, ServerOptimizer
from .spec import LayerSpec, SubnetSpec
from .vocab import TrimmedEmbedding

__all__ = [
    "Aggregated",
    "FAMILIES",
    "SERVER_UPDATES",
    "SUPPORTED_MODEL_TYPES",
    "Budget",
    "BudgetError",
    "BudgetTooSmallError",
    "CheckpointError",
    "ConfigError",
    "CutResult",
    "DataError",
    "Family",
    "ImportanceTracker",
    "InferenceProfile",
    "InstructionError",
    "LayerSpec",
    "MemoryProfile",
    "ModelLayout",
    "Permutation",
    "RaffmError",
    "ServerOptimizer",
    "SettingsError",
    "SpecError",
    "SubnetSpec",
    "TrimmedEmbedding",
    "TrainingProfile",
    "UnsupportedModelError",
    "Update",
    "UpdateError",
    "aggregate",
    "aggregate_with_coverage",
    "base_config",
    "build_submodel",
    "check_budgets",
    "check_update",
    "cut",
    "describe",
    "export_model",
    "export_submodel",
    "extract_state_dict",
    "extract_submodel",
    "width_scaler",
    "label_keys",
    "load_submodel",
    "permute_state",
    "prioritize",
    "prioritize_state",
    "pseudo_gradient",
    "rank_units",
    "save_submodel",
    "select_subnet",
    "spec_of",
    "training_memory_mb",
]
