"""The peers RaFFM is compared with, as strategies that swap only how sub-models are chosen.

Each is a :class:`~server_app.strategy.RaFFM` whose two hooks differ:
:meth:`~server_app.strategy.RaFFM.prepare_state` (none of them prioritizes:
sub-models are cut from the global model as it is) and
:meth:`~server_app.strategy.RaFFM.choose_spec`. Everything else is shared:
node sampling, the ClientApp and its obligations (see
:class:`~server_app.strategy.RaFFM`), reply validation, slice-aware fusion
(:func:`raffm_core.aggregate`) and the server update
(:class:`raffm_core.ServerOptimizer`). So a comparison measures the choice of
sub-model and nothing else.

* :class:`FullModelFedAvg`: every node trains the full model (McMahan et
  al., 2017). A node whose budget cannot hold it is left out of the round
  and reported, unless ``train_all``, which trains it anyway (the paper's
  "FL" baseline, an upper bound that ignores the budgets).
* :class:`HeteroFL`: static prefix widths from the budget (Diao et al.,
  ICLR 2021), without prioritization.
* :class:`FedRolex`: a window of units per layer, as wide as the budget
  allows, that rolls forward every round (Alam et al., NeurIPS 2022), so
  narrow nodes train every unit in turn.
"""

from __future__ import annotations

from logging import INFO
from typing import Any

from flwr.app import ArrayRecord
from flwr.common.logger import log

from raffm_core import BudgetError, Permutation, SubnetSpec, select_subnet
from raffm_core.rolling import rolling_spec
from raffm_core.task.config import RunConfig

from .records import NodeBudget
from .strategy import RaFFM, State


class _Unprioritized(RaFFM):
    """Sub-models are cut from the global model in its own unit order."""

    description = ""

    def prepare_state(self, arrays: ArrayRecord) -> tuple[State, Permutation | None]:
        """The global model as fresh tensors, not reordered; no permutation."""
        return dict(arrays.to_torch_state_dict()), None

    def summary(self) -> None:
        """Log which method this is, then the shared configuration."""
        log(INFO, "\t├──> Method: %s", self.description)
        super().summary()

    def _prefix_widths(self, node: NodeBudget) -> SubnetSpec:
        """The widest uniform prefix within the node's budget (deterministic)."""
        return select_subnet(
            self.layout, node.budget, "largest", profile=self.node_profile(node), vocab=node.vocab
        )


class FullModelFedAvg(_Unprioritized):
    """FedAvg on the full model: every node that takes part trains all of it.

    Parameters
    ----------
    layout, base_config, **kwargs
        As :class:`~server_app.strategy.RaFFM` (``selection_mode`` and
        ``salience_norm`` are unused).
    train_all : bool
        ``False`` (default): a node whose budget cannot hold the full model is
        excluded from the round, with a log line, and counted in the round's
        ``clients-excluded`` and the run's summary. ``True``: every node trains
        the full model whatever its budget, as the paper's "FL" baseline does.
    """

    def __init__(self, *args: Any, train_all: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.train_all = train_all
        self.description = "FedAvg, full model " + (
            "for every node (budgets ignored)" if train_all else "(nodes it does not fit excluded)"
        )

    def choose_spec(self, node: NodeBudget, server_round: int, stage: str) -> SubnetSpec:
        """The full model's spec (the whole body; under ``trim_vocab`` the node's token rows).

        Raises
        ------
        BudgetError
            Without ``train_all``, if the node's budget cannot hold the full model.
        """
        full = self.layout.full_spec()
        if self.trim_vocab:  # the whole body on the node's own token rows, as every row gets
            full = full.with_vocab(node.vocab)
        if self.train_all:
            return full
        cost = node.budget.cost(self.layout, full, self.node_profile(node))
        limit = node.budget.limit(self.layout)
        if cost > limit:
            unit = "parameters" if node.budget.kind == "params" else "MB"
            raise BudgetError(
                f"the full model needs {cost:,.0f} {unit}, over the budget's {limit:,.0f}; "
                "excluded (fedavg-train-all = true would train it anyway)"
            )
        return full


class HeteroFL(_Unprioritized):
    """HeteroFL: each node trains the leading units, as many as its budget allows.

    The widths are the widest uniform prefix within the budget
    (:func:`raffm_core.select_subnet`, ``"largest"``), the same sizes RaFFM
    sends with ``selection-mode = "largest"``; but the units are taken in the
    model's own order, never reordered by salience. Parameters as
    :class:`~server_app.strategy.RaFFM`.
    """

    description = "HeteroFL, static prefix widths without prioritization"

    def choose_spec(self, node: NodeBudget, server_round: int, stage: str) -> SubnetSpec:
        """The node's static prefix widths."""
        return self._prefix_widths(node)


class FedRolex(_Unprioritized):
    """FedRolex: a rolling window of units, as wide as the budget allows.

    In round ``t`` a node keeps, in every layer, the units
    ``t*step .. t*step + w - 1`` (mod the layer's size) of each axis, where
    ``w`` is its HeteroFL width (:func:`raffm_core.rolling.rolling_spec`).
    Windows are explicit index sets in the :class:`~raffm_core.SubnetSpec`.

    Parameters
    ----------
    layout, base_config, **kwargs
        As :class:`~server_app.strategy.RaFFM`.
    rolling_step : int
        Head groups the window advances per round (FFN windows advance
        proportionally); FedRolex uses 1.
    """

    description = "FedRolex, rolling windows without prioritization"

    def __init__(self, *args: Any, rolling_step: int = 1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if isinstance(rolling_step, bool) or not isinstance(rolling_step, int) or rolling_step < 1:
            raise ValueError(f"rolling_step must be an int >= 1, got {rolling_step!r}")
        self.rolling_step = rolling_step

    def choose_spec(self, node: NodeBudget, server_round: int, stage: str) -> SubnetSpec:
        """The node's widths, as the window of ``server_round``."""
        return rolling_spec(self.layout, self._prefix_widths(node), server_round, self.rolling_step)


STRATEGY_CLASSES: dict[str, type[RaFFM]] = {
    "raffm": RaFFM,
    "fedavg": FullModelFedAvg,
    "heterofl": HeteroFL,
    "fedrolex": FedRolex,
}
"""The strategy class of each run-config ``strategy`` name."""


def strategy_class(name: str) -> type[RaFFM]:
    """The strategy class named ``name``.

    Raises
    ------
    ValueError
        For an unknown name; the message lists the valid ones.
    """
    if name not in STRATEGY_CLASSES:
        raise ValueError(
            f"unknown strategy {name!r}; expected one of {', '.join(map(repr, STRATEGY_CLASSES))}"
        )
    return STRATEGY_CLASSES[name]


def strategy_options(cfg: RunConfig) -> dict[str, Any]:
    """Keyword arguments only the strategy named in ``cfg`` takes."""
    if cfg.strategy == "fedavg":
        return {"train_all": cfg.fedavg_train_all}
    if cfg.strategy == "fedrolex":
        return {"rolling_step": cfg.rolling_step}
    if cfg.strategy == "raffm":
        return {"rolling_tail": cfg.rolling_tail}
    return {}
