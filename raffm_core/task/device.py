"""A device's own budget: measure the memory it may use, turn it into a ``memory-mb`` budget.

A node started with ``budget="auto"`` calls :func:`measure_memory` and
:func:`auto_budget`. The result is a :class:`~raffm_core.Budget` of kind
``memory-mb``, the unit of the training memory model
(:func:`raffm_core.budget.training_memory_mb`: the peak resident memory of the
process that trains). The server fits the sub-network to it with that model,
exactly as for a ``memory-mb`` budget written by hand.

What "may use" means: the process's resident memory now, plus what it can
still get, which is the smaller of the memory the operating system reports
available (``psutil.virtual_memory().available``) and, in a container, the
headroom of the memory cgroup (limit minus usage, cgroup v2 ``memory.max`` /
``memory.current`` or v1 ``memory.limit_in_bytes`` / ``memory.usage_in_bytes``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import psutil

from ..budget import Budget, TrainingProfile
from ..errors import BudgetError

MB = 2**20
UNLIMITED_BYTES = 2**60
"""cgroup v1 reports "no limit" as a huge number (``PAGE_COUNTER_MAX`` pages)."""

AUTO_FRACTION = 0.8
"""Share of the usable memory an ``auto`` budget claims; the rest is left for
the operating system, other processes and the estimate's error (the memory
model is held within 30% of measured peaks)."""


@dataclass(frozen=True)
class CgroupMemory:
    """The memory cgroup the process runs in.

    Attributes
    ----------
    limit_mb : float or None
        The cgroup's limit; None when unlimited.
    usage_mb : float
        What the cgroup uses now (page cache included, as the kernel counts it).
    path : str
        The file the limit was read from.
    """

    limit_mb: float | None
    usage_mb: float
    path: str


@dataclass(frozen=True)
class MemoryReading:
    """What :func:`measure_memory` saw.

    Attributes
    ----------
    system_available_mb : float
        Memory the operating system can give without swapping.
    process_rss_mb : float
        Resident memory of this process.
    cgroup : CgroupMemory or None
        The memory cgroup, if one could be read.
    """

    system_available_mb: float
    process_rss_mb: float
    cgroup: CgroupMemory | None = None

    @property
    def headroom_mb(self) -> float:
        """Memory the process can still get: the system's, capped by the cgroup's."""
        headroom = self.system_available_mb
        if self.cgroup is not None and self.cgroup.limit_mb is not None:
            headroom = min(headroom, max(0.0, self.cgroup.limit_mb - self.cgroup.usage_mb))
        return headroom

    @property
    def usable_mb(self) -> float:
        """Peak resident memory this process may reach: what it holds plus its headroom."""
        return self.process_rss_mb + self.headroom_mb

    def describe(self) -> str:
        """One log line of what was measured."""
        text = (
            f"{self.system_available_mb:.0f} MB available to the system, "
            f"{self.process_rss_mb:.0f} MB resident in this process"
        )
        if self.cgroup is None:
            return text + ", no memory cgroup found"
        if self.cgroup.limit_mb is None:
            return text + f", memory cgroup without limit ({self.cgroup.path})"
        return text + (
            f", memory cgroup limit {self.cgroup.limit_mb:.0f} MB with "
            f"{self.cgroup.usage_mb:.0f} MB used ({self.cgroup.path})"
        )


def read_cgroup_memory(
    root: Path | str = "/sys/fs/cgroup", self_cgroup: Path | str = "/proc/self/cgroup"
) -> CgroupMemory | None:
    """The memory limit and usage of this process's cgroup (v2 or v1), or None.

    Parameters
    ----------
    root : path
        Where the cgroup file systems are mounted.
    self_cgroup : path
        ``/proc/self/cgroup``, which names the process's cgroup per hierarchy.

    Returns
    -------
    CgroupMemory or None
        None when no readable memory controller is found (e.g. not Linux).
    """
    root = Path(root)
    try:
        lines = Path(self_cgroup).read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        rel = rel.lstrip("/")
        if controllers == "":  # cgroup v2: "0::/path"
            candidates = [root / rel, root]
            limit_name, usage_name = "memory.max", "memory.current"
        elif "memory" in controllers.split(","):  # cgroup v1: "4:memory:/path"
            candidates = [root / "memory" / rel, root / "memory"]
            limit_name, usage_name = "memory.limit_in_bytes", "memory.usage_in_bytes"
        else:
            continue
        for folder in candidates:  # a container often sees its own cgroup at the root
            limit_file, usage_file = folder / limit_name, folder / usage_name
            try:
                limit_text = limit_file.read_text().strip()
                usage = int(usage_file.read_text().strip())
                limit = None if limit_text == "max" else int(limit_text)
            except (OSError, ValueError):
                continue
            if limit is not None and limit >= UNLIMITED_BYTES:
                limit = None
            return CgroupMemory(None if limit is None else limit / MB, usage / MB, str(limit_file))
    return None


def measure_memory() -> MemoryReading:
    """Measure the memory this process may use (see the module docstring)."""
    return MemoryReading(
        system_available_mb=psutil.virtual_memory().available / MB,
        process_rss_mb=psutil.Process().memory_info().rss / MB,
        cgroup=read_cgroup_memory(),
    )


def auto_budget(
    reading: MemoryReading,
    fraction: float = AUTO_FRACTION,
    profile: TrainingProfile | None = None,
) -> Budget:
    """The ``memory-mb`` budget a device with ``reading`` reports.

    Parameters
    ----------
    reading : MemoryReading
        From :func:`measure_memory`.
    fraction : float
        Share of :attr:`MemoryReading.usable_mb` to claim, in (0, 1].
    profile : TrainingProfile, optional
        Only its ``runtime_mb`` is used: the memory model's floor, the peak of a
        process that trains a negligible model.

    Returns
    -------
    Budget
        ``memory-mb=floor(fraction * usable_mb)``.

    Raises
    ------
    BudgetError
        If ``fraction`` is out of range, or the budget would not even cover the
        memory model's runtime floor, so no sub-network could ever fit.
    """
    if not 0 < fraction <= 1:
        raise BudgetError(f"auto budget fraction must be in (0, 1], got {fraction}")
    floor = (profile or TrainingProfile()).runtime_mb
    mb = int(fraction * reading.usable_mb)
    if mb <= floor:
        raise BudgetError(
            f"auto budget: {fraction:.0%} of the {reading.usable_mb:.0f} MB this process "
            f"may use is {mb} MB, not above the {floor:.0f} MB a training process needs "
            f"before any model ({reading.describe()})"
        )
    return Budget.parse(f"memory-mb={mb}")
