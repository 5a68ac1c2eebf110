"""Which nodes take part: waiting for them, asking their budgets, sampling them."""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Iterable
from logging import INFO, WARNING

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from raffm_core import ModelLayout, TrainingProfile
from raffm_core.task.keys import BASELINE_MB, CONFIG, METRICS, SERVER_ROUND

from .records import NodeBudget
from .replies import Rejected, parse_budget_reply

STAGES = {"train": 1, "evaluate": 2}
"""Salts that give training and evaluation independent draws in the same round."""


SETTLE_S = 3.0
"""With ``min-available-nodes = 0``: seconds without a new node after which registration
counts as settled (simulated nodes register together as the simulation starts)."""

POLL_S = 0.5


def wait_for_nodes(grid: Grid, minimum: int, timeout: float, settle: float = SETTLE_S) -> int:
    """Block until ``minimum`` nodes are registered; with 0, until registration settles.

    ``minimum == 0`` (the default of ``min-available-nodes``) trains with the
    nodes Flower gives the run: it waits for a first node, then until no new
    one has registered for ``settle`` seconds. Plain ``flwr run .`` on
    Flower's local SuperLink starts 2 simulated nodes (or the connection's
    ``options.num-supernodes``), all registered at once. A deployment whose
    SuperNodes connect one by one should name the count it needs instead.

    Returns
    -------
    int
        The number of nodes registered when the wait ended (logged).

    Raises
    ------
    ValueError
        If ``minimum`` is negative.
    RuntimeError
        If ``minimum`` nodes (with ``0``: any node) are not registered within
        ``timeout`` seconds. With ``0`` and nodes still arriving at the
        deadline, the run goes on with those registered.
    """
    if minimum < 0:
        raise ValueError(f"min-available-nodes must be >= 0, got {minimum!r}")
    started = time.monotonic()
    deadline = started + timeout
    last_log, count, changed = 0.0, -1, started
    while True:
        now, seen = time.monotonic(), len(list(grid.get_node_ids()))
        if seen != count:
            count, changed = seen, now
        if minimum and count >= minimum:
            return count
        if not minimum and count and (now - changed >= settle or now > deadline):
            log(
                INFO,
                "%d nodes registered (min-available-nodes = 0: those registered when no new one "
                "came for %.0f s); set min-available-nodes to wait for a number",
                count,
                settle,
            )
            return count
        if now > deadline:
            if minimum:
                raise RuntimeError(
                    f"only {count} of min-available-nodes={minimum} nodes registered "
                    f"within {timeout:.0f} s"
                )
            raise RuntimeError(
                f"no node registered within {timeout:.0f} s "
                "(min-available-nodes = 0 waits for at least one)"
            )
        if now - last_log > 5:
            if minimum:
                log(INFO, "waiting for nodes: %d of %d registered", count, minimum)
            else:
                log(INFO, "waiting for nodes to register: %d so far", count)
            last_log = now
        time.sleep(POLL_S)


QUERY_BATCH = 64
"""Budget queries in flight at once.

Flower's in-memory SuperLink (simulation) scans every stored instruction for
each node on each 0.1 s sweep, so 1,000 queries sent at once cost ~10^6
checks per sweep and the query phase grows quadratically with the node
count; batches keep it linear. A deployed SuperLink answers each node from
an index, and 64 in flight keep every Ray actor or SuperNode busy.
"""

VERBOSE_NODES = 20
"""Up to this many nodes, one log line per node's budget; above, one summary line."""


def query_budgets(
    grid: Grid,
    node_ids: Iterable[int],
    layout: ModelLayout,
    profile: TrainingProfile,
    timeout: float,
    trim_vocab: bool = False,
    batch: int = QUERY_BATCH,
) -> tuple[dict[int, NodeBudget], dict[int, str]]:
    """Send each node a ``QUERY`` message and check the budget it answers.

    Queries go out ``batch`` at a time (:data:`QUERY_BATCH`); each batch
    waits at most ``timeout`` seconds for its replies. With ``trim_vocab``
    the token ids a node reports are kept with its budget.

    Returns
    -------
    (usable, skipped)
        Nodes with a budget some sub-network fits, and the reason each other
        node is skipped (logged: one line per node up to
        :data:`VERBOSE_NODES` nodes, else a count per reason).
    """
    if batch < 1:
        raise ValueError(f"query batch must be >= 1, got {batch!r}")
    ordered = sorted(node_ids)
    usable: dict[int, NodeBudget] = {}
    skipped: dict[int, str] = {}
    verbose = len(ordered) <= VERBOSE_NODES
    for start in range(0, len(ordered), batch):
        chunk = ordered[start : start + batch]
        _query_batch(grid, chunk, layout, profile, timeout, trim_vocab, usable, skipped, verbose)
        if not verbose:
            log(INFO, "budget query: %d of %d nodes asked", start + len(chunk), len(ordered))
    if not verbose and ordered:
        tiers = Counter(str(info.budget) for info in usable.values())
        log(
            INFO,
            "budgets of %d nodes: %s; %d skipped",
            len(usable),
            ", ".join(f"{n} x {b}" for b, n in sorted(tiers.items())) or "-",
            len(skipped),
        )
        for reason, n in Counter(skipped.values()).most_common(4):
            log(WARNING, "%d nodes skipped: %s", n, reason)
    return usable, skipped


