"""RaFFM as a Flower strategy: one budget-fitted sub-model per node, fused slice by slice."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from raffm_core import (
    BudgetError,
    ImportanceTracker,
    ModelLayout,
    Permutation,
    ServerOptimizer,
    SubnetSpec,
    TrainingProfile,
    Update,
    aggregate_with_coverage,
    permute_state,
    prioritize_state,
    rank_units,
    select_subnet,
)
from raffm_core.prioritize import L1, prefix_kept
from raffm_core.rolling import rolling_tail_spec
from raffm_core.task.keys import (
    BASE_CONFIG,
    NUM_EXAMPLES,
    PROXIMAL_MU,
    RECORD_IMPORTANCE,
    SERVER_ROUND,
    TAYLOR,
)

from .evaluation import FederatedEvaluation
from .instructions import build_instruction
from .loop import RunLoop
from .nodes import note_baselines, sample_nodes, spec_seed
from .records import NodeBudget, Pending, RoundLog, Sent, State
from .replies import cap_examples, check_train_reply, match_replies
from .signal import fuse_importance, with_signal


class RaFFM(FederatedEvaluation, RunLoop, Strategy):
    r"""Resource-aware sub-model federated fine-tuning (RaFFM).

    Each round the strategy (1) prioritizes the global model's salient
    parameters, a function-preserving reordering; (2) samples nodes, seeded;
    (3) chooses for each a :class:`~raffm_core.SubnetSpec` that fits the budget
    the node reported; (4) sends each node its own sub-model; (5) validates
    each reply against exactly what that node was sent; (6) fuses the
    survivors slice by slice (:func:`raffm_core.aggregate`); and (7) applies
    the server update (FedAvg, FedProx or FedAdam).

    A rejected reply (an error, no reply within the timeout, wrong keys,
    shapes or dtypes, NaN/Inf, a bad ``num-examples``) is excluded with one
    log line ``reply from node N rejected: <reason>``. With fewer than
    ``min_replies`` survivors the round keeps the previous global model,
    bit for bit.

    Before the first round the strategy waits until ``min_available_nodes``
    nodes are registered, then asks each for its budget with a
    ``MessageType.QUERY`` message. Nodes registering later are asked when
    they first show up. A node whose budget is invalid or below the smallest
    sub-network is skipped, with a log line.

    Obligations of the ClientApp:

    * **Query.** Reply with a ``ConfigRecord`` under ``"config"`` holding
      ``"budget"``, a :class:`~raffm_core.Budget` string (``"params=0.6"``,
      ``"params=40M"``, ``"memory-mb=900"``), and optionally the int
      ``"partition-id"``, which makes node sampling reproducible across runs,
      and, for ``trim_vocab``, ``"vocab"``: every token id of the node's
      data as inclusive runs (``"0-3,17,101-102"``). A sub-model then takes
      only those ids (:class:`raffm_core.vocab.TrimmedEmbedding`). With a
      ``memory-mb`` budget, which bounds the node's whole process, also
      ``"baseline-mb"``: the RSS (MB) the process holds besides a training
      step, with its data and tokenizer loaded. The step is fitted into the
      budget minus that (:meth:`node_profile`); without it the server
      assumes a fresh process holding only torch and transformers.
    * **Train.** The instruction carries an ``ArrayRecord`` ``"arrays"`` (the
      sub-model's weights) and a ``ConfigRecord`` ``"config"`` with
      ``"spec"`` (``SubnetSpec.to_json()``), ``"base-config"`` (the full
      model's transformers config as JSON), ``"server-round"``,
      ``"proximal-mu"`` and the training settings of ``train_config``. The
      client rebuilds the sub-model with
      ``raffm_core.build_submodel(AutoConfig.for_model(**json.loads(base)),
      SubnetSpec.from_json(spec), arrays)``, fine-tunes it and replies with
      an ``ArrayRecord`` ``"arrays"`` holding **exactly the received keys,
      shapes and dtypes**, and a ``MetricRecord`` ``"metrics"`` with the
      finite numbers ``"num-examples"`` (a positive int: local training
      examples, not batches), ``"train-loss"``, ``"train-time-s"``,
      ``"train-steps"`` and ``"peak-memory-mb"`` (the peak RSS of the whole
      process while it served the instruction), and optionally
      ``"baseline-mb"`` (what the process held besides the received
      sub-model; a larger one than before shrinks the node's later
      sub-models). With ``"proximal-mu"``
      :math:`\mu > 0` the client **must** add FedProx's proximal term
      :math:`\frac{\mu}{2} \| w - w^t \|^2` to its loss, where :math:`w^t`
      is the sub-model as received. With ``"masked-loss"`` the reply also
      carries a ``ConfigRecord`` ``"config"`` with ``"labels-held"``, the
      class ids of the node's training data: a node holding one class has
      an identically zero loss and is left out of the fusion, and the output
      rows of the classes a node does not hold are fused without it
      (HeteroFL's label split). With ``"record-importance"`` (salience
      ``"taylor"``) it carries an ``ArrayRecord`` ``"importance"``: per layer
      ``i``, ``"heads.i"`` and ``"ffn.i"``, the per-example first-order Taylor
      importance of its kept head groups and FFN neurons in its sub-model's
      order (:class:`raffm_core.importance.TaylorRecorder`).
    * **Evaluate.** The instruction is built as for training. Reply with a
      ``MetricRecord`` ``"metrics"`` holding ``"num-examples"`` and finite
      scores (e.g. ``"loss"``, ``"accuracy"``).

    Parameters
    ----------
    layout : ModelLayout
        :func:`raffm_core.describe` of the full model.
    base_config : str
        The full model's config as JSON (``base_config(model).to_json_string()``).
    fraction_train, fraction_evaluate : float
        Fraction of eligible nodes sampled per round; 0 skips that stage.
    min_train_nodes, min_evaluate_nodes : int
        Sample at least this many (or all eligible nodes, if fewer).
    min_available_nodes : int
        Nodes to wait for before querying budgets.
    min_replies : int
        Surviving train replies needed to update the global model (at least 1).
    selection_mode : {"largest", "sample"}
        How :func:`raffm_core.select_subnet` picks a spec within a budget.
    salience_norm : {"l1", "l2", "taylor"}
        The salience units are ranked by: a weight norm (paper Eq. 1), or
        ``"taylor"``, the first-order Taylor importance the nodes measure in
        local training, fused over the nodes that held each unit
        (:class:`raffm_core.ImportanceTracker`); L1 ranks until the first
        scores arrive, and orders Q/K channels within a head.
    server_optimizer : ServerOptimizer, optional
        The server update; FedAvg if omitted.
    proximal_mu : float
        FedProx's :math:`\mu`, sent to clients.
    profile : TrainingProfile, optional
        The training step ``memory-mb`` budgets are checked against, for a
        fresh process; each node's reported baseline is added per node.
    seed : int
        Seeds node sampling and ``sample``-mode spec draws, never global RNGs.
    query_timeout : float
        Seconds to wait for nodes to register, and for budget replies.
    width_weight_power : float
        A reply's aggregation weight is ``num-examples x elastic_fraction **
        width_weight_power`` (0: FedAvg's ``num-examples``), where
        :meth:`ModelLayout.elastic_fraction` is the share of the heads' and FFN
        neurons' parameters its sub-model held, so clients that held less of
        the model pull less on the units they share.
    trim_vocab : bool
        Cut each sub-model's token embedding to the rows of the token ids its
        node reported with its budget (``"vocab"`` in the query reply); what
        the rows leave of the budget goes to heads and FFN neurons. Needs a
        model whose token embedding is an input lookup only
        (:attr:`ModelLayout.vocab_key`). The ids are what the node's own
        update of the full embedding would show the server anyway: only
        their rows change in plain FedAvg.
    rolling_tail : float
        Share of each sub-model's width, in ``[0, 1)``, that is a window
        rolling over the less salient units
        (:func:`raffm_core.rolling.rolling_tail_spec`); the rest are the most
        salient. 0 (the paper): nested salient prefixes.
    max_num_examples : int
        Cap on a reply's ``num-examples`` (its aggregation weight), logged
        when applied; 0 for no cap.
    """

    def __init__(
        self,
        layout: ModelLayout,
        base_config: str,
        *,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 0.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        min_replies: int = 1,
        selection_mode: str = "largest",
        salience_norm: str = "l1",
        server_optimizer: ServerOptimizer | None = None,
        proximal_mu: float = 0.0,
        profile: TrainingProfile | None = None,
        seed: int = 0,
        query_timeout: float = 120.0,
        max_num_examples: int = 0,
        width_weight_power: float = 0.0,
        rolling_tail: float = 0.0,
        trim_vocab: bool = False,
        label_keys: tuple[str, ...] = (),
    ) -> None:
        self.layout = layout
        self.base_config = base_config
        self.fraction_train = fraction_train
        self.fraction_evaluate = fraction_evaluate
        self.min_train_nodes = min_train_nodes
        self.min_evaluate_nodes = min_evaluate_nodes
        self.min_available_nodes = min_available_nodes
        if isinstance(min_replies, bool) or not isinstance(min_replies, int) or min_replies < 1:
            raise ValueError(
                f"min_replies = {min_replies!r}: a round needs at least 1 surviving reply"
            )
        self.min_replies = min_replies
        self.selection_mode = selection_mode
        self.salience_norm = salience_norm
        self.server_optimizer = server_optimizer or ServerOptimizer("fedavg")
        self.proximal_mu = proximal_mu
        self.profile = profile or TrainingProfile()
        self.seed = seed
        self.query_timeout = query_timeout
        self.max_num_examples = max_num_examples
        if not width_weight_power >= 0:
            raise ValueError(f"width_weight_power must be >= 0, got {width_weight_power!r}")
        self.width_weight_power = width_weight_power
        if not 0.0 <= rolling_tail < 1.0:
            raise ValueError(f"rolling_tail must be in [0, 1), got {rolling_tail!r}")
        self.rolling_tail = rolling_tail
        if trim_vocab and layout.vocab_key is None:
            raise ValueError(
                f"trim_vocab: the {layout.model_class} has no token embedding that can be "
                "trimmed (an input-only embedding of the BERT or DistilBERT family)"
            )
        self.trim_vocab = trim_vocab
        self.label_keys = tuple(label_keys)
        self.importance = ImportanceTracker(layout) if salience_norm == TAYLOR else None
        self.nodes: dict[int, NodeBudget] = {}
        self.skipped: dict[int, str] = {}
        self.history: dict[int, RoundLog] = {}
        self.num_rounds = 0
        self._pending: Pending | None = None
        self.arrivals: dict[str, float] = {}  # instruction id -> seconds to its reply
        self._pending_eval: list[Sent] = []

    # ------------------------------------------------------------- training
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Prioritize the global model and build one sub-model instruction per sampled node."""
        started = time.monotonic()
        self._query_newcomers(grid)
        state, permutation = self.prepare_state(arrays)
        eligible = self._eligible(grid)
        nodes = sample_nodes(
            eligible, self.fraction_train, self.min_train_nodes, self.seed, server_round, "train"
        )
        pending = Pending(server_round, state, permutation)
        excluded: dict[int, str] = {}
        for node in nodes:
            sent = self._instruct(node, server_round, state, config, MessageType.TRAIN, excluded)
            if sent is not None:
                pending.sent.append(sent)
        self._pending = pending
        entry = RoundLog(server_round, started, [s.client for s in pending.sent], excluded=excluded)
        entry.lap("configure-s")
        if permutation is not None and pending.sent:
            entry.reorder = prefix_kept(permutation, [s.spec for s in pending.sent])
        self.history[server_round] = entry
        narrowed = sum(s.client.body_fraction < 1.0 for s in pending.sent)
        log(
            INFO,
            "configure_train: %d of %d eligible nodes, sub-models of %s params; "
            "%d of %d train a narrowed body (heads and FFN: %s)",
            len(pending.sent),
            len(eligible),
            ", ".join(f"{s.client.params_fraction:.2f}" for s in pending.sent) or "no",
            narrowed,
            len(pending.sent),
            ", ".join(f"{s.client.body_fraction:.2f}" for s in pending.sent) or "-",
        )
        return [s.message for s in pending.sent]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate each reply against what its node was sent; fuse the survivors.

        Returns ``(None, None)``, which keeps the previous global model, when
        fewer than ``min_replies`` replies survive.
        """
        pending = self._pending
        if pending is None or pending.server_round != server_round:
            raise RuntimeError(f"aggregate_train({server_round}) without configure_train")
        self._pending = None
        entry = self.history[server_round]
        entry.lap("train-wait-s")
        try:
            return self._fuse(server_round, pending, entry, replies)
        finally:
            entry.lap("aggregate-s")

    def _fuse(
        self, server_round: int, pending: Pending, entry: RoundLog, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        for sent in pending.sent:
            sent.client.reply_after_s = self.arrivals.get(sent.message.metadata.message_id)
        accepted = match_replies(
            replies,
            pending.sent,
            "reply",
            lambda reply, sent: self._weigh(
                cap_examples(
                    check_train_reply(
                        reply, sent.client.node_id, sent.spec, self.layout, pending.state
                    ),
                    self.max_num_examples,
                    sent.client.node_id,
                ),
                sent.spec,
            ),
        )
        if len(accepted) < self.min_replies:
            entry.kept_previous = True
            log(
                WARNING,
                "round %d: %d of %d replies survived, fewer than min-replies=%d; "
                "keeping the previous global model",
                server_round,
                len(accepted),
                len(pending.sent),
                self.min_replies,
            )
            return None, None
        note_baselines(self.nodes, [reply for _, reply in accepted])
        signal = with_signal(server_round, pending, accepted, self.label_keys)
        if len(signal) < self.min_replies:
            entry.kept_previous = True
            log(
                WARNING,
                "round %d: %d of %d accepted replies carry a training signal, fewer than "
                "min-replies=%d; keeping the previous global model",
                server_round,
                len(signal),
                len(accepted),
                self.min_replies,
            )
            return None, None
        updates = [update for update, _ in signal]
        fused, coverage = aggregate_with_coverage(pending.state, updates, self.layout)
        # The optimizer's moments follow the model only once the round is kept.
        if pending.permutation is not None:
            self.server_optimizer.permute(self.layout, pending.permutation)
            if self.importance is not None:
                self.importance.permute(pending.permutation)
        if self.importance is not None:
            fuse_importance(self.importance, server_round, signal, entry)
        new_state = self.server_optimizer.step(pending.state, fused, coverage)
        metrics = aggregate_metricrecords([reply.content for _, reply in accepted], NUM_EXAMPLES)
        entry.train_metrics = dict(metrics)
        return ArrayRecord(new_state), metrics

    # ------------------------------------------- what subclasses may swap
    def prepare_state(self, arrays: ArrayRecord) -> tuple[State, Permutation | None]:
        """The global state sub-models are cut from, and the reordering applied to it.

        RaFFM prioritizes the global model each round; subclasses that keep
        the model in place (:class:`server_app.lora.RaFFMLoRA`) return ``None``.
        """
        state = arrays.to_torch_state_dict()
        if self.importance is None:
            return prioritize_state(state, self.layout, self.salience_norm)
        fresh = {key: value.clone() for key, value in state.items()}
        scores = self.importance.salience(fresh, L1)
        permutation = rank_units(fresh, self.layout, L1, scores=scores)
        permute_state(fresh, self.layout, permutation)
        return fresh, permutation

    def place_spec(self, spec: SubnetSpec) -> SubnetSpec:
        """The spec sent for a budget's prefix spec (here the prefix itself)."""
        return spec

    def choose_spec(self, node: NodeBudget, server_round: int, stage: str) -> SubnetSpec:
        """The sub-network ``node`` gets in ``server_round`` (``stage``: train or evaluate).

        Raises
        ------
        BudgetError
            If the node cannot take part; it is left out of the round and reported.
        """
        widths = select_subnet(
            self.layout,
            node.budget,
            self.selection_mode,
            seed=spec_seed(self.seed, server_round, node, stage),
            profile=self.node_profile(node),
            vocab=node.vocab,
        )
        if not self.rolling_tail:
            return widths
        return rolling_tail_spec(self.layout, widths, server_round, self.rolling_tail)

    def node_profile(self, node: NodeBudget) -> TrainingProfile:
        """The training step ``node``'s ``memory-mb`` budget is checked against.

        :attr:`profile` for a process that holds the node's reported
        ``baseline-mb`` besides the step (unchanged if it reported none).
        """
        return self.profile.with_baseline(node.baseline_mb)

    # -------------------------------------------------------------- helpers
    def _weigh(self, update: Update, spec: SubnetSpec) -> Update:
        if not self.width_weight_power:
            return update
        held = self.layout.elastic_fraction(spec)
        weight = update.num_examples * held**self.width_weight_power
        return dataclasses.replace(update, weight=weight)

    def _instruct(
        self,
        node: NodeBudget,
        server_round: int,
        state: State,
        config: ConfigRecord,
        kind: str,
        excluded: dict[int, str] | None = None,
    ) -> Sent | None:
        stage = "train" if kind == MessageType.TRAIN else "evaluate"
        try:
            spec = self.choose_spec(node, server_round, stage)
        except BudgetError as err:
            log(WARNING, "node %d skipped in round %d: %s", node.node_id, server_round, err)
            if excluded is not None:
                excluded[node.node_id] = f"budget {node.budget}: {err}"
            return None
        spec = self.place_spec(spec)
        extra = {SERVER_ROUND: server_round, BASE_CONFIG: self.base_config}
        extra[PROXIMAL_MU] = float(self.proximal_mu)
        if self.importance is not None and kind == MessageType.TRAIN:
            extra[RECORD_IMPORTANCE] = True
        sent = build_instruction(node, spec, state, self.layout, config, extra, kind)
        sent.client.fit_baseline_mb = node.baseline_mb
        plain = dataclasses.replace(self.node_profile(node), margin=0.0)  # the estimate itself
        sent.client.predicted_mb = plain.memory_mb(self.layout, spec)
        return sent
