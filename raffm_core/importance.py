"""Data-aware salience: first-order Taylor importance of heads and FFN neurons.

RaFFM ranks units by the norm of their weights (paper Eq. 1), which needs no
data. :func:`taylor_importance` ranks them by how much the loss would change,
to first order, if a unit were switched off (Molchanov et al., 2017/2019):
for the input ``a`` of the attention output projection (one block of columns
per head group) and of the FFN output projection (one column per neuron),
a unit's importance on one example is ``|sum over its channels and tokens of
a * dL/da|``, summed over examples. The scores feed
:func:`raffm_core.rank_units` (``scores=``). In a federation, nodes would
compute them on their own data and send these few numbers per layer; here the
function only measures them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from transformers import PreTrainedModel

from .layout import describe

UnitScores = tuple[torch.Tensor, torch.Tensor]
"""Per layer: ``(head_groups,)`` and ``(ffn_neurons,)`` importance, float64."""


def taylor_importance(
    model: PreTrainedModel, batches: Iterable[Mapping[str, torch.Tensor]]
) -> list[UnitScores]:
    """Taylor importance of every head group and FFN neuron of a full model.

    Parameters
    ----------
    model : PreTrainedModel
        A full model of a supported family; its weights are not changed
        (gradients are computed and then cleared).
    batches : iterable of mappings
        Model inputs with ``labels``, so that ``model(**batch).loss`` exists.

    Returns
    -------
    list of (Tensor, Tensor)
        One pair per layer of :func:`raffm_core.describe`, in layer order.
    """
    layout = describe(model)
    scores = [
        (
            torch.zeros(layout.num_groups, dtype=torch.float64),
            torch.zeros(layout.ffn_size, dtype=torch.float64),
        )
        for _ in layout.layers
    ]
    block = layout.group_size * layout.head_dim
    handles = []

    def capture(layer: int, kind: str):
        def hook(module, args):
            x = args[0]
            if not x.requires_grad:
                return None

            def on_grad(g: torch.Tensor) -> None:
                per_channel = (x.detach() * g).to(torch.float64)
                per_example = per_channel.reshape(x.shape[0], -1, x.shape[-1]).sum(1)
                if kind == "attn_out":
                    units = per_example.reshape(x.shape[0], -1, block).sum(-1)
                    scores[layer][0][: units.shape[1]] += units.abs().sum(0)
                else:
                    scores[layer][1][: per_example.shape[1]] += per_example.abs().sum(0)

            x.register_hook(on_grad)
            return None

        return hook

    for layer in layout.layers:
        for role, path in layer.modules.items():
            kind = role.rpartition(".")[2]
            if kind in ("attn_out", "ffn_out"):
                module = model.get_submodule(path)
                handles.append(module.register_forward_pre_hook(capture(layer.index, kind)))
    was_training = model.training
    model.eval()  # no dropout: the importance of the model as it runs
    try:
        for batch in batches:
            model.zero_grad(set_to_none=True)
            model(**batch).loss.backward()
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return scores


__all__ = ["UnitScores", "taylor_importance"]
