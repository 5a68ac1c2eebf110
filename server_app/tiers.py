"""After training: each budget tier's sub-model, cut from the final global model, scored.

The paper's Fig. 4: a device of a tier is given, after training, the
sub-model of its budget. Here the sub-model of a tier has the body widths
the run actually sent to that tier's nodes (the median one by size, over
the run: with a trimmed vocabulary a node's rows take part of its budget,
so widths vary within a tier), taken as prefixes of the final global model
in the strategy's own order (:meth:`~server_app.strategy.RaFFM.prepare_state`:
RaFFM's salience ranking; HeteroFL and FedRolex keep the model's order), and
the whole vocabulary, which is only a lookup: a device keeps the rows of its
own tokens, and every token of the held-out data is then there.
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

import torch
from flwr.app import ArrayRecord
from torch.utils.data import DataLoader
from transformers import AutoConfig

from raffm_core import LayerSpec, SubnetSpec, build_submodel, extract_state_dict
from raffm_core.spec import width_count
from raffm_core.task.data import TaskInfo
from raffm_core.task.metrics import evaluate_model

from .records import RoundLog
from .strategy import RaFFM


def tier_specs(history: dict[int, RoundLog], layout) -> dict[str, SubnetSpec]:
    """Per budget string: the median-sized prefix spec the run sent to nodes of that budget."""
    sent: dict[str, list[SubnetSpec]] = defaultdict(list)
    for entry in history.values():
        for client in entry.clients:
            layers = tuple(
                LayerSpec(width_count(x.heads), width_count(x.ffn)) for x in client.spec.layers
            )
            sent[client.budget].append(SubnetSpec(layers))
    out = {}
    for budget, specs in sent.items():
        specs.sort(key=layout.elastic_fraction)
        out[budget] = specs[len(specs) // 2]
    return out


def score_tiers(
    strategy: RaFFM,
    final: ArrayRecord,
    loader: DataLoader,
    task: TaskInfo,
    tokenizer: Any,
    full_metrics: dict[str, float] | None = None,
) -> list[dict[str, Any]]:
    """Score every tier's sub-model of the final model on ``loader``; smallest tier first.

    Returns one record per tier: ``budget``, ``body-fraction`` (the share of
    the heads' and FFN neurons' parameters kept), ``heads-per-layer``,
    ``ffn-per-layer``, the metrics of :func:`evaluate_model`, and the full
    model's (``budget`` ``"full"``) last. ``full_metrics``: the final model's
    central evaluation on the same loader, if the caller has it (reordering
    preserves the function, so it is not scored again).
    """
    layout = strategy.layout
    state, _ = strategy.prepare_state(final)
    base = AutoConfig.for_model(**json.loads(strategy.base_config))
    tiers = tier_specs(strategy.history, layout)
    specs = sorted(tiers.items(), key=lambda item: layout.elastic_fraction(item[1]))
    records = []
    for budget, spec in [*specs, ("full", layout.full_spec())]:
        if budget == "full" and full_metrics:
            metrics = dict(full_metrics)
        else:
            model = build_submodel(base, spec, extract_state_dict(state, layout, spec))
            with torch.no_grad():
                metrics = evaluate_model(model, loader, task, tokenizer)
            del model
        records.append(
            {
                "budget": budget,
                "body-fraction": layout.elastic_fraction(spec),
                "heads-per-layer": [width_count(x.heads) for x in spec.layers],
                "ffn-per-layer": [width_count(x.ffn) for x in spec.layers],
                **metrics,
            }
        )
    return records
