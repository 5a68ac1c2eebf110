"""Print a run's memory budgets against the peaks its nodes measured, as a Markdown table.

One row per node that trained (from the run's ``rounds.json``): its budget,
the baseline its process reported at the budget query and in its train
replies, the memory model's predicted peak for the sub-models it was sent,
and the peak RSS it measured (ranges over the rounds). The run itself draws
the same figures in ``memory-budget.png``.

Usage: .venv/bin/python scripts/memory_table.py RESULTS_DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from server_app.memory import format_memory_table, memory_rows
from server_app.outputs import ROUNDS
from server_app.records import RoundLog


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="a run's results directory")
    args = parser.parse_args()
    rows = json.loads((args.results / ROUNDS).read_text())
    history = {row["round"]: RoundLog.from_dict(row) for row in rows if "clients" in row}
    print(format_memory_table(memory_rows(history)))


if __name__ == "__main__":
    main()
