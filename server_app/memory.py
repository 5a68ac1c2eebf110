"""Memory budgets against what nodes measured: the per-node rows, a table and ``memory-budget.png``.

A ``memory-mb=N`` budget is a promise that the node's whole process stays
within N MB while it trains. Per node, over the rounds it trained in, a row
holds the budget, the baseline its process reported (at the budget query,
and the largest in its train replies), the memory model's predicted peak
RSS for the sub-models it was sent, and the peak RSS it measured
(``peak-memory-mb``, the process's high-water mark over the instruction).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers or in Ray workers
import matplotlib.pyplot as plt  # noqa: E402

from raffm_core import Budget  # noqa: E402
from raffm_core.task.keys import BASELINE_MB, PEAK_MEMORY_MB  # noqa: E402

from .records import RoundLog  # noqa: E402

PLOT = "memory-budget.png"


@dataclass
class NodeMemory:
    """One node's memory over a run; the lists hold one value per round it trained in."""

    node_id: int
    partition_id: int | None
    budget: str
    budget_mb: float | None
    """The budget in MB, for a ``memory-mb`` budget; None for a ``params`` one."""
    query_baseline_mb: float | None = None
    train_baseline_mb: list[float] = field(default_factory=list)
    predicted_mb: list[float] = field(default_factory=list)
    peak_mb: list[float] = field(default_factory=list)

    @property
    def label(self) -> str:
        """``p3`` for partition 3, else ``node 101``."""
        return f"p{self.partition_id}" if self.partition_id is not None else f"node {self.node_id}"

    @property
    def over_budget(self) -> int:
        """Rounds whose measured peak exceeded the budget (0 without a memory budget)."""
        if self.budget_mb is None:
            return 0
        return sum(peak > self.budget_mb for peak in self.peak_mb)


def memory_rows(history: Mapping[int, RoundLog]) -> list[NodeMemory]:
    """Per node that replied to a train instruction, ordered by partition, then node id."""
    rows: dict[int, NodeMemory] = {}
    for _, entry in sorted(history.items()):
        for client in entry.clients:
            peak = client.metrics.get(PEAK_MEMORY_MB)
            if peak is None:
                continue
            row = rows.get(client.node_id)
            if row is None:
                row = rows[client.node_id] = NodeMemory(
                    client.node_id,
                    client.partition_id,
                    client.budget,
                    Budget.memory_mb_of(client.budget),
                    client.fit_baseline_mb,
                )
            row.peak_mb.append(float(peak))
            if client.predicted_mb is not None:
                row.predicted_mb.append(client.predicted_mb)
            if BASELINE_MB in client.metrics:
                row.train_baseline_mb.append(float(client.metrics[BASELINE_MB]))
    return sorted(
        rows.values(), key=lambda r: (r.partition_id is None, r.partition_id or 0, r.node_id)
    )


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _span(values: list[float]) -> str:
    if not values:
        return "-"
    lo, hi = min(values), max(values)
    return f"{lo:.0f}" if round(lo) == round(hi) else f"{lo:.0f}-{hi:.0f}"


def format_memory_table(rows: list[NodeMemory]) -> str:
    """A Markdown table: budget, baselines, predicted and measured peaks (MB) per node."""
    lines = [
        "| node | budget | baseline at query | baseline in training | predicted peak "
        "| measured peak | peak / budget |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        ratio = f"{max(row.peak_mb) / row.budget_mb:.2f}" if row.budget_mb and row.peak_mb else "-"
        lines.append(
            f"| {row.label} | {row.budget} | {_mb(row.query_baseline_mb)} "
            f"| {_span(row.train_baseline_mb)} | {_span(row.predicted_mb)} "
            f"| {_span(row.peak_mb)} | {ratio} |"
        )
    return "\n".join(lines)


def plot_memory_budget(rows: list[NodeMemory], path: Path) -> None:
    """Per node: its budget, baseline, predicted and measured peak RSS (every round a dot)."""
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(rows) + 2), 4.5))
    width = 0.26
    first_budget = next((i for i, r in enumerate(rows) if r.budget_mb is not None), -1)
    for i, row in enumerate(rows):
        first = i == 0
        baseline = max(row.train_baseline_mb + [row.query_baseline_mb or 0.0], default=0.0)
        ax.bar(i - width, baseline, width, color="tab:gray", label="baseline" if first else None)
        if row.predicted_mb:
            ax.bar(
                i,
                max(row.predicted_mb),
                width,
                color="tab:blue",
                label="predicted peak" if first else None,
            )
        ax.bar(
            i + width,
            max(row.peak_mb),
            width,
            color="tab:red",
            label="measured peak (max)" if first else None,
        )
        ax.scatter([i + width] * len(row.peak_mb), row.peak_mb, color="black", s=10, zorder=3)
        if row.budget_mb is not None:
            ax.hlines(
                row.budget_mb,
                i - 1.6 * width,
                i + 1.6 * width,
                color="black",
                linewidth=2,
                label="memory-mb budget" if i == first_budget else None,
            )
    ax.set_xticks(range(len(rows)), [r.label for r in rows])
    ax.set_ylabel("process RSS, MB")
    ax.set_ylim(bottom=0)
    ax.set_title("Memory budget against measured peak, per node")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
