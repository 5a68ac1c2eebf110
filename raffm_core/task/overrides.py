"""``key=value`` run-config overrides, parsed once for every command line and script."""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Iterable
from typing import Any

from ..errors import ConfigError
from .config import RunConfig, key_of


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``key=value`` overrides (``--set``, ``make run ARGS=...``) as a kebab-case mapping.

    A value is read as TOML (``lr=5e-5``, ``resume=true``, ``strategy="fedrolex"``).
    For a key whose :class:`RunConfig` field is a string, a value that is not a
    TOML string is kept as the text it reads: make and the shell strip the
    quotes of ``make run ARGS='strategy="fedrolex"'`` (``strategy=fedrolex``),
    and ``dataset-config=1`` means the name ``"1"``. One item may hold several
    space-separated overrides, as ``flwr run --run-config`` takes them; a word
    without ``=`` continues the value before it (``lora-target-modules=query, value``).
    Keys are not checked here: :meth:`RunConfig.from_mapping` names unknown ones.

    Parameters
    ----------
    items : iterable of str
        The overrides, e.g. ``["lr=5e-5 seed=3", 'strategy="fedrolex"']``.

    Returns
    -------
    dict
        Key to typed value; a key given twice keeps its last value.

    Raises
    ------
    ConfigError
        If an item is not ``key=value``; the message quotes it.
    """
    string_keys = {key_of(f.name) for f in dataclasses.fields(RunConfig) if f.type == "str"}
    out: dict[str, Any] = {}
    for item in items:
        if not isinstance(item, str):
            raise ConfigError(f"run-config override {item!r} is not a key=value string")
        for part in _split_overrides(item):
            key, sep, text = (s.strip() for s in part.partition("="))
            if not sep or not key:
                raise ConfigError(f"run-config override {part!r} is not key=value")
            try:
                value = tomllib.loads(f"v = {text}")["v"]
            except tomllib.TOMLDecodeError:
                value = text  # make and the shell removed the quotes of a string
            out[key] = text if key in string_keys and not isinstance(value, str) else value
    return out


def _split_overrides(item: str) -> list[str]:
    """Split at spaces outside quotes; a word without ``=`` joins the override before it."""
    parts, current, quote = [], "", ""
    for char in item:
        if char in "\"'" and quote in ("", char):
            quote = "" if quote else char
        if char == " " and not quote:
            if current:
                parts.append(current)
            current = ""
            continue
        current += char
    parts += [current] if current else []
    merged: list[str] = []
    for part in parts:
        if merged and "=" not in part:
            merged[-1] += " " + part
        else:
            merged.append(part)
    return merged
