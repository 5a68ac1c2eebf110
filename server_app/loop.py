"""The run around Flower's loop: waiting for nodes, budget queries, one progress line per round.

A mixin of :class:`server_app.strategy.RaFFM`, which provides ``layout``,
``profile``, ``query_timeout``, ``min_available_nodes``, ``nodes``,
``skipped``, ``history`` and ``arrivals``, and the settings :meth:`RunLoop.summary`
logs when Flower's loop starts.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from raffm_core.task.memory import release_memory

from .nodes import query_budgets, wait_for_nodes
from .progress import ProgressGrid
from .records import NodeBudget, log_progress


class NothingToTrain(RuntimeError):
    """No node can train: the run would finish without ever changing the model."""


EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]
RoundEndFn = Callable[[int, ArrayRecord, MetricRecord | None], None]


class RunLoop:
    """``start`` with budget queries first; the hooks a resumed run uses too."""

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: EvaluateFn | None = None,
        *,
        on_round_end: RoundEndFn | None = None,
    ) -> Result:
        """Query budgets, then run Flower's loop; logs progress as replies arrive and per round.

        Parameters and return value as :meth:`flwr.serverapp.strategy.Strategy.start`,
        plus:

        on_round_end : callable, optional
            ``on_round_end(server_round, arrays, central_metrics)`` after each
            complete round, and after the initial evaluation as round 0 (the
            ServerApp writes its checkpoint there).

        A resumed run starts through ``server_app.checkpoint.RoundOffset``, which
        uses :meth:`prepare` and :meth:`reporting` the same way.
        """
        self.prepare(grid, num_rounds)
        return Strategy.start(
            self,
            self.progress_grid(grid),  # "round 2: 4 of 10 train replies" while a round waits
            initial_arrays,
            num_rounds,
            timeout,
            train_config,
            evaluate_config,
            self.reporting(evaluate_fn, on_round_end),
        )

    def progress_grid(self, grid: Grid) -> ProgressGrid:
        """``grid``, logging replies as they arrive and noting when in ``self.arrivals``."""
        return ProgressGrid(grid, arrivals=self.arrivals)

    def summary(self) -> None:
        """Log the strategy's configuration (Flower's loop calls it when it starts)."""
        log(
            INFO,
            "\t├──> Sampling: fraction train %.2f (min %d) | evaluate %.2f (min %d)",
            self.fraction_train,
            self.min_train_nodes,
            self.fraction_evaluate,
            self.min_evaluate_nodes,
        )
        log(
            INFO,
            "\t├──> Nodes: wait for %s | min replies %d",
            self.min_available_nodes or "those registered (min-available-nodes = 0)",
            self.min_replies,
        )
        log(
            INFO,
            "\t├──> Sub-networks: %s selection, %s salience, %s layers of %d params, %s",
            self.selection_mode,
            self.salience_norm,
            self.layout.num_layers,
            self.layout.total_params,
            "vocabulary trimmed to each node's tokens" if self.trim_vocab else "whole vocabulary",
        )
        log(
            INFO,
            "\t└──> Server update: %s (proximal-mu %g)",
            self.server_optimizer.name,
            self.proximal_mu,
        )

    def prepare(self, grid: Grid, num_rounds: int) -> None:
        """Before round 1: wait for nodes, query budgets; ``num_rounds`` is the last round.

        Raises
        ------
        NothingToTrain
            If every node was skipped (its budget unparsable or below the
            smallest sub-network, or no answer); the message counts the reasons.
        """
        self.num_rounds = num_rounds
        wait_for_nodes(grid, self.min_available_nodes, self.query_timeout)
        self.query_budgets(grid)
        if not self.nodes:
            reasons = Counter(self.skipped.values())
            shown = "; ".join(f"{n} x {reason}" for reason, n in reasons.most_common(4))
            raise NothingToTrain(
                f"no node can train: all {len(self.skipped)} nodes were skipped ({shown})"
            )

    def reporting(
        self, evaluate_fn: EvaluateFn | None, on_round_end: RoundEndFn | None
    ) -> EvaluateFn:
        """``evaluate_fn`` for Flower's loop: evaluate, log progress, ``on_round_end``, trim.

        Then :func:`raffm_core.task.memory.release_memory`, so the server's RSS
        stays flat over long runs.
        """

        def evaluate_and_report(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            entry = self.history.get(server_round)
            if entry is not None:
                entry.lap("evaluate-wait-s")
            metrics = evaluate_fn(server_round, arrays) if evaluate_fn else None
            if entry is not None:
                entry.lap("central-evaluate-s")
            log_progress(entry, server_round, self.num_rounds, metrics)
            if on_round_end is not None:
                on_round_end(server_round, arrays, metrics)
            release_memory()  # the round's prioritized copy and sub-models are garbage now
            return metrics

        return evaluate_and_report

    def query_budgets(self, grid: Grid, node_ids: Iterable[int] | None = None) -> None:
        """Ask nodes (default: every registered one) for their budget; see :mod:`.nodes`."""
        node_ids = grid.get_node_ids() if node_ids is None else node_ids
        usable, skipped = query_budgets(
            grid, node_ids, self.layout, self.profile, self.query_timeout, self.trim_vocab
        )
        self.nodes.update(usable)
        self.skipped.update(skipped)

    def _query_newcomers(self, grid: Grid) -> None:
        new = [n for n in grid.get_node_ids() if n not in self.nodes and n not in self.skipped]
        if new:
            self.query_budgets(grid, new)

    def _eligible(self, grid: Grid) -> list[NodeBudget]:
        return [self.nodes[n] for n in grid.get_node_ids() if n in self.nodes]
