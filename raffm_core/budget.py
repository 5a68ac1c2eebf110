"""Client resource budgets and the cost models they are checked against.

A budget is a short string, the same one that travels in Flower node config:

=====================  =====================================================
``params=0.6``         at most 60% of the full model's parameters
``params=40M``         at most 40 million parameters (``K``, ``M``, ``G`` or a
                       plain integer)
``memory-mb=900``      at most 900 MB of memory for a training step (or, with
                       an :class:`InferenceProfile`, for a
                       forward pass)
=====================  =====================================================

A ``memory-mb`` budget is checked against a *memory profile*, any object with
``memory_mb(layout, spec) -> float`` (:class:`MemoryProfile`):
:class:`TrainingProfile` for federated training, ``InferenceProfile`` for
deployment.

Parameter counts include everything the client holds, embeddings and task
head too (tied weights once).

Training memory model (:func:`training_memory_mb`), for fp32 and AdamW::

    memory = runtime + 4 B x P_total          (weights)
                     + 4 B x P_trainable      (gradients)
                     + 8 B x P_trainable      (AdamW exp_avg and exp_avg_sq)
                     + 8 B x P_largest        (AdamW step temporaries)
                     + ACTIVATION_OVERHEAD x 4 B x activations

It estimates the peak resident memory (RSS) of the process while it trains:
what a device must hold, not what the tensors alone take.

* ``P_largest`` is the largest tensor (for BERT-like models the word
  embedding), at most ``P_trainable``. PyTorch's CPU AdamW updates one tensor
  at a time and makes two temporaries of that tensor's size
  (``sqrt(exp_avg_sq)`` and its quotient). With ``trainable_params`` set only
  the count is known, so this bound can overestimate (adapters are small).
* ``activations`` counts the fp32 values autograd saves for the backward pass
  of a batch of ``batch_size x seq_len`` tokens: per token, 3 hidden-size
  tensors for the embeddings, and per layer ``2 + NORM_ACTIVATIONS``
  hidden-size tensors (block inputs, residual adds, norms, dropout), Q, K, V
  and the attention context, two tensors per FFN input projection (its output
  and the activation or gating product), and, when attention probabilities are
  materialized, three ``heads x seq_len`` tensors (softmax output, dropout
  mask, dropped probabilities).
* :data:`ACTIVATION_OVERHEAD` covers what lives next to the saved activations
  during backward (their gradients) and what the allocator keeps afterwards.
* ``runtime`` (:data:`RUNTIME_OVERHEAD_MB`) is the peak RSS of a process that
  has imported torch, transformers and ``raffm_core`` and trained a
  negligible model. A real node's process holds more before its step (Flower,
  datasets, its data and tokenizer, what earlier work left): given that
  *baseline*, :meth:`TrainingProfile.with_baseline` takes ``runtime = baseline +``
  :data:`STEP_WORKSPACE_MB` instead, so a ``memory-mb`` budget bounds the
  whole process, not just the step.

Loading or extracting a model (briefly up to two copies of its weights) is a
one-off before training and is not part of this estimate. The constants were
measured on a 2-core Linux x86-64 machine with torch 2.13 (glibc malloc, one or
two threads). ``tests/test_budget.py`` holds the estimate within 30% of the
measured peak RSS of a real training step of MiniLM (all-MiniLM-L6-v2), a
75%-parameter sub-model of it and a tiny BERT.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from math import prod
from typing import Protocol, Self, runtime_checkable

from .errors import BudgetError
from .layout import ModelLayout
from .spec import SubnetSpec, width_count

RUNTIME_OVERHEAD_MB = 405.0
"""Peak RSS, in MB, of the process before any sizeable model: measured 243 MB
after ``import torch, transformers``, 367 MB once ``raffm_core`` has imported
``transformers.modeling_utils``, and 404 MB after two AdamW steps of a
36k-parameter BERT (autograd, BLAS and oneDNN working memory)."""

LIBRARIES_MB = 367.0
"""RSS, in MB, after importing torch, transformers and ``raffm_core``: what
:data:`RUNTIME_OVERHEAD_MB` assumes a process holds before its first step."""

STEP_WORKSPACE_MB = RUNTIME_OVERHEAD_MB - LIBRARIES_MB
"""What a training step adds to a process besides the model's own tensors
(autograd, BLAS and oneDNN working memory): 404 - 367 MB, measured as above."""

NORM_ACTIVATIONS = 4
"""Hidden-size tensors saved per token per layer, besides the inputs of the
attention and FFN blocks, for the residual adds, the two norms and dropout
(counted on BERT's saved tensors)."""

ACTIVATION_OVERHEAD = 1.3
"""Peak memory the forward and backward passes take, per byte of saved
activations. Fitted on all-MiniLM-L6-v2 and a 75% sub-model of it at batch x
sequence from 2 x 32 to 32 x 128 (fit: 1.29; every case within 6% with it)."""

ADAMW_TEMPORARIES = 2
"""Temporaries the size of the tensor being updated that one AdamW step makes."""

_SUFFIX = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "B": 10**9}
_BUDGET = re.compile(
    r"^\s*(params|memory-mb)\s*=\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([KMGB]?)\s*$"
)


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
            raise BudgetError(
                f"unknown budget kind {self.kind!r}; expected 'params' or 'memory-mb'"
            )
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
            return cls._checked(text, kind, value)
        if not suffix and value <= 1:
            return cls._checked(text, kind, value, relative=True)
        count = value * _SUFFIX[suffix]
        if count != int(count):
            raise BudgetError(f"budget {text!r}: a parameter count must be whole")
        return cls._checked(text, kind, float(int(count)))

    @classmethod
    def memory_mb_of(cls, text: str) -> float | None:
        """The MB of ``text`` if it is a valid ``memory-mb`` budget; None otherwise."""
        try:
            budget = cls.parse(text)
        except BudgetError:
            return None
        return budget.value if budget.kind == "memory-mb" else None

    @classmethod
    def _checked(cls, text: str, kind: str, value: float, relative: bool = False) -> Budget:
        try:
            return cls(kind, value, relative)
        except BudgetError as err:
            raise BudgetError(f"budget {text!r}: {err}") from None

    def __str__(self) -> str:
        if self.kind == "memory-mb":
            return f"memory-mb={self.value:g}"
        return f"params={self.value:g}" if self.relative else f"params={int(self.value)}"

    def limit(self, layout: ModelLayout) -> float:
        """The budget in its own unit: parameters or MB."""
        if self.relative:
            return self.value * layout.total_params
        return self.value

    def cost(self, layout: ModelLayout, spec: SubnetSpec, profile: MemoryProfile) -> float:
        """What ``spec`` costs in this budget's unit.

        Parameters
        ----------
        layout : ModelLayout
            The full model's layout.
        spec : SubnetSpec
        profile : MemoryProfile
            What a ``memory-mb`` budget is checked against: a
            :class:`TrainingProfile` (a training step) or an
            ``InferenceProfile`` (a forward pass). Unused for ``params``.

        Raises
        ------
        BudgetError
            If a ``memory-mb`` budget gets a profile without ``memory_mb``.
        """
        if self.kind == "params":
            return float(layout.count_params(spec))
        if not isinstance(profile, MemoryProfile):
            raise BudgetError(
                f"budget {self}: the profile {profile!r} has no memory_mb(layout, spec); "
                "expected a TrainingProfile or an InferenceProfile"
            )
        return profile.memory_mb(layout, spec)


