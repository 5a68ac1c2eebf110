"""What each reply contributes beyond its weights: its training signal and its unit importance.

:func:`with_signal` keeps the replies whose masked loss was not identically
zero and restricts the output rows to the classes each holds (HeteroFL's
label split); :func:`fuse_importance` folds the Taylor importance the
replies carry into the server's :class:`raffm_core.ImportanceTracker`.
"""

from __future__ import annotations

import dataclasses
import time
from logging import INFO, WARNING

from flwr.app import Message
from flwr.common.logger import log

from raffm_core import ImportanceTracker, Update
from raffm_core.task.keys import CONFIG, IMPORTANCE, LABELS_HELD

from .records import Pending, RoundLog
from .replies import decode_importance


def with_signal(
    server_round: int,
    pending: Pending,
    accepted: list[tuple[Update, Message]],
    label_keys: tuple[str, ...],
) -> list[tuple[Update, Message]]:
    """The accepted updates that carry a training signal, label rows restricted.

    A reply whose ``labels-held`` names one class (or none) was trained
    under a masked loss that is identically zero: its weights moved only
    by weight decay, so it is left out (logged, ``"fused": 0`` in its
    round entry). The others fuse the output rows of their classes only.
    """
    by_node = {s.client.node_id: s.client for s in pending.sent}
    out = []
    for update, reply in accepted:
        config = reply.content.config_records.get(CONFIG)
        labels = None if config is None else config.get(LABELS_HELD)
        client = by_node.get(reply.metadata.src_node_id)
        if labels is not None and len(labels) <= 1:
            log(
                INFO,
                "round %d: node %d holds %s only; its masked loss is zero, left out of the fusion",
                server_round,
                reply.metadata.src_node_id,
                f"class {labels[0]}" if labels else "no class",
            )
            if client is not None:
                client.metrics["fused"] = 0
            continue
        if labels is not None:
            keys = [k for k in label_keys if k in pending.state]
            rows = tuple(sorted({int(x) for x in labels}))
            update = dataclasses.replace(update, rows={k: rows for k in keys})
        if client is not None:
            client.metrics["fused"] = 1
        out.append((update, reply))
    return out


def fuse_importance(
    tracker: ImportanceTracker,
    server_round: int,
    signal: list[tuple[Update, Message]],
    entry: RoundLog,
) -> None:
    """Fold the replies' Taylor importance into ``tracker``; bad ones are logged, not fused."""
    started = time.monotonic()
    contributions, nbytes = [], 0
    for update, reply in signal:
        record = reply.content.array_records.get(IMPORTANCE)
        if record is None:
            log(
                WARNING,
                "round %d: node %d sent no importance",
                server_round,
                reply.metadata.src_node_id,
            )
            continue
        nbytes += record.count_bytes()
        try:
            scores = decode_importance(record, update.spec)
        except ValueError as err:
            log(
                WARNING,
                "round %d: importance of node %d ignored: %s",
                server_round,
                reply.metadata.src_node_id,
                err,
            )
            continue
        contributions.append((update.spec, scores, float(update.num_examples)))
    tracker.update(contributions)
    entry.importance = {
        "replies": len(contributions),
        "bytes": nbytes,
        "fuse-s": time.monotonic() - started,
    }
