"""Nested dropout: local training that also trains the sub-model's own salient prefixes.

RaFFM orders every layer's heads and FFN neurons by salience, so the
prefixes of a model are its nested sub-networks. When a node's budget holds
more than the smallest of them (with a trimmed vocabulary, a MiniLM node at
``params=0.6`` holds the whole body), plain local training improves the
whole and nothing makes the prefixes work on their own: a sub-model cut from
the trained global model afterwards (for a small device,
:func:`raffm_core.export_submodel`) has never been trained as one.

Under :func:`nested_dropout` a share ``rate`` of the local steps trains a
random prefix instead (FjORD's ordered dropout, Horvath et al. 2021, on the
salience order): every layer draws its own width, as the paper's random
sub-network draw does (:func:`raffm_core.select_subnet`, ``"sample"``), and
the units past it are switched off by zeroing their part of the input of
the attention output projection (one block of columns per head group) and
of the FFN output projection (one column per neuron). That is exactly the
narrower sub-model's forward pass; their weights get no gradient in that
step. The other steps train the whole sub-model as usual.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedModel

from .extract import spec_of
from .layout import describe
from .spec import width_count


class NestedDropout:
    """The per-step width draws of :func:`nested_dropout` (use that, not this).

    Attributes
    ----------
    widths : list of (int, int) or None
        Kept head groups and FFN neurons per layer in the current step, or
        ``None`` when the step trains the whole sub-model.
    """

    def __init__(
        self,
        rate: float,
        seed: int,
        kept: list[tuple[int, int]],
        ties: list[int],
        ffn_step: int,
        head_block: int,
    ) -> None:
        self.rate = rate
        self.rng = np.random.default_rng(seed)
        self.kept = kept
        self.ties = ties  # ties[i]: the layer whose head draw layer i takes (T5 stacks)
        self.ffn_step = ffn_step
        self.head_block = head_block  # input columns of attn_out per head group
        self.widths: list[tuple[int, int]] | None = None
        self.narrowed_steps = 0

    def draw(self) -> list[tuple[int, int]] | None:
        """Choose the next step's widths: all of it, or a random prefix (share ``rate``)."""
        if self.rng.random() >= self.rate:
            self.widths = None
            return None
        heads = [int(self.rng.integers(1, h + 1)) for h, _ in self.kept]
        heads = [heads[self.ties[i]] for i in range(len(heads))]
        ffn = []
        for _, f in self.kept:
            steps = max(1, f // self.ffn_step)
            ffn.append(min(f, int(self.rng.integers(1, steps + 1)) * self.ffn_step))
        self.widths = list(zip(heads, ffn, strict=True))
        self.narrowed_steps += 1
        return self.widths

    def _hook(self, layer: int, kind: str):
        def hook(module: nn.Module, args: tuple) -> tuple:
            if self.widths is None:
                return args
            heads, ffn = self.widths[layer]
            keep = heads * self.head_block if kind == "attn_out" else ffn
            x = args[0]
            if keep >= x.shape[-1]:
                return args
            mask = torch.zeros(x.shape[-1], dtype=x.dtype, device=x.device)
            mask[:keep] = 1
            return (x * mask, *args[1:])

        return hook


@contextmanager
def nested_dropout(model: PreTrainedModel, rate: float, seed: int) -> Iterator[NestedDropout]:
    """Train random salient prefixes of ``model`` in a share ``rate`` of the steps.

    Call ``.draw()`` on the yielded object before each training step; the
    forward passes of that step then run the drawn prefix (or the whole
    model). Hooks are removed on exit; the model's weights and shapes are
    never changed.

    Parameters
    ----------
    model : PreTrainedModel
        A full model or a sub-model from :func:`raffm_core.build_submodel`
        (its prefixes are its first kept units, in the order it holds them),
        optionally wrapped by PEFT.
    rate : float
        Share of steps, in ``[0, 1)``, that train a random prefix.
    seed : int
        Seeds the draws (its own generator; global RNGs are not touched).

    Raises
    ------
    ValueError
        If ``rate`` is outside ``[0, 1)``.
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"nested-dropout rate must be in [0, 1), got {rate!r}")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layout = describe(base)
    spec = spec_of(base) or layout.full_spec()
    kept = [(width_count(x.heads), width_count(x.ffn)) for x in spec.layers]
    ties = list(range(layout.num_layers))
    for group in layout.head_ties:
        for i in group:
            ties[i] = group[0]
    controller = NestedDropout(
        rate,
        seed,
        kept,
        ties,
        ffn_step=max(1, layout.ffn_size // 64),
        head_block=layout.group_size * layout.head_dim,
    )
    handles = []
    for layer in layout.layers:
        for role, path in layer.modules.items():
            kind = role.rpartition(".")[2]  # every attention block's output (T5: cross too)
            if kind in ("attn_out", "ffn_out"):
                hook = controller._hook(layer.index, kind)
                handles.append(base.get_submodule(path).register_forward_pre_hook(hook))
    try:
        yield controller
    finally:
        for handle in handles:
            handle.remove()


__all__ = ["NestedDropout", "nested_dropout"]
