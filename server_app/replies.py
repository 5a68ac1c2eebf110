"""Checking what nodes send back: budgets, trained sub-models, evaluation scores.

Every check raises :class:`Rejected` with a one-line reason; nothing here
changes any state, so a rejected reply cannot touch the global model.
"""

from __future__ import annotations

import dataclasses
import io
import math
import warnings
from collections.abc import Callable, Iterable
from logging import WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.common.logger import log

from raffm_core import (
    Budget,
    BudgetError,
    ModelLayout,
    SpecError,
    SubnetSpec,
    TrainingProfile,
    Update,
    UpdateError,
    check_update,
    select_subnet,
)
from raffm_core.spec import width_count
from raffm_core.task.keys import (
    ARRAYS,
    BASELINE_MB,
    BUDGET,
    CONFIG,
    METRICS,
    NUM_EXAMPLES,
    PARTITION_ID,
    TRAIN_REPLY_METRICS,
    VOCAB,
)

from .records import ClientRound, NodeBudget, Sent


class Rejected(Exception):
    """A reply (or a budget) the strategy will not use; ``reason`` is one log-ready line."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def one_line(text: str | None, limit: int = 300) -> str:
    """The last non-empty line of ``text`` (an exception's message ends a traceback), clipped."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    line = lines[-1] if lines else "(no reason given)"
    return line if len(line) <= limit else line[: limit - 3] + "..."


def parse_budget_reply(
    reply: Message,
    node_id: int,
    layout: ModelLayout,
    profile: TrainingProfile,
    trim_vocab: bool = False,
) -> NodeBudget:
    """The node's budget, if it is valid and some sub-network fits it.

    With ``trim_vocab`` the node's reported token ids (``vocab``) are kept
    and count towards what fits. A ``memory-mb`` budget bounds the node's
    whole process: the RSS it reports holding besides a step
    (``baseline-mb``) is kept out of what the step may use
    (:meth:`~raffm_core.TrainingProfile.with_baseline`).
    """
    if reply.has_error():
        raise Rejected(f"budget query failed: {one_line(reply.error.reason)}")
    record = reply.content.config_records.get(CONFIG)
    if record is None or not isinstance(record.get(BUDGET), str):
        raise Rejected(f"the query reply has no string {BUDGET!r} in {CONFIG!r}")
    vocab = parse_vocab(record.get(VOCAB), layout) if trim_vocab else None
    baseline = parse_baseline(record.get(BASELINE_MB))
    try:
        budget = Budget.parse(record[BUDGET])
    except BudgetError as err:
        raise Rejected(f"budget {record[BUDGET]!r}: {err}") from None
    spec = fit_budget(layout, budget, profile, baseline, vocab)
    partition = record.get(PARTITION_ID)
    partition = (
        partition if isinstance(partition, int) and not isinstance(partition, bool) else None
    )
    fraction = layout.count_params(spec) / layout.total_params
    return NodeBudget(node_id, budget, partition, fraction, vocab, baseline)


def parse_baseline(value: object) -> float | None:
    """A reported ``baseline-mb``: a finite number of MB >= 0, or None if absent."""
    if value is None:
        return None
    if not _finite_number(value) or value < 0:
        raise Rejected(f"{BASELINE_MB!r} is {value!r}, expected a finite number of MB >= 0")
    return float(value)


def fit_budget(
    layout: ModelLayout,
    budget: Budget,
    profile: TrainingProfile,
    baseline_mb: float | None,
    vocab: tuple[int, ...] | None = None,
) -> SubnetSpec:
    """The largest uniform spec within ``budget`` for a process holding ``baseline_mb``.

    Raises :class:`Rejected` naming the budget (and the baseline) when none fits.
    """
    if budget.kind == "memory-mb" and baseline_mb is not None and baseline_mb >= budget.value:
        raise Rejected(
            f"budget {budget}: the node's process already holds {baseline_mb:,.0f} MB "
            f"({BASELINE_MB}) before any training step, not below the budget's "
            f"{budget.value:,.0f} MB"
        )
    try:
        return select_subnet(
            layout, budget, "largest", profile=profile.with_baseline(baseline_mb), vocab=vocab
        )
    except BudgetError as err:
        held = (
            f" (with the {baseline_mb:,.0f} MB the node's process holds, {BASELINE_MB})"
            if budget.kind == "memory-mb" and baseline_mb is not None
            else ""
        )
        raise Rejected(f"{err}{held}") from None  # the error names the budget


def parse_vocab(value: object, layout: ModelLayout) -> tuple[int, ...] | None:
    """The token ids a node reported (``"0-3,17"``), checked against the vocabulary.

    ``None`` when the node reported none: its sub-models keep every row.
    """
    if value is None:
        return None
    if not isinstance(value, str):
        raise Rejected(f"{VOCAB!r} must be a string of token-id runs, got {type(value).__name__}")
    try:
        vocab = SubnetSpec.uniform(1, 1, 1, vocab=value).vocab
    except SpecError as err:
        raise Rejected(f"{VOCAB!r}: {err}") from None
    ids = tuple(range(vocab)) if isinstance(vocab, int) else vocab
    if ids[-1] >= layout.vocab_size:
        raise Rejected(
            f"{VOCAB!r}: token id {ids[-1]} is outside the model's {layout.vocab_size} tokens"
        )
    return ids


def check_metrics(reply: Message, node_id: int) -> MetricRecord:
    """The reply's MetricRecord: no error, from the addressee, finite numbers, ``num-examples``."""
    if reply.has_error():
        raise Rejected(f"error reply (code {reply.error.code}): {one_line(reply.error.reason)}")
    if reply.metadata.src_node_id != node_id:
        raise Rejected(f"sent by node {reply.metadata.src_node_id}, not the addressee")
    metrics = reply.content.metric_records.get(METRICS)
    if metrics is None:
        raise Rejected(f"no MetricRecord {METRICS!r}")
    for key, value in metrics.items():
        if not _finite_number(value):
            raise Rejected(f"metric {key!r} is {value!r}, expected a finite number")
    n = metrics.get(NUM_EXAMPLES)
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise Rejected(f"{NUM_EXAMPLES} must be a positive integer, got {n!r}")
    return metrics


def decode_array(array: Array) -> torch.Tensor:
    """A read-only tensor viewing ``array``'s ``.npy`` payload, without a copy.

    ``Array.numpy()`` reads through ``np.load``, which copies every tensor;
    for ten replies of a MiniLM that copy costs more than their aggregation.
    The tensor shares memory with the message: it must not be written to
    (aggregation only reads updates). Headers this does not handle
    (Fortran order, ``.npy`` 3.0, object dtypes) go through ``Array.numpy()``,
    which also rejects pickled objects.
    """
    if array.stype != "numpy.ndarray":
        raise TypeError(f"unsupported serialization {array.stype!r}")
    data = array.data
    stream = io.BytesIO(data)
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
    else:
        return torch.from_numpy(array.numpy())
    if fortran or dtype.hasobject or not dtype.isnative:
        return torch.from_numpy(array.numpy())
    flat = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=stream.tell())
    with warnings.catch_warnings():  # read-only by design, see above
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(flat.reshape(shape))


