"""What a round cost, per phase and per node, from a run's ``rounds.json``.

For every round: its wall time split into the server's phases (configure:
prioritize, extract, serialize; the wait for train replies; aggregate;
central evaluation), then one row per client:

* **start-up**: its process's age when the train handler began
  (``process-age-s``): in deployment, where Flower starts one ClientApp
  process per message, the Python start, Flower's imports and the FAB before
  the app's code ran (``--deployment``); in simulation the Ray actor's age,
  not a cost of the message, so 0 is shown;
* **handler**: the train handler (``handler-time-s``: rebuild the sub-model,
  load the data, train, build the reply), and of it the training loop
  (``train-time-s``);
* **delivery**: from the server's push to the reply's arrival
  (``reply-after-s``) minus start-up and handler: the message reaching the
  node (a SuperNode polls every 3 s), the process launch, the reply's way
  back and the server's poll;
* **idle**: the rest of the round's wait, for the slower nodes.

Usage::

    .venv/bin/python scripts/round_cost.py results/RUN               # simulation
    .venv/bin/python scripts/round_cost.py results/RUN --deployment  # start-up is a cost
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

PHASES = ("configure-s", "train-wait-s", "aggregate-s", "evaluate-wait-s", "central-evaluate-s")


def client_costs(row: dict[str, Any], deployment: bool) -> list[dict[str, Any]]:
    """Per accepted client of one round: start-up, handler, training, delivery, idle.

    A figure the run did not record (runs from before it existed) is ``None``.
    """
    wait = row.get("phases-s", {}).get("train-wait-s")
    out = []
    for client in row["clients"]:
        if client["status"] != "accepted":
            continue
        startup = client.get("process-age-s") if deployment else 0.0
        handler = client.get("handler-time-s")
        arrived = client.get("reply-after-s")
        local = None if None in (startup, handler) else startup + handler
        out.append(
            {
                "partition-id": client.get("partition-id"),
                "budget": client["budget"],
                "startup-s": startup,
                "handler-s": handler,
                "train-s": client.get("train-time-s"),
                "delivery-s": None if None in (local, arrived) else max(0.0, arrived - local),
                "idle-s": None if None in (wait, arrived) else max(0.0, wait - arrived),
            }
        )
    return out


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _mean(costs: list[dict[str, Any]], key: str) -> str:
    values = [c[key] for c in costs if c[key] is not None]
    return _cell(statistics.fmean(values)) if values else "-"


HEADER = "| node | budget | start-up s | handler s | of it training s | delivery s | idle s |"


def report(rounds: list[dict[str, Any]], deployment: bool) -> str:
    """The per-round tables and the means over every client-round, as Markdown."""
    lines = []
    trained = [r for r in rounds if r.get("round", 0) > 0 and r.get("clients")]
    if not trained:
        return "no training round in rounds.json"
    for row in trained:
        phases = row.get("phases-s", {})
        split = ", ".join(f"{k.removesuffix('-s')} {phases[k]:.1f}" for k in PHASES if k in phases)
        lines += [
            f"\nround {row['round']}: {row['wall-time-s']:.1f} s ({split or 'no phases'})",
            HEADER,
            "|---:|---|---:|---:|---:|---:|---:|",
        ]
        for c in client_costs(row, deployment):
            lines.append(
                f"| {'-' if c['partition-id'] is None else c['partition-id']} | {c['budget']} | "
                f"{_cell(c['startup-s'])} | "
                f"{_cell(c['handler-s'])} | {_cell(c['train-s'])} | {_cell(c['delivery-s'])} | "
                f"{_cell(c['idle-s'])} |"
            )
    every = [c for row in trained for c in client_costs(row, deployment)]
    wall = statistics.fmean(r["wall-time-s"] for r in trained)
    lines.append(
        f"\nmean over {len(every)} client-rounds: start-up {_mean(every, 'startup-s')} s, "
        f"handler {_mean(every, 'handler-s')} s (training {_mean(every, 'train-s')} s), "
        f"delivery {_mean(every, 'delivery-s')} s, idle {_mean(every, 'idle-s')} s; "
        f"mean round {wall:.1f} s"
    )
    return "\n".join(lines).lstrip("\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a results directory (holds rounds.json)")
    parser.add_argument(
        "--deployment",
        action="store_true",
        help="count the process's age as start-up (one ClientApp process per message)",
    )
    args = parser.parse_args(argv)
    path = args.run / "rounds.json"
    if not path.is_file():
        raise SystemExit(f"{path}: no such file (pass the run's results directory)")
    print(report(json.loads(path.read_text()), args.deployment))
    return 0


if __name__ == "__main__":
    sys.exit(main())
