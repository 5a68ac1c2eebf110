"""RaFFM side by side with full-model FedAvg, HeteroFL and FedRolex, on identical runs.

Every method runs through the real app (``scripts/run_local.sh``, i.e. ``flwr
run .`` on a private local SuperLink, 10 simulated nodes by default) with the
same seed, nodes, Dirichlet partitions, budgets, rounds and hyper-parameters;
only ``strategy`` (and ``fedavg-train-all``) differ between the rows:

* ``raffm``: prioritized, budget-fitted prefix sub-models;
* ``fedavg-train-all``: every node trains the full model, budgets ignored
  (the paper's "FL" baseline, an upper bound);
* ``fedavg``: the full model, and the nodes it does not fit are excluded;
* ``heterofl``: static prefix widths, no prioritization;
* ``fedrolex``: rolling windows, no prioritization.

Outputs in ``--out``: ``runs/<row>/`` (each run's own results),
``comparison.csv``, ``comparison.md``, ``accuracy-per-round.png``,
``accuracy-vs-bytes.png``, and the zero-shot ablation on RaFFM's final model
(``ablation/``, ``scripts/ablation_zero_shot.py`` run in its own process). Progress (each run's
start and end, and every round) is printed as it goes; a run whose
``summary.json`` already exists is reused, so an interrupted comparison resumes.

Usage::

    .venv/bin/python scripts/compare.py              # default, ~25-40 min on 2 cores
    .venv/bin/python scripts/compare.py --quick      # smoke check, < 5 min
    .venv/bin/python scripts/compare.py --dataset /abs/data.csv \\
        --set model-name='"bert-base-uncased"' --set text-column='"sentence"'
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

from raffm_core.task.config import ConfigError, RunConfig, parse_overrides  # noqa: E402

ROWS: dict[str, dict[str, Any]] = {
    "raffm": {"strategy": "raffm"},
    "fedavg-train-all": {"strategy": "fedavg", "fedavg-train-all": True},
    "fedavg": {"strategy": "fedavg"},
    "heterofl": {"strategy": "heterofl"},
    "fedrolex": {"strategy": "fedrolex"},
}
"""Each row of the comparison and the run-config keys that make it differ."""

COMMON = {
    "budget-profile": "params=0.6,params=0.7,params=0.8",
    "partitioner": "dirichlet",
}
"""Settings shared by every row on top of the app defaults (pyproject.toml)."""

QUICK = {
    "num-server-rounds": 2,
    "local-steps": 2,
    "eval-max-examples": 100,
}
"""What ``--quick`` changes, for every row alike."""

SET_BY_OPTIONS = ("strategy", "fedavg-train-all", "dataset", "results-dir", "min-available-nodes")

PROGRESS = re.compile(
    r"round \d+/\d+:|configure_train|final accuracy|skipped in round|ERROR|Traceback|\[run_local\]"
)
ANSI = re.compile(r"\x1b\[[0-9;]*m")
COLUMNS = (
    "strategy",
    "final accuracy",
    "best accuracy",
    "mean client params fraction",
    "mean MB per client per round",
    "bytes vs full model",
    "total MB to target",
    "mean client train time per round (s)",
    "mean client peak memory (MB)",
    "clients excluded",
    "wall time (s)",
)


@dataclass(frozen=True)
class Row:
    """One strategy's headline figures, read back from its run's outputs."""

    name: str
    final: float | None
    best: float | None
    params_fraction: float | None
    bytes_per_client_round: float | None
    bytes_ratio: float | None
    bytes_to_target: float | None  # None: target not reached
    train_time_s: float | None
    peak_memory_mb: float | None
    excluded: int
    wall_time_s: float
    curve: list[tuple[int, float, float]]  # (round, accuracy, cumulative bytes)


def read_row(name: str, run_dir: Path, target: float) -> Row:
    """The figures of one finished run (``summary.json`` and ``rounds.json``)."""
    summary = json.loads((run_dir / "summary.json").read_text())
    rounds = json.loads((run_dir / "rounds.json").read_text())
    metric = summary["primary-metric"]
    accepted = [c for r in rounds for c in r.get("clients", []) if c.get("status") == "accepted"]
    curve, total, reached = [], 0.0, None
    for r in rounds:
        total += sum(c["bytes-down"] + c["bytes-up"] for c in r.get("clients", []))
        if r.get(metric) is not None:
            curve.append((r["round"], r[metric], total))
            if reached is None and r[metric] >= target:
                reached = total
    return Row(
        name,
        summary["final-accuracy"],
        summary["best-accuracy"],
        summary["mean-client-params-fraction"],
        summary["mean-bytes-per-client-round"],
        summary["communication-ratio"],
        reached,
        _mean([c["train-time-s"] for c in accepted if "train-time-s" in c]),
        _mean([c["peak-memory-mb"] for c in accepted if "peak-memory-mb" in c]),
        summary.get("clients-excluded", 0),
        summary["wall-time-s"],
        curve,
    )


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _fmt(value: float | None, digits: int, missing: str = "n/a") -> str:
    return missing if value is None else f"{value:.{digits}f}"


def table_cells(row: Row) -> list[str]:
    """The row as the strings of :data:`COLUMNS`."""
    mb = 2**20
    return [
        row.name,
        _fmt(row.final, 4),
        _fmt(row.best, 4),
        _fmt(row.params_fraction, 3),
        _fmt(row.bytes_per_client_round and row.bytes_per_client_round / mb, 1),
        _fmt(row.bytes_ratio, 3),
        _fmt(row.bytes_to_target and row.bytes_to_target / mb, 0, "not reached"),
        _fmt(row.train_time_s, 2),
        _fmt(row.peak_memory_mb, 0),
        str(row.excluded),
        f"{row.wall_time_s:.0f}",
    ]


def toml_value(value: Any) -> str:
    """A Python value as a TOML literal for ``--run-config``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


