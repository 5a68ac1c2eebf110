"""Give memory back to the system between messages and rounds.

A Ray actor serves hundreds of virtual nodes in turn, each message building
and dropping a sub-model of another width and its optimizer state; the
server builds and drops a prioritized copy of the global model and one
sub-model per node every round. Python frees those tensors, but glibc keeps
the freed pages in its heaps (one arena per thread that ever allocated), so
RSS climbs from round to round although nothing is alive.
``malloc_trim(0)`` hands the free pages of every arena back; a
``gc.collect()`` first frees what only reference cycles held (transformers
modules hold some). The ClientApp calls :func:`release_memory` before each
message and after training, the ServerApp after each round.

A full ``gc.collect()`` walks every tracked object: 0.17-0.20 s in a process
that has imported torch, transformers and flwr (450,000 objects), which was
most of a budget query's cost in simulation. So the first call collects,
then ``gc.freeze()``-s what survives (the libraries' objects, alive for the
process's life) out of later collections, which then take microseconds.
Objects frozen then that die later in a reference cycle are not reclaimed;
refcounting still frees everything else.

Trimming alone still leaves a Ray actor's RSS 12-13% higher after 30
rounds of the soak run than after 3, most of it by round 15-20, then flat
(``docs/scale.md``). Pinning glibc's mmap threshold at 1 MB
(``RAFFM_MMAP_THRESHOLD=1048576``: :func:`pin_mmap_threshold`, which the
ClientApp calls before each message) keeps it within 9%, because blocks of a
MB or more then get their own mappings, returned on free, instead of
fragmenting the heap; but every activation of a training step then costs a
``mmap``, page faults and a ``munmap``, and training took 20% longer. So it
is opt-in.

``RAFFM_MALLOC_TRIM=0`` in the environment turns trimming off, to measure its
effect (``scripts/bench_scale.py --soak --no-trim``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
from collections.abc import Callable
from functools import lru_cache

TRIM_ENV = "RAFFM_MALLOC_TRIM"
"""Environment variable: ``0`` keeps freed memory in the allocator (no trim)."""


THRESHOLD_ENV = "RAFFM_MMAP_THRESHOLD"
"""Environment variable: pin glibc's mmap threshold at this many bytes (unset or 0: no pin)."""
_M_MMAP_THRESHOLD = -3  # glibc's malloc.h


@lru_cache(maxsize=1)
def pin_mmap_threshold() -> bool:
    """Pin glibc's mmap threshold at ``RAFFM_MMAP_THRESHOLD`` bytes, once per process.

    Returns whether it was set: ``False`` when the variable is unset or 0,
    without glibc's ``mallopt``, or when ``MALLOC_MMAP_THRESHOLD_`` (glibc's
    own, read at start-up) is set.

    Raises
    ------
    ValueError
        If ``RAFFM_MMAP_THRESHOLD`` is not a whole number of bytes.
    """
    value = os.environ.get(THRESHOLD_ENV, "0")
    try:
        threshold = int(value)
    except ValueError:
        raise ValueError(f"{THRESHOLD_ENV}={value!r}: expected a number of bytes") from None
    if threshold <= 0 or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    return _set_threshold(threshold)


def _set_threshold(threshold: int) -> bool:
    mallopt = getattr(_libc(), "mallopt", None)
    return bool(mallopt is not None and mallopt(_M_MMAP_THRESHOLD, threshold) == 1)


@lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


@lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or ``None`` on a C library without it (musl, macOS)."""
    return getattr(_libc(), "malloc_trim", None)


_FROZEN: list[bool] = []  # whether this process has frozen its survivors


def release_memory() -> bool:
    """Collect reference cycles and return free heap pages to the system.

    Returns
    -------
    bool
        Whether pages were trimmed (``False`` when turned off by
        ``RAFFM_MALLOC_TRIM=0`` or where glibc's ``malloc_trim`` is missing).
    """
    if os.environ.get(TRIM_ENV, "1") == "0":
        return False
    gc.collect()
    if not _FROZEN:  # not gc.get_freeze_count(), which walks every frozen object (11 ms)
        gc.freeze()  # once: the survivors of the first collection stay out of later ones
        _FROZEN.append(True)
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