def _query_batch(
    grid: Grid,
    node_ids: list[int],
    layout: ModelLayout,
    profile: TrainingProfile,
    timeout: float,
    trim_vocab: bool,
    usable: dict[int, NodeBudget],
    skipped: dict[int, str],
    verbose: bool,
) -> None:
    messages = [
        Message(
            RecordDict({CONFIG: ConfigRecord({SERVER_ROUND: 0})}),
            dst_node_id=n,
            message_type=MessageType.QUERY,
        )
        for n in node_ids
    ]
    if not messages:
        return
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    asked = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
    for reply in replies:
        node_id = asked.pop(reply.metadata.reply_to_message_id, None)
        if node_id is None:
            continue  # a duplicate, or not an answer to this query
        try:
            usable[node_id] = info = parse_budget_reply(reply, node_id, layout, profile, trim_vocab)
        except Rejected as err:
            skipped[node_id] = err.reason
            if verbose:
                log(WARNING, "node %d skipped: %s", node_id, err.reason)
            continue
        if verbose:
            log(
                INFO,
                "node %d (partition %s): budget %s%s, up to %.2f of the parameters%s",
                node_id,
                info.partition_id,
                info.budget,
                "" if info.baseline_mb is None else f" (process holds {info.baseline_mb:.0f} MB)",
                info.max_fraction,
                "" if info.vocab is None else f" with {len(info.vocab)} vocabulary rows",
            )
    for node_id in asked.values():
        skipped[node_id] = f"no reply to the budget query within {timeout:.0f} s"
        if verbose:
            log(WARNING, "node %d skipped: %s", node_id, skipped[node_id])


def sample_nodes(
    nodes: Iterable[NodeBudget],
    fraction: float,
    minimum: int,
    seed: int,
    server_round: int,
    stage: str,
) -> list[NodeBudget]:
    """A seeded sample of ``max(fraction * len(nodes), minimum)`` nodes (capped at all).

    Nodes are ordered by partition id (then node id) before drawing, so a
    simulation samples the same partitions in every run although node ids
    are random. ``fraction == 0`` samples none, as in Flower's strategies.
    """
    nodes = sorted(nodes, key=lambda n: (n.partition_id is None, n.partition_id or 0, n.node_id))
    if fraction == 0.0 or not nodes:
        return []
    size = min(len(nodes), max(int(len(nodes) * fraction), minimum))
    rng = np.random.default_rng([seed, server_round, STAGES[stage]])
    picked = rng.choice(len(nodes), size=size, replace=False)
    return [nodes[i] for i in sorted(picked.tolist())]


def spec_seed(seed: int, server_round: int, node: NodeBudget, stage: str) -> int:
    """Seed of a ``sample``-mode spec draw for one node, round and stage."""
    who = node.partition_id if node.partition_id is not None else node.node_id
    return int(
        np.random.SeedSequence([seed, server_round, STAGES[stage], who]).generate_state(1)[0]
    )


def note_baselines(nodes: dict[int, NodeBudget], replies: Iterable[Message]) -> None:
    """Raise each node's baseline to the ``baseline-mb`` its train reply reports.

    A process can hold more than it did at the budget query (a Ray actor
    keeps what earlier nodes and rounds left behind), and the later rounds
    fit the node's sub-model to the largest baseline it has reported.
    ``replies`` are accepted train replies (their metrics checked finite).
    """
    for reply in replies:
        node = nodes.get(reply.metadata.src_node_id)
        reported = reply.content.metric_records[METRICS].get(BASELINE_MB)
        if node is None or not isinstance(reported, int | float) or reported < 0:
            continue
        if node.baseline_mb is None or reported > node.baseline_mb:
            nodes[node.node_id] = dataclasses.replace(node, baseline_mb=float(reported))
            if node.budget.kind == "memory-mb":
                log(
                    INFO,
                    "node %d: its process holds %.0f MB besides a step (%s, was %s); "
                    "later rounds fit its %s to that",
                    node.node_id,
                    reported,
                    BASELINE_MB,
                    "none" if node.baseline_mb is None else f"{node.baseline_mb:.0f} MB",
                    node.budget,
                )
