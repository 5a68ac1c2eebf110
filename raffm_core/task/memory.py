"""Give memory back to the system between messages and rounds.

A Ray actor serves hundreds of virtual nodes in turn, each message building
and dropping a sub-model of another width and its optimizer state; the
server builds and drops a prioritized copy of the global model and one
sub-model per node every round. Python frees those tensors, but glibc keeps
the freed pages in its heaps (one arena per thread that ever allocated), so
RSS climbs from round to round although nothing is alive.
``malloc_trim(0)`` hands the free pages of every arena back; a
``gc.collect()`` first frees what only reference cycles held (transformers
modules hold some). The ClientApp calls :func:`release_memory` after each
train and evaluate reply, the ServerApp after each round.

A full ``gc.collect()`` walks every tracked object: 0.17-0.20 s in a process
that has imported torch, transformers and flwr (450,000 objects), which was
most of a budget query's cost in simulation. So the first call collects,
then ``gc.freeze()``-s what survives (the libraries' objects, alive for the
process's life) out of later collections, which then take microseconds.
Objects frozen then that die later in a reference cycle are not reclaimed;
refcounting still frees everything else.

Trimming alone left a Ray actor growing by 13% over 30 rounds of the soak
run (``docs/scale.md``): glibc serves allocations above its mmap threshold
with ``mmap`` and returns them on ``free``, but raises that threshold to the
size of each such block freed (up to 32 MB), so after the first sub-model the
activation and optimizer buffers of a few MB come from the heap, where blocks
of changing sizes fragment it. The ClientApp therefore calls
:func:`pin_mmap_threshold` before its first message, which fixes the threshold
at :data:`MMAP_THRESHOLD` (``mallopt(M_MMAP_THRESHOLD)`` also stops the
adjustment), unless ``MALLOC_MMAP_THRESHOLD_`` is set already. The server
does not: pinned, it reached the same plateau, only rounds later.

``RAFFM_MALLOC_TRIM=0`` in the environment turns all of this off, to measure its
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


MMAP_THRESHOLD = 1 << 20
"""Bytes: allocations at least this large get their own mapping, returned on free."""
_M_MMAP_THRESHOLD = -3  # glibc's malloc.h


@lru_cache(maxsize=1)
def pin_mmap_threshold() -> bool:
    """Pin glibc's mmap threshold at :data:`MMAP_THRESHOLD`, once per process.

    Returns whether it was set: ``False`` without glibc's ``mallopt``, when
    the environment already sets ``MALLOC_MMAP_THRESHOLD_``, or under
    ``RAFFM_MALLOC_TRIM=0``.
    """
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or os.environ.get(TRIM_ENV, "1") == "0":
        return False
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None) if libc is not None else None
    return bool(mallopt is not None and mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1)


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
    if gc.get_freeze_count() == 0:
        gc.freeze()  # once: the survivors of the first collection stay out of later ones
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
