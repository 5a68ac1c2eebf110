"""What the strategy remembers about nodes and rounds; :mod:`server_app.outputs` writes it."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from logging import INFO
from typing import Any

import torch
from flwr.app import Message
from flwr.common.logger import log

from raffm_core import Budget, Permutation, SubnetSpec
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
    vocab : tuple of int or None
        The token ids of the node's data, if it reported them: the only
        token-embedding rows its sub-models need (``vocab-trim``).
    baseline_mb : float or None
        The RSS, in MB, the node's process holds besides a training step, if
        it reported it (``baseline-mb``): the largest of what it reported
        with its budget and in its train replies so far.
    """

    node_id: int
    budget: Budget
    partition_id: int | None
    max_fraction: float
    vocab: tuple[int, ...] | None = None
    baseline_mb: float | None = None


_CLIENT_FIELDS = frozenset(
    {
        "node",
        "partition-id",
        "budget",
        "spec",
        "vocab-rows",
        "heads-per-layer",
        "ffn-per-layer",
        "params",
        "params-fraction",
        "body-fraction",
        "bytes-down",
        "bytes-up",
        "status",
        "reason",
        "fit-baseline-mb",
        "predicted-mb",
        "reply-after-s",
    }
)
"""Keys of a client entry of ``rounds.json`` that are not reply metrics."""


