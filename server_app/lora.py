"""The server side of ``peft = "lora"``: global adapters and head, fixed salience ranking.

The global model is the pretrained base (frozen, never sent) plus LoRA
adapters and a task head, which are the only arrays in the strategy's
``ArrayRecord``. :class:`LoraGlobalModel` owns them; :class:`RaFFMLoRA` is the
RaFFM strategy on those arrays, cutting each node's slices with index-set
specs into the unpermuted base (see :mod:`raffm_core.lora`).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord
from safetensors.torch import save_file
from transformers import PreTrainedModel

from raffm_core import Permutation, SubnetSpec, describe, rank_units
from raffm_core.lora import (
    LoraSettings,
    attach_lora,
    is_head_key,
    load_trainable_state,
    lora_keys,
    place_spec,
    trainable_state,
    with_lora,
)
from raffm_core.task.config import RunConfig
from raffm_core.task.keys import LORA_ALPHA, LORA_DROPOUT, LORA_RANK, LORA_TARGET_MODULES, PEFT

from .strategy import RaFFM, State


class LoraGlobalModel:
    """The server's pretrained model with global LoRA adapters and task head.

    Parameters
    ----------
    model : PreTrainedModel
        The full pretrained model with its (new) task head. It is wrapped in
        place; :attr:`model` is the wrapped model, which evaluates with the
        current adapters.
    settings : LoraSettings
        Targets may be empty: the family default is used.
    norm : {"l1", "l2"}
        Salience norm of the one-off ranking of the frozen base.
    seed : int
        Seeds the adapters' initialization.
    """

    def __init__(
        self, model: PreTrainedModel, settings: LoraSettings, norm: str = "l1", seed: int = 0
    ) -> None:
        self.base_layout = describe(model)
        self.settings = settings.resolved(self.base_layout.family)
        # Ranked once: the base is frozen, so its salience never changes.
        self.ranking = rank_units(model.state_dict(), self.base_layout, norm)
        self.layout = with_lora(self.base_layout, self.settings.target_modules, self.settings.rank)
        torch.manual_seed(seed)
        self.model = attach_lora(model, self.settings)
        self.model.eval()

    @property
    def keys(self) -> list[str]:
        """The arrays that train and travel: adapters, then head."""
        return list(self.state())

    def state(self) -> dict[str, torch.Tensor]:
        """Current adapters and head (detached views; clone to keep)."""
        return trainable_state(self.model)

    def load(self, state: dict[str, torch.Tensor]) -> None:
        """Set adapters and head (every key, exact shapes)."""
        load_trainable_state(self.model, state)

    def merged(self) -> PreTrainedModel:
        """A plain ``transformers`` model with the adapters merged into the base weights."""
        return copy.deepcopy(self.model).merge_and_unload()

    def save_state(self, state: dict[str, torch.Tensor], path: Path) -> Path:
        """Write adapters and head (model state-dict keys) as one safetensors file."""
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        return path

    def instruction_config(self) -> dict[str, Any]:
        """What a node needs besides the arrays to rebuild its sub-model."""
        return {
            PEFT: "lora",
            LORA_RANK: self.settings.rank,
            LORA_ALPHA: float(self.settings.alpha),
            LORA_DROPOUT: float(self.settings.dropout),
            LORA_TARGET_MODULES: ",".join(self.settings.target_modules),
        }

    def count_adapters(self) -> int:
        return sum(v.numel() for k, v in self.state().items() if not is_head_key(k))


def lora_settings(cfg: RunConfig) -> LoraSettings:
    """The run config's LoRA knobs."""
    return LoraSettings(
        rank=cfg.lora_rank,
        alpha=cfg.lora_alpha,
        dropout=cfg.lora_dropout,
        target_modules=cfg.lora_target_modules,
    )


class RaFFMLoRA(RaFFM):
    r"""RaFFM on LoRA adapters and task head over a frozen, salience-ranked base.

    Differences from :class:`~server_app.strategy.RaFFM`:

    * The arrays are only the adapters and the task head (``lora_A``,
      ``lora_B`` of the targeted modules, and ``classifier.*`` or
      ``score.*``), in the coordinates of the unpermuted pretrained model.
      The global model is never permuted.
    * A node's ``spec`` is the budget's prefix spec mapped through the fixed
      ranking of the base (:func:`raffm_core.lora.place_spec`): explicit,
      sorted unit indices per layer.
    * Aggregation is :func:`raffm_core.aggregate` over the LoRA layout: ``A``
      sliced on its input axis under the attention output and down
      projections, ``B`` on its output axis under Q, K, V, gate and up, every
      element averaged over the nodes holding it, weighted by examples.

    Obligations of the ClientApp, on top of RaFFM's: the instruction's
    ``"config"`` also carries ``"peft" = "lora"``, ``"lora-rank"``,
    ``"lora-alpha"``, ``"lora-dropout"`` and ``"lora-target-modules"``. The
    node reads the spec's slices of the frozen base from **its own copy of
    the pretrained checkpoint** (the run config's ``model-name``), attaches
    LoRA with these settings, loads the received adapters and head, trains
    only those, and replies with exactly the received keys, shapes and dtypes.

    Parameters
    ----------
    lora : LoraGlobalModel
    **kwargs
        As :class:`~server_app.strategy.RaFFM`, without ``layout``.
    """

    def __init__(self, lora: LoraGlobalModel, base_config: str, **kwargs: Any) -> None:
        super().__init__(lora.layout, base_config, **kwargs)
        self.ranking: Permutation = lora.ranking
        self.lora_keys = lora_keys(lora.layout)

    def prepare_state(self, arrays: ArrayRecord) -> tuple[State, None]:
        """The arrays as they are (fresh tensors): the LoRA global model is never permuted."""
        state = {k: v.clone() for k, v in arrays.to_torch_state_dict().items()}
        return state, None

    def place_spec(self, spec: SubnetSpec) -> SubnetSpec:
        """The prefix spec's units as index sets into the unpermuted base."""
        return place_spec(spec, self.ranking)


__all__ = ["LoraGlobalModel", "RaFFMLoRA", "lora_settings"]
