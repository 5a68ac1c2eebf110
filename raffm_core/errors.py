"""Exceptions raised by raffm_core.

Every error names the offending thing (a tensor key, a layer, a budget) and says
what was expected, so that a log line is enough to act on it.
"""

from __future__ import annotations


class RaffmError(Exception):
    """Base class of every error raised by raffm_core."""


class UnsupportedModelError(RaffmError, ValueError):
    """The architecture, or one of its settings, is not supported."""


class SpecError(RaffmError, ValueError):
    """A :class:`~raffm_core.SubnetSpec` does not fit the model it is used with."""


class BudgetError(RaffmError, ValueError):
    """A budget string cannot be parsed, or no sub-network satisfies it."""


class BudgetTooSmallError(BudgetError):
    """The budget is below the cost of the smallest sub-network.

    Attributes
    ----------
    minimum : float
        The cost of the smallest sub-network, in the budget's unit.
    """

    def __init__(self, message: str, minimum: float) -> None:
        super().__init__(message)
        self.minimum = minimum


class UpdateError(RaffmError, ValueError):
    """A client update cannot be aggregated; nothing was changed."""


class ConfigError(RaffmError, ValueError):
    """A run-config value is missing, mistyped or out of range."""


class DataError(RaffmError, ValueError):
    """A dataset cannot be loaded or does not have the columns asked for."""


class InstructionError(RaffmError, ValueError):
    """An instruction from the server lacks a key or carries a bad value."""


class CheckpointError(RaffmError, RuntimeError):
    """A checkpoint cannot be read, or was written by a different run."""


class SettingsError(RaffmError, ValueError):
    """A method setting (e.g. a LoRA rank or alpha) is out of range."""
