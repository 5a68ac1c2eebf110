"""LoRA hyper-parameters and the modules they target."""

from __future__ import annotations

from dataclasses import dataclass

import peft

from ..errors import SettingsError
from ..families import Family


@dataclass(frozen=True)
class LoraSettings:
    """LoRA hyper-parameters, as the run config gives them.

    Attributes
    ----------
    rank : int
        ``r``, at least 1.
    alpha : float
        Scaling numerator: the update is ``alpha / r * B A``.
    dropout : float
        Dropout on the adapter input, in ``[0, 1)``.
    target_modules : tuple of str
        Module names as peft takes them (``"q_proj"``, ``"query"``); empty
        means the family default, its query and value projections
        (:func:`default_target_modules`).
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        targets = self.target_modules
        if isinstance(targets, str):
            targets = parse_target_modules(targets)
        object.__setattr__(self, "target_modules", tuple(targets))
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise SettingsError(f"LoRA rank must be an integer >= 1, got {self.rank!r}")
        if not self.alpha > 0:
            raise SettingsError(f"LoRA alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise SettingsError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")

    def resolved(self, family: Family) -> LoraSettings:
        """These settings with the family's default targets if none are named."""
        if self.target_modules:
            return self
        return LoraSettings(self.rank, self.alpha, self.dropout, default_target_modules(family))

    def peft_config(self) -> peft.LoraConfig:
        """The ``peft.LoraConfig``; targets must be resolved first (:meth:`resolved`)."""
        if not self.target_modules:
            raise SettingsError("LoRA target modules are not resolved; call resolved()")
        return peft.LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
            bias="none",
        )


def parse_target_modules(text: str) -> tuple[str, ...]:
    """``"q_proj, v_proj"`` to ``("q_proj", "v_proj")``; empty entries are dropped."""
    return tuple(t.strip() for t in text.split(",") if t.strip())


def default_target_modules(family: Family) -> tuple[str, ...]:
    """The family's query and value projections (``query,value``; ``q_proj,v_proj``;
    GPT-2's fused ``c_attn``; T5's ``q,v``)."""
    attention = family.layer_stacks()[0].attention[0]
    names = (attention.query.rpartition(".")[2], attention.value.rpartition(".")[2])
    return tuple(dict.fromkeys(names))
