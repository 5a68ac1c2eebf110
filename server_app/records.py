"""What the strategy remembers about nodes and rounds; :mod:`server_app.outputs` writes it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flwr.app import Message

from raffm_core import Budget, SubnetSpec
from raffm_core.spec import width_count


@dataclass(frozen=True)
class NodeBudget:
    """A node that reported a usable budget.

    Attributes
    ----------
    node_id : int
    budget : Budget
    partition_id : int or None
        Reported by simulated nodes; orders sampling reproducibly.
    max_fraction : float
        Parameter fraction of the largest uniform sub-network within the budget.
    """

    node_id: int
    budget: Budget
    partition_id: int | None
    max_fraction: float


@dataclass
class ClientRound:
    """One node's part in one round: what it was sent and what became of its reply."""

    node_id: int
    partition_id: int | None
    budget: str
    spec: SubnetSpec
    params: int
    params_fraction: float
    bytes_down: int
    bytes_up: int = 0
    status: str = "sent"  # then "accepted" or "rejected"
    reason: str = ""
    metrics: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        heads = [width_count(layer.heads) for layer in self.spec.layers]
        ffn = [width_count(layer.ffn) for layer in self.spec.layers]
        return {
            "node": self.node_id,
            "partition-id": self.partition_id,
            "budget": self.budget,
            "spec": self.spec.to_dict(),
            "heads-per-layer": heads,
            "ffn-per-layer": ffn,
            "params": self.params,
            "params-fraction": self.params_fraction,
            "bytes-down": self.bytes_down,
            "bytes-up": self.bytes_up,
            "status": self.status,
            "reason": self.reason,
            **self.metrics,
        }


@dataclass
class Sent:
    """An instruction of the current round, the spec it carries, and its node's log entry."""

    message: Message
    spec: SubnetSpec
    client: ClientRound


@dataclass
class RoundLog:
    """One round as the strategy saw it (central metrics are filled in after evaluation)."""

    server_round: int
    started: float
    clients: list[ClientRound]
    kept_previous: bool = False
    wall_time_s: float | None = None
    train_metrics: dict[str, Any] = field(default_factory=dict)
    evaluate_metrics: dict[str, Any] = field(default_factory=dict)
    excluded: dict[int, str] = field(default_factory=dict)  # node id -> why it was left out

    @property
    def num_accepted(self) -> int:
        return sum(c.status == "accepted" for c in self.clients)

    def to_dict(self) -> dict[str, Any]:
        return {
            "round": self.server_round,
            "clients-sampled": len(self.clients),
            "clients-accepted": self.num_accepted,
            "clients-excluded": [{"node": n, "reason": r} for n, r in self.excluded.items()],
            "kept-previous-model": self.kept_previous,
            "wall-time-s": self.wall_time_s,
            "train-metrics": self.train_metrics,
            "federated-evaluation": self.evaluate_metrics,
            "clients": [c.to_dict() for c in self.clients],
        }
