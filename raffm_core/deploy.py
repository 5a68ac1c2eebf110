"""Deprecated: this module is now :mod:`raffm_core.export`.

``from raffm_core.deploy import export_submodel`` (and ``plain_config``,
``InferenceProfile``) still works and emits a :class:`DeprecationWarning`
naming the new module; import them from :mod:`raffm_core.export` or from
:mod:`raffm_core` itself.
"""

from __future__ import annotations

import warnings
from typing import Any

from . import export as _export

_MOVED = ("InferenceProfile", "export_submodel", "plain_config")


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        warnings.warn(
            f"raffm_core.deploy is deprecated and will be removed: import {name} from "
            f"raffm_core.export (or raffm_core) instead",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(_export, name)
    raise AttributeError(f"module 'raffm_core.deploy' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_MOVED])
