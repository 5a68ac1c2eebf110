"""Client resource budgets and the cost models they are checked against.

A budget is a short string, the same one that travels in Flower node config:

=====================  =====================================================
``params=0.6``         at most 60% of the full model's parameters
``params=40M``         at most 40 million parameters (``K``, ``M``, ``G`` or a
                       plain integer)
``memory-mb=900``      at most 900 MB of memory for a training step
=====================  =====================================================

Parameter counts include everything the client holds, embeddings and task
head too (tied weights once).

Training memory model (:func:`training_memory_mb`), for fp32 and AdamW::

    memory = runtime + 4 B x P_total          (weights)
                     + 4 B x P_trainable      (gradients)
                     + 8 B x P_trainable      (AdamW exp_avg and exp_avg_sq)
                     + activations

``activations`` counts the fp32 tensors autograd keeps for the backward pass,
per token and per layer: the inputs and outputs of every linear projection,
the FFN activation, ``NORM_ACTIVATIONS`` hidden-size tensors for residuals,
norms and dropout, and, for eager attention, the ``heads x seq_len`` attention
probabilities; plus the embedding output. ``runtime`` is the resident memory
of a Python process with torch and transformers loaded
(:data:`RUNTIME_OVERHEAD_MB`, measured on a 2-core Linux x86-64 machine).
``tests/test_budget.py`` holds the estimate within 30% of the measured peak
resident memory of a real training step.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import BudgetError
from .layout import ModelLayout
from .spec import SubnetSpec, width_count

RUNTIME_OVERHEAD_MB = 420.0
"""Resident memory of ``python -c 'import torch, transformers'`` plus the
allocator's working set, measured on this project's CPU machines."""

NORM_ACTIVATIONS = 6
"""Hidden-size tensors kept per token per layer for residual adds, two norms
and dropout masks."""

_SUFFIX = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "B": 10**9}
_BUDGET = re.compile(r"^\s*(params|memory-mb)\s*=\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([KMGB]?)\s*$")


@dataclass(frozen=True)
class Budget:
    """A client's resource budget.

    Attributes
    ----------
    kind : {"params", "memory-mb"}
    value : float
        A fraction of the full model (``relative``) or an absolute amount.
    relative : bool
        Whether ``value`` is a fraction of the full model's parameters.
    """

    kind: str
    value: float
    relative: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ("params", "memory-mb"):
            raise BudgetError(f"unknown budget kind {self.kind!r}; expected 'params' or 'memory-mb'")
        if not self.value > 0:
            raise BudgetError(f"budget {self.kind} must be positive, got {self.value}")
        if self.relative and (self.kind != "params" or self.value > 1):
            raise BudgetError(f"a relative budget is a parameter fraction in (0, 1], got {self}")

    @classmethod
    def parse(cls, text: str) -> Budget:
        """Parse ``params=0.6``, ``params=40M`` or ``memory-mb=900``.

        A ``params`` value of at most 1 without a suffix is a fraction of the
        full model; anything else is an absolute count.

        Raises
        ------
        BudgetError
            If ``text`` is not one of these forms; the message quotes it.
        """
        if not isinstance(text, str):
            raise BudgetError(f"a budget must be a string, got {type(text).__name__}")
        match = _BUDGET.match(text)
        if not match:
            raise BudgetError(
                f"cannot parse budget {text!r}; expected 'params=0.6', 'params=40M' "
                "or 'memory-mb=900'"
            )
        kind, number, suffix = match.groups()
        value = float(number)
        if kind == "memory-mb":
            if suffix:
                raise BudgetError(f"budget {text!r}: memory-mb takes a plain number of MB")
            return cls(kind, value)
        if not suffix and value <= 1:
            return cls(kind, value, relative=True)
        count = value * _SUFFIX[suffix]
        if count != int(count):
            raise BudgetError(f"budget {text!r}: a parameter count must be whole")
        return cls(kind, float(int(count)))

    def __str__(self) -> str:
        if self.kind == "memory-mb":
            return f"memory-mb={self.value:g}"
        return f"params={self.value:g}" if self.relative else f"params={int(self.value)}"

    def limit(self, layout: ModelLayout) -> float:
        """The budget in its own unit: parameters or MB."""
        if self.relative:
            return self.value * layout.total_params
        return self.value

    def cost(self, layout: ModelLayout, spec: SubnetSpec, profile: TrainingProfile) -> float:
        """What ``spec`` costs in this budget's unit."""
        if self.kind == "params":
            return float(layout.count_params(spec))
        return training_memory_mb(layout, spec, profile)


@dataclass(frozen=True)
class TrainingProfile:
    """The training step a memory budget is checked against.

    Attributes
    ----------
    batch_size, seq_len : int
        Examples per step and tokens (or patches) per example.
    trainable_params : int or None
        Parameters that get gradients and optimizer state; ``None`` for all of
        them (full fine-tuning).
    eager_attention : bool
        Whether attention probabilities are materialized (eager attention);
        SDPA kernels on CPU keep only per-row statistics.
    runtime_mb : float
        Fixed process overhead.
    """

    batch_size: int = 16
    seq_len: int = 64
    trainable_params: int | None = None
    eager_attention: bool = False
    runtime_mb: float = RUNTIME_OVERHEAD_MB

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.seq_len < 1:
            raise BudgetError(f"batch_size and seq_len must be >= 1, got {self}")


def activation_floats(layout: ModelLayout, spec: SubnetSpec, profile: TrainingProfile) -> float:
    """fp32 values autograd keeps for one backward pass (see module docstring)."""
    hidden = layout.shapes[layout.layers[0].heads[0].key][1]
    d, g = layout.head_dim, layout.group_size
    n_in = len(layout.family.ffn_in)
    per_token = 2.0 * hidden  # embedding output and its norm
    for kept in spec.layers:
        heads = width_count(kept.heads)
        ffn = width_count(kept.ffn)
        q = heads * g * d
        kv = heads * d
        per_token += (
            2 * hidden  # inputs of the attention and FFN blocks
            + q + 2 * kv + q  # Q, K, V and the attention context
            + n_in * ffn + ffn  # up (and gate) outputs, the activation
            + NORM_ACTIVATIONS * hidden
        )
        if profile.eager_attention:
            per_token += 1.25 * heads * g * profile.seq_len  # probabilities + dropout mask
    return per_token * profile.batch_size * profile.seq_len


def training_memory_mb(layout: ModelLayout, spec: SubnetSpec, profile: TrainingProfile) -> float:
    """Estimated peak memory, in MB, of one fp32 AdamW training step of ``spec``."""
    total = layout.count_params(spec)
    trainable = total if profile.trainable_params is None else profile.trainable_params
    state_bytes = 4 * total + 4 * trainable + 8 * trainable
    act_bytes = 4 * activation_floats(layout, spec, profile)
    return profile.runtime_mb + (state_bytes + act_bytes) / 2**20
