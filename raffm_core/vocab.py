"""Vocabulary trimming: a sub-model's token embedding keeps only the rows its node uses.

A node's data uses a few hundred or thousand of a tokenizer's tens of
thousands of tokens; on a small encoder the word embeddings are most of the
parameters (all-MiniLM-L6-v2: 11.7M of 22.7M). A :class:`~raffm_core.SubnetSpec`
with ``vocab`` keeps those rows only; :func:`trim_vocab` swaps the model's
input embedding for a :class:`TrimmedEmbedding` of them. Which embedding may
be trimmed is family data (:attr:`raffm_core.families.Family.token_embedding`,
:attr:`raffm_core.ModelLayout.vocab_key`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from .layout import ModelLayout
from .spec import SubnetSpec


class TrimmedEmbedding(nn.Embedding):
    """An input token embedding that holds only some rows of the full vocabulary.

    It takes token ids of the full vocabulary (the tokenizer's), looks up
    the row each one has here, and is otherwise an ``nn.Embedding`` of
    ``len(token_ids)`` rows: row ``i`` is token ``token_ids[i]`` (sorted).
    An id that is not kept is an error, never a silent substitute.

    Parameters
    ----------
    token_ids : sequence of int
        The kept token ids, sorted and unique (a spec's ``vocab``).
    vocab_size : int
        Rows of the full vocabulary.
    embedding_dim : int
    padding_idx : int, optional
        The padding token's id in the full vocabulary; its row here, if kept,
        gets no gradient, as in the full model.
    """

    def __init__(
        self,
        token_ids: tuple[int, ...],
        vocab_size: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        **kwargs: Any,
    ) -> None:
        self.token_ids = tuple(token_ids)
        self.vocab_size = vocab_size
        row = {t: i for i, t in enumerate(self.token_ids)}.get(padding_idx)
        super().__init__(len(self.token_ids), embedding_dim, padding_idx=row, **kwargs)
        self._rows: torch.Tensor | None = None

    def rows_of(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Row positions of ``input_ids`` (full-vocabulary ids) in this table.

        Raises
        ------
        ValueError
            If an id is not kept; the message names it and how many there are.
        """
        if self._rows is None or self._rows.device != input_ids.device:
            rows = torch.full((self.vocab_size,), -1, dtype=torch.long)
            rows[torch.tensor(self.token_ids, dtype=torch.long)] = torch.arange(len(self.token_ids))
            self._rows = rows.to(input_ids.device)
        if input_ids.numel() and (
            int(input_ids.min()) < 0 or int(input_ids.max()) >= self.vocab_size
        ):
            raise ValueError(
                f"token ids must be in 0..{self.vocab_size - 1}, got "
                f"{int(input_ids.min())}..{int(input_ids.max())}"
            )
        rows = self._rows[input_ids]
        missing = rows < 0
        if bool(missing.any()):
            absent = torch.unique(input_ids[missing])
            raise ValueError(
                f"{absent.numel()} token id(s) are not in this sub-model's vocabulary of "
                f"{len(self.token_ids)} rows, e.g. {absent[:5].tolist()}: the node must "
                "report every token id of its data with its budget"
            )
        return rows

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().forward(self.rows_of(input_ids))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, of a vocabulary of {self.vocab_size}"


def trim_vocab(model: PreTrainedModel, layout: ModelLayout, spec: SubnetSpec) -> None:
    """Replace the token embedding by a :class:`TrimmedEmbedding` of ``spec.vocab``."""
    if spec.vocab is None or layout.vocab_key is None:
        return
    path = layout.vocab_key.removesuffix(".weight")
    old = model.get_submodule(path)
    kept = tuple(range(spec.vocab)) if isinstance(spec.vocab, int) else spec.vocab
    new = TrimmedEmbedding(
        kept,
        layout.vocab_size,
        old.embedding_dim,
        padding_idx=old.padding_idx,
        device=old.weight.device,
        dtype=old.weight.dtype,
    )
    parent_path, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent_path), name, new)


__all__ = ["TrimmedEmbedding", "trim_vocab"]
