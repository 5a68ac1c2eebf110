"""Server-side updates on top of :func:`raffm_core.aggregate`.

``fedavg`` (and ``fedprox``, whose proximal term lives on the client) takes
the aggregate as the new global model. ``fedadam`` (Reddi et al., 2021) treats
``aggregate - global`` as a step direction and applies Adam to it, as Flower's
FedAdam does, with one difference that sub-models need: moments and weights
change only where some client contributed (the coverage mask), so an element
nobody trained keeps its value and its moments instead of drifting on stale
momentum.

Optimizer state mirrors the model's layout, so it must follow every
prioritization: call :meth:`ServerOptimizer.permute` with the permutation
:func:`raffm_core.prioritize` returned.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from .errors import RaffmError
from .layout import ModelLayout
from .prioritize import Permutation, permute_state

FEDAVG, FEDPROX, FEDADAM = "fedavg", "fedprox", "fedadam"
SERVER_UPDATES = (FEDAVG, FEDPROX, FEDADAM)

State = Mapping[str, torch.Tensor]


@dataclass
class ServerOptimizer:
    """Turns (global, aggregate, coverage) into the next global model.

    Attributes
    ----------
    name : {"fedavg", "fedprox", "fedadam"}
    lr, beta1, beta2, tau : float
        FedAdam's server learning rate, moment decays and adaptivity.
    """

    name: str = FEDAVG
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-8
    step_count: int = 0
    m: dict[str, torch.Tensor] = field(default_factory=dict)
    v: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in SERVER_UPDATES:
            raise RaffmError(
                f"unknown server update {self.name!r}; expected one of {', '.join(SERVER_UPDATES)}"
            )
        for attr in ("lr", "tau"):
            if not getattr(self, attr) > 0:
                raise RaffmError(f"server optimizer {attr} must be > 0, got {getattr(self, attr)}")
        for attr in ("beta1", "beta2"):
            if not 0 <= getattr(self, attr) < 1:
                raise RaffmError(f"server optimizer {attr} must be in [0, 1)")

    @torch.no_grad()
    def step(
        self, global_state: State, aggregated: State, coverage: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The next global state. Inputs are not modified."""
        if self.name in (FEDAVG, FEDPROX):
            self.step_count += 1
            return dict(aggregated)
        new: dict[str, torch.Tensor] = {}
        for key, old in global_state.items():
            if not old.is_floating_point():
                new[key] = aggregated[key]
                continue
            m = self.m.setdefault(key, torch.zeros(old.shape, dtype=torch.float32))
            v = self.v.setdefault(key, torch.zeros(old.shape, dtype=torch.float32))
            mask = coverage[key].expand_as(old)
            if not bool(mask.any()):
                new[key] = old.clone()
                continue
            delta = aggregated[key].to(torch.float32) - old.to(torch.float32)
            m.copy_(torch.where(mask, self.beta1 * m + (1 - self.beta1) * delta, m))
            v.copy_(torch.where(mask, self.beta2 * v + (1 - self.beta2) * delta * delta, v))
            moved = old.to(torch.float32) + self.lr * m / (v.sqrt() + self.tau)
            new[key] = torch.where(mask, moved, old.to(torch.float32)).to(old.dtype)
        self.step_count += 1
        return new

    def permute(self, layout: ModelLayout, permutation: Permutation) -> None:
        """Keep the moments aligned with a model that was just reordered."""
        for moments in (self.m, self.v):
            if moments:  # created for every key on the first step
                permute_state(moments, layout, permutation)

    def state_dict(self) -> dict:
        """Everything needed to resume, as tensors and plain values."""
        return {
            "name": self.name,
            "lr": self.lr,
            "beta1": self.beta1,
            "beta2": self.beta2,
            "tau": self.tau,
            "step_count": self.step_count,
            "m": {k: t.clone() for k, t in self.m.items()},
            "v": {k: t.clone() for k, t in self.v.items()},
        }

    @classmethod
    def from_state_dict(cls, data: Mapping) -> ServerOptimizer:
        opt = cls(
            name=data["name"],
            lr=data["lr"],
            beta1=data["beta1"],
            beta2=data["beta2"],
            tau=data["tau"],
            step_count=data["step_count"],
        )
        opt.m = {k: t.clone() for k, t in data["m"].items()}
        opt.v = {k: t.clone() for k, t in data["v"].items()}
        return opt