def decode_arrays(arrays: ArrayRecord) -> dict[str, torch.Tensor]:
    """``arrays`` as read-only tensors that share its memory (:func:`decode_array`)."""
    return {key: decode_array(array) for key, array in arrays.items()}


def decode_importance(
    record: ArrayRecord, spec: SubnetSpec
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A reply's ``importance`` record as per-layer ``(heads, ffn)`` float64 tensors.

    Raises
    ------
    ValueError
        If a layer's entry is missing, of the wrong shape for ``spec``, not
        finite or negative; the message names it.
    """
    out = []
    for i, kept in enumerate(spec.layers):
        pair = []
        for kind, width in (("heads", kept.heads), ("ffn", kept.ffn)):
            key = f"{kind}.{i}"
            if key not in record:
                raise ValueError(f"no {key!r} (it has {sorted(record.keys())[:4]}...)")
            try:
                tensor = decode_array(record[key]).to(torch.float64)
            except Exception as err:  # a client can send anything
                raise ValueError(f"{key!r} cannot be decoded: {one_line(str(err))}") from None
            expected = (width_count(width),)
            if tuple(tensor.shape) != expected:
                raise ValueError(f"{key!r} has shape {tuple(tensor.shape)}, expected {expected}")
            if not bool(torch.isfinite(tensor).all()) or bool((tensor < 0).any()):
                raise ValueError(f"{key!r} is not finite and non-negative")
            pair.append(tensor)
        out.append(tuple(pair))
    if len(record) != 2 * len(spec.layers):
        raise ValueError(f"{len(record)} arrays, expected {2 * len(spec.layers)}")
    return out


def check_evaluate_reply(reply: Message, node_id: int) -> None:
    """An evaluation reply needs only valid metrics (see :func:`check_metrics`)."""
    check_metrics(reply, node_id)


def check_train_reply(
    reply: Message,
    node_id: int,
    spec: SubnetSpec,
    layout: ModelLayout,
    global_state: dict[str, torch.Tensor],
) -> Update:
    """The reply as an :class:`~raffm_core.Update`, checked against exactly what was sent.

    ``spec`` is the spec this node was sent and ``global_state`` the
    (prioritized) global model it was cut from: keys, shapes and dtypes must
    match, every value must be finite.
    """
    metrics = check_metrics(reply, node_id)
    missing = [k for k in TRAIN_REPLY_METRICS if k not in metrics]
    if missing:
        raise Rejected(f"metrics lack {missing}")
    arrays = reply.content.array_records.get(ARRAYS)
    if arrays is None:
        raise Rejected(f"no ArrayRecord {ARRAYS!r}")
    try:
        tensors = decode_arrays(arrays)
    except Exception as err:  # a client can send anything; report it, never crash
        raise Rejected(f"arrays cannot be decoded: {one_line(str(err))}") from None
    name = f"node {node_id}"
    update = Update(spec, tensors, metrics[NUM_EXAMPLES])
    try:
        check_update(update, layout, global_state, name=name)
    except UpdateError as err:
        raise Rejected(str(err).removeprefix(f"{name}: ")) from None
    for key, tensor in tensors.items():
        if tensor.dtype != global_state[key].dtype:
            raise Rejected(
                f"{key!r} has dtype {tensor.dtype}, expected {global_state[key].dtype} as sent"
            )
    return update


def cap_examples(update: Update, cap: int, node_id: int) -> Update:
    """``update`` with ``num_examples`` at most ``cap`` (0: no cap); logs when it caps.

    A client's ``num-examples`` is its aggregation weight; the cap bounds how
    much one client that overstates its data can pull the global model.
    """
    if cap <= 0 or update.num_examples <= cap:
        return update
    log(
        WARNING,
        "reply from node %d: %s = %d capped to max-num-examples = %d",
        node_id,
        NUM_EXAMPLES,
        update.num_examples,
        cap,
    )
    return dataclasses.replace(update, num_examples=cap)


def match_replies(
    replies: Iterable[Message],
    sent: list[Sent],
    what: str,
    check: Callable[[Message, Sent], Update | None],
) -> list[tuple[Update | None, Message]]:
    """Pair each reply with its instruction and ``check`` it; return the accepted ones.

    Replies are matched by ``reply_to_message_id`` (a SuperLink's error reply
    for a vanished node comes from node 1, not from the node). Every rejected
    reply, and every instruction left without one, gets one log line
    ``<what> from node N rejected: <reason>`` and a ``rejected`` status.
    """
    by_id = {s.message.metadata.message_id: s for s in sent}
    accepted: list[tuple[Update | None, Message]] = []
    for reply in replies:
        match = by_id.pop(reply.metadata.reply_to_message_id, None)
        if match is None:
            log(
                WARNING,
                "%s from node %d rejected: it answers no instruction of this round "
                "(or a duplicate)",
                what,
                reply.metadata.src_node_id,
            )
            continue
        note_reply(match.client, reply)
        try:
            update = check(reply, match)
        except Rejected as err:
            match.client.status, match.client.reason = "rejected", err.reason
            log(WARNING, "%s from node %d rejected: %s", what, match.client.node_id, err.reason)
            continue
        match.client.status = "accepted"
        accepted.append((update, reply))
    for missing in by_id.values():
        missing.client.status, missing.client.reason = "rejected", "no reply within timeout"
        log(
            WARNING,
            "%s from node %d rejected: no reply within the timeout",
            what,
            missing.client.node_id,
        )
    return accepted


def note_reply(client: ClientRound, reply: Message) -> None:
    """Record the reply's size and numeric metrics, whether or not it is accepted."""
    if not reply.has_content():
        return
    arrays = reply.content.array_records.get(ARRAYS)
    client.bytes_up = arrays.count_bytes() if arrays is not None else 0
    metrics = reply.content.metric_records.get(METRICS)
    client.metrics = {
        k: v
        for k, v in (metrics or {}).items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }


def _finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
