"""The description of a sub-network: which heads and FFN neurons each layer keeps,
and optionally which rows of the input token embedding (its vocabulary)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import SpecError

SPEC_FORMAT_VERSION = 1

Width = int | tuple[int, ...]
"""A kept set along one elastic axis: ``n`` keeps units ``0..n-1`` (a prefix,
which is what prioritization makes most salient), a tuple keeps exactly those
unit indices (sorted, unique), as rolling windows need."""


def parse_runs(text: str, what: str) -> list[int]:
    """``"0-131,1100-1231"`` (inclusive runs; a lone ``"7"`` is one unit) to indices."""
    indices: list[int] = []
    for part in text.split(","):
        first, sep, last = part.strip().partition("-")
        try:
            lo, hi = int(first), int(last) if sep else int(first)
        except ValueError:
            raise SpecError(f"{what}: {part!r} is not a run like '3' or '3-9'") from None
        if hi < lo:
            raise SpecError(f"{what}: run {part!r} ends before it starts")
        indices.extend(range(lo, hi + 1))
    return indices


def format_runs(indices: tuple[int, ...]) -> str:
    """Inverse of :func:`parse_runs` for sorted, unique indices."""
    runs, start, prev = [], indices[0], indices[0]
    for i in indices[1:]:
        if i != prev + 1:
            runs.append((start, prev))
            start = i
        prev = i
    runs.append((start, prev))
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _normalize(value: Any, what: str) -> Width:
    if isinstance(value, str):
        value = parse_runs(value, what)
    if isinstance(value, bool):
        raise SpecError(f"{what}: expected an int or a list of ints, got {value!r}")
    if isinstance(value, int):
        if value < 1:
            raise SpecError(f"{what}: a layer must keep at least 1 unit, got {value}")
        return value
    if isinstance(value, Iterable) and not isinstance(value, (str, bytes, Mapping)):
        items = list(value)
        if not items or not all(isinstance(i, int) and not isinstance(i, bool) for i in items):
            raise SpecError(f"{what}: expected a non-empty list of ints, got {value!r}")
        indices = tuple(sorted(set(items)))
        if len(indices) != len(items):
            raise SpecError(f"{what}: indices must be unique, got {items}")
        if indices[0] < 0:
            raise SpecError(f"{what}: indices must be >= 0, got {indices[0]}")
        if indices == tuple(range(len(indices))):
            return len(indices)  # a prefix: keep the canonical compact form
        return indices
    raise SpecError(f"{what}: expected an int or a list of ints, got {type(value).__name__}")


def width_count(width: Width) -> int:
    """Number of units kept by ``width``."""
    return width if isinstance(width, int) else len(width)


def width_max(width: Width) -> int:
    """Largest unit index kept by ``width``, plus one."""
    return width if isinstance(width, int) else width[-1] + 1


@dataclass(frozen=True)
class LayerSpec:
    """What one transformer layer keeps.

    Attributes
    ----------
    heads : int or tuple of int
        Kept attention head groups. A group is one key/value head together with
        the query heads that share it (under grouped-query attention); with
        ordinary multi-head attention a group is one head.
    ffn : int or tuple of int
        Kept FFN neurons.
    """

    heads: Width
    ffn: Width

    def __post_init__(self) -> None:
        object.__setattr__(self, "heads", _normalize(self.heads, "heads"))
        object.__setattr__(self, "ffn", _normalize(self.ffn, "ffn"))

    @property
    def is_prefix(self) -> bool:
        return isinstance(self.heads, int) and isinstance(self.ffn, int)


@dataclass(frozen=True)
class SubnetSpec:
    """A sub-network of a layered transformer, one :class:`LayerSpec` per layer.

    It is plain data: JSON round trips through :meth:`to_dict` /
    :meth:`from_dict` (or :meth:`to_json` / :meth:`from_json`), and it is
    checked against a model's shape by :meth:`raffm_core.ModelLayout.check_spec`.

    Attributes
    ----------
    layers : tuple of LayerSpec
    vocab : int, tuple of int or None
        Rows of the input token embedding the sub-model keeps, as token ids
        of the full vocabulary (``None``: all of them). A node needs only the
        rows of the tokens in its data; on a small encoder those rows are
        most of the parameters (all-MiniLM-L6-v2: 11.7M of 22.7M). See
        :class:`raffm_core.vocab.TrimmedEmbedding`.
    """

    layers: tuple[LayerSpec, ...]
    vocab: Width | None = None

    def __post_init__(self) -> None:
        layers = tuple(self.layers)
        if not layers:
            raise SpecError("a SubnetSpec needs at least one layer")
        if not all(isinstance(layer, LayerSpec) for layer in layers):
            raise SpecError("SubnetSpec.layers must hold LayerSpec objects")
        object.__setattr__(self, "layers", layers)
        if self.vocab is not None:
            object.__setattr__(self, "vocab", _normalize(self.vocab, "vocab"))

    @classmethod
    def uniform(
        cls, num_layers: int, heads: Width, ffn: Width, vocab: Width | None = None
    ) -> SubnetSpec:
        """The same kept set in every layer."""
        return cls(tuple(LayerSpec(heads, ffn) for _ in range(num_layers)), vocab)

    def with_vocab(self, vocab: Width | None) -> SubnetSpec:
        """This spec keeping the token-embedding rows ``vocab`` (``None``: all)."""
        return SubnetSpec(self.layers, vocab)

    @property
    def is_prefix(self) -> bool:
        """Whether every layer keeps leading units only."""
        return all(layer.is_prefix for layer in self.layers)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable form; an index set is a string of inclusive runs.

        ``"0-131,1100-1231"`` keeps units 0..131 and 1100..1231: a rolling
        window of hundreds of FFN neurons takes a few bytes instead of a list of
        every index. :meth:`from_dict` also reads plain lists of indices.
        """

        def dump(width: Width) -> int | str:
            return width if isinstance(width, int) else format_runs(width)

        data: dict[str, Any] = {
            "format": SPEC_FORMAT_VERSION,
            "layers": [{"heads": dump(x.heads), "ffn": dump(x.ffn)} for x in self.layers],
        }
        if self.vocab is not None:
            data["vocab"] = dump(self.vocab)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SubnetSpec:
        """Inverse of :meth:`to_dict`.

        Raises
        ------
        SpecError
            If the dictionary is not a spec of a known format.
        """
        if not isinstance(data, Mapping):
            raise SpecError(f"a spec must be a mapping, got {type(data).__name__}")
        version = data.get("format")
        if version != SPEC_FORMAT_VERSION:
            raise SpecError(f"spec format {version!r} is not supported (expected 1)")
        unknown = sorted(set(data) - {"format", "layers", "vocab"})
        if unknown:
            raise SpecError(f"spec has unknown keys {unknown}; expected format, layers, vocab")
        layers = data.get("layers")
        if not isinstance(layers, Sequence) or isinstance(layers, (str, bytes)):
            raise SpecError("spec 'layers' must be a list")
        parsed = []
        for i, layer in enumerate(layers):
            if not isinstance(layer, Mapping) or set(layer) != {"heads", "ffn"}:
                raise SpecError(f"spec layer {i} must have exactly the keys 'heads' and 'ffn'")
            try:
                parsed.append(LayerSpec(layer["heads"], layer["ffn"]))
            except SpecError as err:
                raise SpecError(f"spec layer {i}: {err}") from None
        return cls(tuple(parsed), data.get("vocab"))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> SubnetSpec:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise SpecError(f"spec is not valid JSON: {err}") from None
        return cls.from_dict(data)


def state_mismatch(state: Mapping[str, Any], expected: Mapping[str, Sequence[int]]) -> str | None:
    """How ``state`` differs from the key-to-shape map ``expected``, or ``None``.

    The first difference found, as a message fragment: missing keys, then
    unexpected keys, then a non-tensor value or a shape that differs (keys in
    sorted order). Callers prefix it and raise their own error type.
    """
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing:
        return f"missing {len(missing)} key(s), e.g. {missing[:5]}"
    if extra:
        return f"unexpected {len(extra)} key(s), e.g. {extra[:5]}"
    for key in sorted(expected):
        value, want = state[key], tuple(expected[key])
        shape = getattr(value, "shape", None)
        if shape is None:
            return f"{key!r} is a {type(value).__name__}, not a tensor"
        if tuple(shape) != want:
            return f"{key!r} has shape {tuple(shape)}, expected {want}"
    return None
