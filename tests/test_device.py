"""``budget="auto"``: a node measures the memory it may use and reports a memory-mb budget."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from client_app import partition
from client_app.app import build_client_app
from raffm_core import Budget, BudgetError
from raffm_core.budget import RUNTIME_OVERHEAD_MB
from raffm_core.task.config import RunConfig
from raffm_core.task.device import (
    CgroupMemory,
    MemoryReading,
    auto_budget,
    measure_memory,
    read_cgroup_memory,
)
from raffm_core.task.keys import BUDGET, CONFIG
from tests.fakes import task_identity

GB = 2**30


def write_cgroup(tmp: Path, lines: list[str], files: dict[str, str]) -> tuple[Path, Path]:
    """A fake /sys/fs/cgroup tree and /proc/self/cgroup."""
    root = tmp / "cgroup"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    self_cgroup = tmp / "self-cgroup"
    self_cgroup.write_text("\n".join(lines) + "\n")
    return root, self_cgroup


@pytest.mark.parametrize(
    ("lines", "files", "expected"),
    [
        pytest.param(
            ["0::/job/a"],
            {"job/a/memory.max": f"{2 * GB}\n", "job/a/memory.current": f"{GB // 2}\n"},
            (2048.0, 512.0, "job/a/memory.max"),
            id="v2-limited",
        ),
        pytest.param(
            ["0::/job/a"],
            {"job/a/memory.max": "max\n", "job/a/memory.current": f"{GB}\n"},
            (None, 1024.0, "job/a/memory.max"),
            id="v2-unlimited",
        ),
        pytest.param(
            ["0::/job/a"],  # a container sees its own cgroup at the root
            {"memory.max": f"{GB}\n", "memory.current": f"{GB // 4}\n"},
            (1024.0, 256.0, "memory.max"),
            id="v2-namespaced",
        ),
        pytest.param(
            ["5:cpu,cpuacct:/x", "4:memory:/docker/c1", "0::/"],
            {
                "memory/docker/c1/memory.limit_in_bytes": f"{3 * GB}\n",
                "memory/docker/c1/memory.usage_in_bytes": f"{GB}\n",
            },
            (3072.0, 1024.0, "memory/docker/c1/memory.limit_in_bytes"),
            id="v1-limited",
        ),
        pytest.param(
            ["4:memory:/"],
            {
                "memory/memory.limit_in_bytes": "9223372036854771712\n",
                "memory/memory.usage_in_bytes": f"{GB}\n",
            },
            (None, 1024.0, "memory/memory.limit_in_bytes"),
            id="v1-unlimited",
        ),
    ],
)
def test_cgroup_limit_and_usage_are_read_from_the_process_cgroup(tmp_path, lines, files, expected):
    root, self_cgroup = write_cgroup(tmp_path, lines, files)
    found = read_cgroup_memory(root, self_cgroup)
    limit, usage, rel = expected
    assert found == CgroupMemory(limit, usage, str(root / rel))


@pytest.mark.parametrize(
    ("lines", "files"),
    [
        pytest.param(["3:cpu:/a"], {"cpu/a/cpu.max": "max"}, id="no-memory-controller"),
        pytest.param(["0::/a"], {"a/memory.max": "1000"}, id="usage-missing"),
        pytest.param(["0::/a"], {"a/memory.max": "x", "a/memory.current": "1"}, id="garbage"),
    ],
)
def test_no_readable_cgroup_is_none(tmp_path, lines, files):
    root, self_cgroup = write_cgroup(tmp_path, lines, files)
    assert read_cgroup_memory(root, self_cgroup) is None
    assert read_cgroup_memory(root, tmp_path / "missing") is None


def test_headroom_is_the_smaller_of_system_and_cgroup():
    free = MemoryReading(system_available_mb=8000.0, process_rss_mb=500.0)
    assert free.headroom_mb == 8000.0 and free.usable_mb == 8500.0
    capped = MemoryReading(8000.0, 500.0, CgroupMemory(3000.0, 1200.0, "memory.max"))
    assert capped.headroom_mb == 1800.0 and capped.usable_mb == 2300.0
    unlimited = MemoryReading(8000.0, 500.0, CgroupMemory(None, 1200.0, "memory.max"))
    assert unlimited.headroom_mb == 8000.0
    over = MemoryReading(8000.0, 500.0, CgroupMemory(1000.0, 1200.0, "memory.max"))
    assert over.headroom_mb == 0.0
    assert "limit 3000 MB with 1200 MB used" in capped.describe()


def test_measure_memory_agrees_with_the_kernel():
    """Oracle: /proc/meminfo's MemAvailable and /proc/self/status's VmRSS."""
    meminfo = Path("/proc/meminfo")
    if not meminfo.exists():
        pytest.skip("needs Linux /proc")
    reading = measure_memory()
    available_kb = int(re.search(r"MemAvailable:\s+(\d+) kB", meminfo.read_text()).group(1))
    rss_kb = int(re.search(r"VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))
    # other processes allocate meanwhile: agree within 5% (and 200 MB for RSS)
    assert reading.system_available_mb == pytest.approx(available_kb / 1024, rel=0.05)
    assert abs(reading.process_rss_mb - rss_kb / 1024) < 200


@pytest.mark.parametrize(
    ("usable", "fraction", "expected"),
    [(10_000.0, 0.8, 8000), (2_300.0, 0.8, 1840), (1_001.0, 0.5, 500)],
)
def test_auto_budget_claims_a_fraction_of_usable_memory(usable, fraction, expected):
    reading = MemoryReading(system_available_mb=usable - 300.0, process_rss_mb=300.0)
    budget = auto_budget(reading, fraction)
    assert budget == Budget("memory-mb", float(expected))
    assert Budget.parse(str(budget)) == budget  # what the node reports parses back


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_auto_budget_rejects_a_bad_fraction(fraction):
    with pytest.raises(BudgetError, match="fraction"):
        auto_budget(MemoryReading(8000.0, 300.0), fraction)


def test_auto_budget_below_the_runtime_floor_is_an_error():
    reading = MemoryReading(system_available_mb=100.0, process_rss_mb=300.0)
    with pytest.raises(BudgetError, match=f"{RUNTIME_OVERHEAD_MB:.0f} MB a training process"):
        auto_budget(reading)


def test_node_with_budget_auto_reports_and_logs_what_it_measured(monkeypatch, caplog):
    reading = MemoryReading(6000.0, 400.0, CgroupMemory(2 * 1024.0, 648.0, "/cg/memory.max"))
    monkeypatch.setattr(partition, "measure_memory", lambda: reading)
    node_config = {BUDGET: "auto", "partition-id": 0, "num-partitions": 2}
    with caplog.at_level(logging.INFO, logger="flwr"):
        budget = partition.node_budget(RunConfig(), node_config)
    # usable = 400 + min(6000, 2048 - 648) = 1800; 80% of it
    assert budget == "memory-mb=1440"
    line = next(r.getMessage() for r in caplog.records if "budget auto" in r.getMessage())
    assert "6000 MB available" in line and "limit 2048 MB" in line and "memory-mb=1440" in line


def test_query_handler_answers_auto_with_a_memory_budget():
    """Through the real ClientApp, on this machine's memory."""
    ctx = Context(
        run_id=7,
        node_id=5,
        node_config={BUDGET: "auto", "partition-id": 0, "num-partitions": 2},
        state=RecordDict(),
        run_config={},
    )
    with task_identity(node_id=5):
        query = Message(RecordDict({CONFIG: ConfigRecord({})}), dst_node_id=5, message_type="query")
        query.metadata.__dict__["_message_id"] = "q1"
        reply = build_client_app()(query, ctx)
    budget = Budget.parse(reply.content[CONFIG][BUDGET])
    assert budget.kind == "memory-mb"
    usable = measure_memory().usable_mb
    assert RUNTIME_OVERHEAD_MB < budget.value <= usable + 1
