"""Data-aware salience: first-order Taylor importance of heads and FFN neurons.

RaFFM ranks units by the norm of their weights (paper Eq. 1), which needs no
data. :func:`taylor_importance` ranks them by how much the loss would change,
to first order, if a unit were switched off (Molchanov et al., 2017/2019):
for the input ``a`` of the attention output projection (one block of columns
per head group) and of the FFN output projection (one column per neuron),
a unit's importance on one example is ``|sum over its channels and tokens of
a * dL/da|``, summed over examples. The scores feed
:func:`raffm_core.rank_units` (``scores=``). In a federation, nodes would
compute them on their own data and send these few numbers per layer
(:func:`record_taylor` during local training); the server fuses them over the
nodes that held each unit (:class:`ImportanceTracker`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch
from transformers import PreTrainedModel

from .extract import spec_of
from .layout import describe
from .spec import width_count

UnitScores = tuple[torch.Tensor, torch.Tensor]
"""Per layer: ``(head_groups,)`` and ``(ffn_neurons,)`` importance, float64."""


class TaylorRecorder:
    """Accumulates first-order Taylor importance over the backward passes of a model.

    Hooks on the input ``a`` of every attention output projection (one block
    of columns per head group) and FFN output projection (one column per
    neuron) add, per example, ``|sum over the unit's channels and tokens of
    a * dL/da|`` to the unit's score. Positions are the model's own: for a
    sub-model from :func:`raffm_core.build_submodel`, its ``i``-th kept unit.
    Use :func:`record_taylor`; :attr:`scores` and :attr:`examples` hold the
    sums so far.
    """

    def __init__(self, model: PreTrainedModel) -> None:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        layout = describe(base)
        spec = spec_of(base) or layout.full_spec()
        self.scores: list[UnitScores] = [
            (
                torch.zeros(width_count(kept.heads), dtype=torch.float64),
                torch.zeros(width_count(kept.ffn), dtype=torch.float64),
            )
            for kept in spec.layers
        ]
        self.examples = 0
        self._block = layout.group_size * layout.head_dim
        self._handles = []
        for layer in layout.layers:
            for role, path in layer.modules.items():
                kind = role.rpartition(".")[2]  # every attention block's output (T5: cross too)
                if kind in ("attn_out", "ffn_out"):
                    module = base.get_submodule(path)
                    hook = self._capture(layer.index, kind)
                    self._handles.append(module.register_forward_pre_hook(hook))

    def _capture(self, layer: int, kind: str):
        def hook(module, args):
            x = args[0]
            if not x.requires_grad:
                return None
            # The gradient hook holds the activation's data, never ``x`` itself: a hook
            # on ``x`` that referred to ``x`` would be a reference cycle, and every
            # step's activations would stay alive until the garbage collector ran.
            a = x.detach()

            def on_grad(g: torch.Tensor) -> None:
                # Sum over tokens in float32 (the activation's size), accumulate the few
                # per-example sums in float64: a float64 copy of every activation
                # would double the hook's cost on each training step.
                per_channel = (a.float() * g.float()).reshape(a.shape[0], -1, a.shape[-1])
                per_example = per_channel.sum(1).to(torch.float64)
                if kind == "attn_out":
                    units = per_example.reshape(a.shape[0], -1, self._block).sum(-1)
                    self.scores[layer][0][: units.shape[1]] += units.abs().sum(0)
                else:
                    self.scores[layer][1][: per_example.shape[1]] += per_example.abs().sum(0)

            x.register_hook(on_grad)
            return None

        return hook

    def count(self, examples: int) -> None:
        """Note that a backward pass over ``examples`` examples was recorded."""
        self.examples += examples

    def mean(self) -> list[UnitScores]:
        """Scores per example (zeros before any example)."""
        n = max(1, self.examples)
        return [(h / n, f / n) for h, f in self.scores]

    def remove(self) -> None:
        """Remove the hooks; the scores stay."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


@contextmanager
def record_taylor(model: PreTrainedModel) -> Iterator[TaylorRecorder]:
    """Record Taylor importance during whatever backward passes run inside the block.

    The training loop calls ``recorder.count(batch_size)`` after each
    backward pass; nothing else changes (the hooks only read activations and
    gradients). In federated training a node sends :meth:`TaylorRecorder.mean`
    with its reply (a few numbers per layer), which the server fuses
    (:class:`raffm_core.importance.ImportanceTracker`).
    """
    recorder = TaylorRecorder(model)
    try:
        yield recorder
    finally:
        recorder.remove()


def taylor_importance(
    model: PreTrainedModel, batches: Iterable[Mapping[str, torch.Tensor]]
) -> list[UnitScores]:
    """Taylor importance of every head group and FFN neuron of a model, summed over examples.

    Parameters
    ----------
    model : PreTrainedModel
        A full model (or sub-model) of a supported family; its weights are
        not changed (gradients are computed and then cleared).
    batches : iterable of mappings
        Model inputs with ``labels``, so that ``model(**batch).loss`` exists.

    Returns
    -------
    list of (Tensor, Tensor)
        One pair per layer of :func:`raffm_core.describe`, in layer order.
    """
    was_training = model.training
    model.eval()  # no dropout: the importance of the model as it runs
    try:
        with record_taylor(model) as recorder:
            for batch in batches:
                model.zero_grad(set_to_none=True)
                model(**batch).loss.backward()
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return recorder.scores


def _positions(width) -> torch.Tensor:
    """The global unit indices a sub-model's kept units stand for, in its own order."""
    if isinstance(width, int):
        return torch.arange(width)
    return torch.as_tensor(list(width), dtype=torch.long)