@dataclass
class ClientRound:
    """One node's part in one round: what it was sent and what became of its reply.

    ``fit_baseline_mb`` is the node's baseline the spec was fitted with (None:
    none reported) and ``predicted_mb`` the memory model's peak RSS of the
    node's process for that spec; the node's ``baseline-mb`` and
    ``peak-memory-mb`` of this round are among the reply ``metrics``.
    """

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
    fit_baseline_mb: float | None = None
    predicted_mb: float | None = None
    reply_after_s: float | None = None  # from the push of the instruction to its reply's arrival
    body_fraction: float | None = None  # share of the heads' and FFN neurons' parameters held

    def to_dict(self) -> dict[str, Any]:
        """As ``rounds.json`` and the checkpoint hold it (:meth:`from_dict` inverts it).

        A trimmed vocabulary is recorded by its size (``vocab-rows``), not its
        token ids: they would make ``rounds.json`` grow by kilobytes per
        client and round, and they describe the node's data.
        """
        heads = [width_count(layer.heads) for layer in self.spec.layers]
        ffn = [width_count(layer.ffn) for layer in self.spec.layers]
        vocab = self.spec.vocab
        return {
            "node": self.node_id,
            "partition-id": self.partition_id,
            "budget": self.budget,
            "spec": self.spec.with_vocab(None).to_dict(),
            "vocab-rows": None if vocab is None else width_count(vocab),
            "heads-per-layer": heads,
            "ffn-per-layer": ffn,
            "params": self.params,
            "params-fraction": self.params_fraction,
            "body-fraction": self.body_fraction,
            "bytes-down": self.bytes_down,
            "bytes-up": self.bytes_up,
            "status": self.status,
            "reason": self.reason,
            "fit-baseline-mb": self.fit_baseline_mb,
            "predicted-mb": self.predicted_mb,
            "reply-after-s": self.reply_after_s,
            **self.metrics,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClientRound:
        """The entry :meth:`to_dict` wrote; every key it did not fix is a reply metric."""
        return cls(
            node_id=data["node"],
            partition_id=data["partition-id"],
            budget=data["budget"],
            spec=SubnetSpec.from_dict(data["spec"]),
            params=data["params"],
            params_fraction=data["params-fraction"],
            bytes_down=data["bytes-down"],
            bytes_up=data["bytes-up"],
            status=data["status"],
            reason=data["reason"],
            body_fraction=data.get("body-fraction"),
            metrics={k: v for k, v in data.items() if k not in _CLIENT_FIELDS},
            fit_baseline_mb=data.get("fit-baseline-mb"),  # absent before issue 12
            predicted_mb=data.get("predicted-mb"),
            reply_after_s=data.get("reply-after-s"),
        )


@dataclass
class Sent:
    """An instruction of the current round, the spec it carries, and its node's log entry."""

    message: Message
    spec: SubnetSpec
    client: ClientRound


State = dict[str, torch.Tensor]
"""A state dict: tensor key to tensor."""


@dataclass
class Pending:
    """What a round sent, kept to validate the replies against it."""

    server_round: int
    state: State
    permutation: Permutation | None
    sent: list[Sent] = field(default_factory=list)


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
    phases: dict[str, float] = field(default_factory=dict)
    """Seconds of the round by phase, in order (:meth:`lap`): ``configure-s`` (prioritize,
    extract, serialize), ``train-wait-s`` (until every train reply is in or the timeout),
    ``aggregate-s`` (validate, fuse), ``evaluate-wait-s`` (federated evaluation, if any),
    ``central-evaluate-s``."""
    importance: dict[str, float] = field(default_factory=dict)
    reorder: dict[str, float] = field(default_factory=dict)
    """Prioritizing strategies: how much of the narrowest prefix stayed in place
    (:func:`server_app.strategy.prefix_kept`)."""
    """Salience ``taylor``: replies whose importance was fused, their bytes, seconds spent."""
    _lap_at: float | None = field(default=None, repr=False, compare=False)

    def lap(self, phase: str) -> None:
        """Record the seconds since the previous lap (or ``started``) as ``phase``."""
        now = time.monotonic()
        self.phases[phase] = now - (self.started if self._lap_at is None else self._lap_at)
        self._lap_at = now

    @property
    def num_accepted(self) -> int:
        return sum(c.status == "accepted" for c in self.clients)

    def to_dict(self) -> dict[str, Any]:
        """As ``rounds.json`` and the checkpoint hold it (:meth:`from_dict` inverts it)."""
        return {
            "round": self.server_round,
            "clients-sampled": len(self.clients),
            "clients-accepted": self.num_accepted,
            "clients-excluded": [{"node": n, "reason": r} for n, r in self.excluded.items()],
            "kept-previous-model": self.kept_previous,
            "wall-time-s": self.wall_time_s,
            "phases-s": self.phases,
            "train-metrics": self.train_metrics,
            "federated-evaluation": self.evaluate_metrics,
            **({"importance": self.importance} if self.importance else {}),
            **({"reorder": self.reorder} if self.reorder else {}),
            "clients": [c.to_dict() for c in self.clients],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RoundLog:
        """The round :meth:`to_dict` wrote; ``started`` (a monotonic clock) is not kept."""
        return cls(
            server_round=data["round"],
            started=0.0,
            clients=[ClientRound.from_dict(c) for c in data["clients"]],
            kept_previous=data["kept-previous-model"],
            wall_time_s=data["wall-time-s"],
            train_metrics=dict(data["train-metrics"]),
            evaluate_metrics=dict(data["federated-evaluation"]),
            excluded={int(e["node"]): e["reason"] for e in data["clients-excluded"]},
            phases=dict(data.get("phases-s", {})),  # absent from checkpoints before it existed
            importance=dict(data.get("importance", {})),
            reorder=dict(data.get("reorder", {})),
        )


def log_progress(
    entry: RoundLog | None,
    server_round: int,
    num_rounds: int,
    metrics: Mapping[str, float] | None,
    exclude: str = "num-examples",
) -> None:
    """Log the line of a finished round (``entry`` is ``None`` for round 0) and its wall time."""
    scores = ", ".join(
        f"{k} {v:.3f}"
        for k, v in (metrics or {}).items()
        if not k.endswith(exclude) and isinstance(v, float | int)
    )
    if entry is None:
        log(INFO, "round 0/%d: initial global model, %s", num_rounds, scores or "-")
        return
    entry.wall_time_s = time.monotonic() - entry.started
    rejected = sum(c.status != "accepted" for c in entry.clients)
    kept = ", previous model kept" if entry.kept_previous else ""
    if entry.excluded:
        kept += f", {len(entry.excluded)} excluded"
    log(
        INFO,
        "round %d/%d: %d clients (%d rejected%s), %s, %.1f s",
        server_round,
        num_rounds,
        len(entry.clients),
        rejected,
        kept,
        scores or "-",
        entry.wall_time_s,
    )
