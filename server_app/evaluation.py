"""Federated evaluation: sampled nodes score their own sub-model of the global model.

A mixin of :class:`server_app.strategy.RaFFM`, which provides the attributes
it reads (``fraction_evaluate``, ``min_evaluate_nodes``, ``seed``,
``history``) and the hooks it calls (``prepare_state``, ``_eligible``,
``_instruct``).
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ConfigRecord, Message, MessageType, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from raffm_core.task.keys import NUM_EXAMPLES

from .nodes import sample_nodes
from .replies import check_evaluate_reply, match_replies


class FederatedEvaluation:
    """``configure_evaluate`` and ``aggregate_evaluate`` of the sub-model strategies."""

    def configure_evaluate(
        self, server_round: int, arrays, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send sampled nodes their budget's sub-model of the global model to score."""
        self._pending_eval = []
        if self.fraction_evaluate == 0.0:
            return []
        state, _ = self.prepare_state(arrays)
        nodes = sample_nodes(
            self._eligible(grid),
            self.fraction_evaluate,
            self.min_evaluate_nodes,
            self.seed,
            server_round,
            "evaluate",
        )
        for node in nodes:
            sent = self._instruct(node, server_round, state, config, MessageType.EVALUATE)
            if sent is not None:
                self._pending_eval.append(sent)
        return [s.message for s in self._pending_eval]

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Weighted mean of the valid evaluation replies' metrics."""
        sent, self._pending_eval = self._pending_eval, []
        accepted = match_replies(
            replies,
            sent,
            "evaluation reply",
            lambda reply, sent: check_evaluate_reply(reply, sent.client.node_id),
        )
        if not accepted:
            return None
        metrics = aggregate_metricrecords([reply.content for _, reply in accepted], NUM_EXAMPLES)
        if server_round in self.history:
            self.history[server_round].evaluate_metrics = dict(metrics)
        return metrics
