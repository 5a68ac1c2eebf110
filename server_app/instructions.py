"""What goes out: one sub-model instruction per node."""

from __future__ import annotations

from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from raffm_core import ModelLayout, SubnetSpec, extract_state_dict
from raffm_core.task.keys import ARRAYS, CONFIG, SPEC

from .records import ClientRound, NodeBudget, Sent


def build_instruction(
    node: NodeBudget,
    spec: SubnetSpec,
    state: dict[str, torch.Tensor],
    layout: ModelLayout,
    config: ConfigRecord,
    extra: dict[str, Any],
    kind: str,
) -> Sent:
    """A ``kind`` message for ``node``: the ``spec`` slices of ``state`` and the config.

    The ConfigRecord holds ``config``, then ``extra``, then the spec as JSON.
    """
    arrays = ArrayRecord(extract_state_dict(state, layout, spec))
    content = ConfigRecord({**dict(config), **extra, SPEC: spec.to_json()})
    message = Message(
        RecordDict({ARRAYS: arrays, CONFIG: content}), dst_node_id=node.node_id, message_type=kind
    )
    params = layout.count_params(spec)
    client = ClientRound(
        node.node_id,
        node.partition_id,
        str(node.budget),
        spec,
        params,
        params / layout.total_params,
        arrays.count_bytes(),
    )
    client.body_fraction = layout.elastic_fraction(spec)
    return Sent(message, spec, client)