@runtime_checkable
class MemoryProfile(Protocol):
    """What a ``memory-mb`` budget is checked against: a memory estimate per spec."""

    def memory_mb(self, layout: ModelLayout, spec: SubnetSpec) -> float:
        """Estimated peak memory, in MB, of running ``spec`` of ``layout``."""
        ...


@dataclass(frozen=True)
class _Profile:
    """What both memory profiles share: the batch, the attention kind, the runtime."""

    batch_size: int
    seq_len: int
    eager_attention: bool = False
    runtime_mb: float = RUNTIME_OVERHEAD_MB

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.seq_len < 1:
            raise BudgetError(f"batch_size and seq_len must be >= 1, got {self}")

    def with_baseline(self, baseline_mb: float | None) -> Self:
        """This profile for a process holding ``baseline_mb`` besides its work (None: as is).

        The runtime becomes ``baseline_mb +`` :data:`STEP_WORKSPACE_MB`, never
        less than ``runtime_mb`` (a baseline measured before every library
        was imported must not make room the step will need). Raises
        :class:`BudgetError` unless ``baseline_mb`` is a finite number >= 0.
        """
        if baseline_mb is None:
            return self
        if not (isinstance(baseline_mb, int | float) and 0 <= baseline_mb < math.inf):
            raise BudgetError(f"baseline_mb must be a finite number >= 0, got {baseline_mb!r}")
        runtime = max(self.runtime_mb, baseline_mb + STEP_WORKSPACE_MB)
        return dataclasses.replace(self, runtime_mb=runtime)