def run_one(name: str, overrides: dict[str, Any], run_dir: Path, nodes: int, dataset: str) -> bool:
    """One row through ``scripts/run_local.sh``, its progress lines echoed; True on success."""
    options = {**overrides, "dataset": dataset}
    args = [f"{key}={toml_value(value)}" for key, value in options.items()]
    env = {**os.environ, "RESULTS_DIR": str(run_dir), "NUM_SUPERNODES": str(nodes)}
    proc = subprocess.Popen(
        ["bash", str(ROOT / "scripts" / "run_local.sh"), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    )
    for line in proc.stdout or ():
        line = ANSI.sub("", line.rstrip())
        if PROGRESS.search(line):
            print(f"[{name}] {line.split(':', 1)[-1].strip() if 'INFO' in line else line}")
    return proc.wait() == 0


def run_ablation(model: Path, budget: str, samples: int, examples: int, out: Path) -> bool:
    """``scripts/ablation_zero_shot.py`` on RaFFM's final model, progress echoed; True on success.

    Its own process, as every run of this comparison: it writes ``ablation.json``,
    ``ablation.md`` and ``ablation.png`` to ``out``, its log to ``out``'s sibling
    ``ablation.log``.
    """
    command = [
        sys.executable,
        str(ROOT / "scripts" / "ablation_zero_shot.py"),
        str(model),
        "--budget",
        budget,
        "--samples",
        str(samples),
        "--eval-max-examples",
        str(examples),
        "--out",
        str(out),
    ]
    with (out.parent / "ablation.log").open("w") as log:
        proc = subprocess.Popen(
            command, cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True, errors="replace"
        )
        for line in proc.stdout or ():
            log.write(line)
            if line.startswith(("sub-model ", "full model", "taylor")):
                print(f"[ablation] {line.rstrip()}", flush=True)
    return proc.wait() == 0


def plot_curves(rows: list[Row], out: Path, target: float) -> None:
    """Accuracy per round, and accuracy against cumulative bytes, all rows in one figure each."""
    for path, x_of, xlabel in (
        (out / "accuracy-per-round.png", lambda p: p[0], "round"),
        (out / "accuracy-vs-bytes.png", lambda p: p[2] / 2**30, "total GB moved (down + up)"),
    ):
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for row in rows:
            ax.plot(
                [x_of(p) for p in row.curve], [p[1] for p in row.curve], marker="o", label=row.name
            )
        ax.axhline(target, color="grey", linestyle=":", label=f"target {target:g}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("held-out accuracy (global model)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def write_tables(rows: list[Row], out: Path, header: str) -> None:
    """``comparison.csv`` and ``comparison.md``."""
    with (out / "comparison.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        writer.writerows(table_cells(row) for row in rows)
    lines = [header, "", "| " + " | ".join(COLUMNS) + " |"]
    lines.append("| --- " + "| ---: " * (len(COLUMNS) - 1) + "|")
    lines += ["| " + " | ".join(table_cells(row)) + " |" for row in rows]
    (out / "comparison.md").write_text("\n".join(lines) + "\n")


def parse_sets(items: list[str]) -> dict[str, Any]:
    """``--set key=value`` items (:func:`raffm_core.task.config.parse_overrides`).

    Some keys have their own option or are set per row: they are refused here.
    """
    try:
        out = parse_overrides(items)
    except ConfigError as err:
        raise SystemExit(f"--set: {err}") from None
    for key in out:
        if key in SET_BY_OPTIONS:
            raise SystemExit(f"--set {key}: set by this script or its own option, not by --set")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strategies", default=",".join(ROWS), help="rows, comma-separated")
    parser.add_argument(
        "--quick", action="store_true", help="3 nodes, 2 rounds of 2 local steps: a smoke check"
    )
    parser.add_argument("--nodes", type=int, help="simulated nodes (default 10, --quick 3)")
    parser.add_argument("--dataset", default=str(ROOT / "data" / "polarity" / "polarity.csv"))
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a run-config override applied to every row (TOML value)",
    )
    parser.add_argument("--target-accuracy", type=float, default=0.75)
    parser.add_argument("--out", type=Path, help="default results/compare-<timestamp>")
    parser.add_argument("--ablation-samples", type=int, help="0 skips (default 50, --quick 4)")
    parser.add_argument("--ablation-budget", default="params=0.7")
    parser.add_argument("--ablation-examples", type=int, help="default 400, --quick 100")
    args = parser.parse_args(argv)
    if isinstance(sys.stdout, io.TextIOWrapper):  # progress shows up in a log file as it goes
        sys.stdout.reconfigure(line_buffering=True)

    names = [n.strip() for n in args.strategies.split(",") if n.strip()]
    unknown = [n for n in names if n not in ROWS]
    if unknown or not names:
        parser.error(f"unknown rows {unknown}; expected some of {', '.join(ROWS)}")
    nodes = args.nodes or (3 if args.quick else 10)
    shared = {**COMMON, **(QUICK if args.quick else {}), **parse_sets(args.set)}
    for name in names:  # fail before any run starts on a bad key or value
        RunConfig.from_mapping({**shared, **ROWS[name], "dataset": args.dataset})
    out = (args.out or ROOT / "results" / time.strftime("compare-%Y%m%d-%H%M%S")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "settings.json").write_text(
        json.dumps(
            {
                "nodes": nodes,
                "shared": shared,
                "rows": {n: ROWS[n] for n in names},
                "dataset": args.dataset,
                "target-accuracy": args.target_accuracy,
            },
            indent=2,
        )
    )
    print(f"comparison of {', '.join(names)} on {nodes} nodes, shared overrides {shared}")
    print(f"outputs: {out}")

    rows, failed, started = [], [], time.monotonic()
    for i, name in enumerate(names, start=1):
        run_dir = out / "runs" / name
        if (run_dir / "summary.json").is_file():
            print(f"=== {i}/{len(names)} {name}: reusing {run_dir}")
        else:
            print(f"=== {i}/{len(names)} {name}: starting ({time.monotonic() - started:.0f} s in)")
            t0 = time.monotonic()
            if not run_one(name, {**shared, **ROWS[name]}, run_dir, nodes, args.dataset):
                print(f"=== {name}: FAILED after {time.monotonic() - t0:.0f} s; see {run_dir}")
                failed.append(name)
                continue
            print(f"=== {name}: done in {time.monotonic() - t0:.0f} s")
        rows.append(read_row(name, run_dir, args.target_accuracy))

    if rows:
        header = (
            f"{len(rows)} strategies, {nodes} nodes, identical seed, Dirichlet partitions, "
            f"budgets and hyper-parameters (shared overrides: `{json.dumps(shared)}`); "
            f"target accuracy {args.target_accuracy:g}. Bytes are down + up per client and "
            "round; times and memory are the clients' own figures, means over client-rounds."
        )
        write_tables(rows, out, header)
        plot_curves(rows, out, args.target_accuracy)
        print((out / "comparison.md").read_text())

    samples = (
        args.ablation_samples if args.ablation_samples is not None else (4 if args.quick else 50)
    )
    raffm_model = out / "runs" / "raffm" / "final-model"
    if (out / "ablation" / "ablation.json").is_file():
        print(f"=== zero-shot ablation: reusing {out / 'ablation'}")
    elif samples > 0 and "raffm" in names and raffm_model.is_dir():
        examples = args.ablation_examples or (100 if args.quick else 400)
        print(f"=== zero-shot ablation: {samples} sub-models at {args.ablation_budget}")
        if not run_ablation(raffm_model, args.ablation_budget, samples, examples, out / "ablation"):
            print(f"=== zero-shot ablation: FAILED; see {out / 'ablation.log'}")
            failed.append("ablation")
        else:
            print((out / "ablation" / "ablation.md").read_text())

    print(f"comparison finished in {time.monotonic() - started:.0f} s: {out}")
    if failed:
        print(f"FAILED rows: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
