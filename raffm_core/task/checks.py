"""Checks on raw data that :mod:`raffm_core.task.data` turns into clear errors and warnings."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any


def decode_error(err: BaseException | None) -> UnicodeDecodeError | None:
    """The :class:`UnicodeDecodeError` behind ``err`` (``datasets`` wraps it), if any."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, UnicodeDecodeError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def looks_like_data(columns: Iterable[str]) -> bool:
    """Whether column names look like a row of values (a CSV without a header row).

    A header names columns in a few words; a value that is a number or longer
    than 40 characters (a sentence) is data.
    """

    def is_number(text: str) -> bool:
        try:
            float(text)
        except ValueError:
            return False
        return True

    return any(len(c) > 40 or is_number(c) for c in columns)


def count_blank(values: Iterable[Any]) -> int:
    """How many values are missing: ``None``, NaN (pandas' empty cell) or a blank string."""
    return sum(
        1
        for v in values
        if v is None
        or (isinstance(v, float) and math.isnan(v))
        or (isinstance(v, str) and not v.strip())
    )