@dataclass(frozen=True)
class TrainingProfile(_Profile):
    """The training step a memory budget is checked against.

    Attributes
    ----------
    batch_size, seq_len : int
        Examples per step and tokens (or patches) per example.
    eager_attention : bool
        Whether attention probabilities are materialized (eager attention);
        SDPA kernels on CPU keep only per-row statistics.
    runtime_mb : float
        Fixed process overhead.
    trainable_params : int or None
        Parameters that get gradients and optimizer state; ``None`` for all of
        them (full fine-tuning).
    margin : float
        Headroom for the estimate's error, as a fraction of the step's own
        part (everything but ``runtime_mb``); 0 is the plain estimate.
    """

    batch_size: int = 16
    seq_len: int = 64
    trainable_params: int | None = None
    margin: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.margin < math.inf:
            raise BudgetError(f"margin must be a finite number >= 0, got {self.margin!r}")

    def memory_mb(self, layout: ModelLayout, spec: SubnetSpec) -> float:
        """:func:`training_memory_mb` of ``spec`` under this profile."""
        return training_memory_mb(layout, spec, self)


@dataclass(frozen=True)
class InferenceProfile(_Profile):
    """The forward pass a deployment ``memory-mb`` budget is checked against.

    Inference memory, fp32::

        memory = runtime + 4 B x P  (weights)
                         + 4 B x batch x seq x (3 x hidden + q + 2 kv + ffn_in x ffn)
                         + 4 B x batch x heads x seq x seq (eager attention only)

    The activation term is the widest single layer's live tensors, since
    without autograd each layer's intermediates are freed before the next runs.
    """

    batch_size: int = 1
    seq_len: int = 128

    def memory_mb(self, layout: ModelLayout, spec: SubnetSpec) -> float:
        """Estimated peak memory, in MB, of one forward pass of ``spec``."""
        hidden = layout.hidden_size
        widest = 0.0
        for q, kv, ffn_in in _layer_widths(layout, spec):
            live = 3 * hidden + q + 2 * kv + ffn_in
            if self.eager_attention:
                live += q // layout.head_dim * self.seq_len
            widest = max(widest, live)
        act = 4 * widest * self.batch_size * self.seq_len
        return self.runtime_mb + (4 * layout.count_params(spec) + act) / 2**20


def _layer_widths(layout: ModelLayout, spec: SubnetSpec) -> list[tuple[int, int, int]]:
    """Per kept layer: query width, key/value width, and the FFN inputs' total width.

    A layer with several attention blocks (a decoder's self- and
    cross-attention) counts each block's Q, K and V.
    """
    d, g = layout.head_dim, layout.group_size
    widths = []
    for layer, kept in zip(layout.layers, spec.layers, strict=True):
        heads = width_count(kept.heads)
        blocks = max(1, len(layer.attention_paths))
        n_in = sum(1 for role in layer.modules if role.startswith("ffn_in."))
        widths.append((blocks * heads * g * d, blocks * heads * d, n_in * width_count(kept.ffn)))
    return widths


def activation_floats(layout: ModelLayout, spec: SubnetSpec, profile: TrainingProfile) -> float:
    """fp32 values autograd saves for one backward pass (see module docstring)."""
    hidden = layout.hidden_size
    per_token = 3.0 * hidden  # embedding sum, its norm and dropout
    for q, kv, ffn_in in _layer_widths(layout, spec):
        per_token += (
            2 * hidden  # inputs of the attention and FFN blocks
            + 2 * q  # Q and the attention context
            + 2 * kv  # K and V
            + 2 * ffn_in  # per input projection: its output, activation or product
            + NORM_ACTIVATIONS * hidden
        )
        if profile.eager_attention:
            # softmax output, dropout mask, dropped probabilities
            per_token += 3 * q // layout.head_dim * profile.seq_len
    return per_token * profile.batch_size * profile.seq_len


def training_memory_mb(layout: ModelLayout, spec: SubnetSpec, profile: TrainingProfile) -> float:
    """Estimated peak RSS, in MB, of a process taking fp32 AdamW steps on ``spec``.

    Parameters
    ----------
    layout : ModelLayout
        The full model's layout.
    spec : SubnetSpec
        The sub-network being trained.
    profile : TrainingProfile
        Batch size, sequence length, trainable parameters, attention kind.

    Returns
    -------
    float
        Runtime, weights, gradients, AdamW state and temporaries, and
        activations, in MB (see the module docstring); all but the runtime
        times ``1 + profile.margin``.
    """
    shapes = layout.sub_shapes(spec)
    sizes = [prod(shape) for key, shape in shapes.items() if key not in layout.tied]
    total = sum(sizes)
    trainable = total if profile.trainable_params is None else profile.trainable_params
    largest = min(max(sizes, default=0), trainable)
    state_bytes = 4 * total + 4 * trainable + 8 * trainable + 4 * ADAMW_TEMPORARIES * largest
    act_bytes = ACTIVATION_OVERHEAD * 4 * activation_floats(layout, spec, profile)
    return profile.runtime_mb + (1 + profile.margin) * (state_bytes + act_bytes) / 2**20