class ImportanceTracker:
    """The server's running estimate of every unit's Taylor importance, in the global order.

    Each round, :meth:`update` fuses the scores the nodes sent for their
    sub-models (per example, :meth:`TaylorRecorder.mean`): a unit's round
    score is the mean over the nodes that held it, weighted by their
    examples, and its estimate moves to it by an exponential moving average
    (``decay`` of the old estimate is kept; a unit's first score is taken
    as it is). A unit nobody held this round keeps its estimate; a unit
    nobody ever held has none (NaN), and :meth:`salience` ranks it after
    every scored unit of its layer, by weight norm among its kind. Scores
    live in the global model's unit order: when the server reorders the
    model, :meth:`permute` reorders them alike.

    Parameters
    ----------
    layout : ModelLayout
        The full model's layout.
    decay : float
        Share of the previous estimate kept each round, in ``[0, 1)``.
    """

    def __init__(self, layout, decay: float = 0.5) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay!r}")
        self.layout = layout
        self.decay = decay
        nan = float("nan")
        self.heads = [
            torch.full((layout.num_groups,), nan, dtype=torch.float64) for _ in layout.layers
        ]
        self.ffn = [torch.full((layout.ffn_size,), nan, dtype=torch.float64) for _ in layout.layers]

    @property
    def scored(self) -> bool:
        """Whether any unit has an estimate yet."""
        return any(bool((~h.isnan()).any()) for h in self.heads)

    def update(self, contributions) -> None:
        """Fuse one round's scores.

        Parameters
        ----------
        contributions : iterable of (SubnetSpec, list of (Tensor, Tensor), float)
            Per node: the spec it was sent (indexing the global order), its
            per-example scores per layer in its sub-model's unit order, and
            its weight (examples).

        Raises
        ------
        ValueError
            If a node's scores do not have its spec's layers and widths; nothing changes then.
        """
        contributions = list(contributions)
        for spec, scores, weight in contributions:
            if len(scores) != self.layout.num_layers:
                raise ValueError(
                    f"importance has {len(scores)} layers, the model has {self.layout.num_layers}"
                )
            for i, (kept, (h, f)) in enumerate(zip(spec.layers, scores, strict=True)):
                if h.shape != (width_count(kept.heads),) or f.shape != (width_count(kept.ffn),):
                    raise ValueError(
                        f"importance of layer {i} has shapes {tuple(h.shape)}, {tuple(f.shape)}; "
                        f"the spec keeps {width_count(kept.heads)} head groups and "
                        f"{width_count(kept.ffn)} FFN neurons"
                    )
            if not weight > 0 or not all(
                bool(torch.isfinite(t).all()) and bool((t >= 0).all()) for p in scores for t in p
            ):
                raise ValueError("importance must be finite and non-negative, weights positive")
        for i in range(self.layout.num_layers):
            for kind, current in ((0, self.heads), (1, self.ffn)):
                num = torch.zeros_like(current[i])
                den = torch.zeros_like(current[i])
                for spec, scores, weight in contributions:
                    kept = spec.layers[i].heads if kind == 0 else spec.layers[i].ffn
                    where = _positions(kept)
                    num.index_add_(0, where, scores[i][kind].to(torch.float64) * weight)
                    den.index_add_(0, where, torch.full((len(where),), float(weight)).double())
                held = den > 0
                fresh = num / den.clamp_min(1e-300)
                old = current[i]
                blended = torch.where(
                    old.isnan(), fresh, self.decay * old + (1 - self.decay) * fresh
                )
                current[i] = torch.where(held, blended, old)

    def permute(self, permutation) -> None:
        """Reorder the estimates as the global model was (``permutation`` from ``rank_units``)."""
        for i, layer in enumerate(permutation.layers):
            self.heads[i] = self.heads[i][layer.heads]
            self.ffn[i] = self.ffn[i][layer.ffn]

    def salience(self, state, norm: str = "l1") -> list[UnitScores] | None:
        """Scores for :func:`raffm_core.rank_units` (``scores=``), or ``None`` before any.

        A scored unit's salience is its estimate (>= 0); an unscored one's is
        in ``[-1, 0)``, ordered by its weight norm, so it ranks after every
        scored unit of its layer.
        """
        if not self.scored:
            return None
        from .prioritize import _norm_fn, _unit_scores

        fn = _norm_fn(norm)
        out = []
        for i, layer in enumerate(self.layout.layers):
            pair = []
            for est, coupled, size in (
                (self.heads[i], layer.heads, self.layout.num_groups),
                (self.ffn[i], layer.ffn, self.layout.ffn_size),
            ):
                weights = _unit_scores(state, coupled, fn, size)
                fallback = weights / (weights.max() + 1e-12) - 1.0 - 1e-9
                pair.append(torch.where(est.isnan(), fallback, est))
            out.append(tuple(pair))
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The estimates as tensors (for checkpoints)."""
        return {
            **{f"heads.{i}": h.clone() for i, h in enumerate(self.heads)},
            **{f"ffn.{i}": f.clone() for i, f in enumerate(self.ffn)},
        }

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore :meth:`state_dict`."""
        self.heads = [state[f"heads.{i}"].clone() for i in range(self.layout.num_layers)]
        self.ffn = [state[f"ffn.{i}"].clone() for i in range(self.layout.num_layers)]


__all__ = [
    "ImportanceTracker",
    "TaylorRecorder",
    "UnitScores",
    "record_taylor",
    "taylor_importance",
]
