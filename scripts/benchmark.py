"""The evidence benchmark: RaFFM against its peers and bounds, as the protocol file says.

Everything about the experiments (federations, rows, the shared recipe, seeds,
the fixed test set) is data: ``benchmarks/evidence/protocol.toml``. This
script only runs it and reports:

* **One fixed test set**, chosen once from the corpus with its own seed and
  scored whole by every run; validation is carved from the training data.
* **Every run goes through the app**: the ServerApp and ClientApp under
  Flower's simulation engine, one fresh subprocess per run. The centralized
  row is the same app with one node holding all training data.
* **Resumable**: a run whose ``summary.json`` exists is reused; per-run
  results stay in ``benchmarks/evidence/runs/<federation>/<row>/seed-<s>/``.
* **The report** (``summary.md``, ``results.csv``, plots): per row the mean
  and sd over seeds, the paired difference to ``raffm`` per seed and its
  mean with a 95% t-interval over the seeds (df = seeds - 1), how many seeds
  each row is ahead in, the per-tier sub-models, and the run-config keys in
  which each row differs from ``raffm`` (read from the runs' own
  ``run-config.json``).

Usage::

    .venv/bin/python scripts/benchmark.py                                # the whole protocol
    .venv/bin/python scripts/benchmark.py --federations cross-silo-10-tight --rows raffm,heterofl
    .venv/bin/python scripts/benchmark.py --quick                        # smoke check, < 5 min
    .venv/bin/python scripts/benchmark.py --report-only
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PROTOCOL = ROOT / "benchmarks" / "evidence" / "protocol.toml"
BACKEND = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}}
KINDS = ("method", "bound", "ablation", "candidate")
"""``candidate``: a variant of a method row, compared on the validation split only."""
DONE = "cost.json"
"""Written last by a run that finished and passed its checks: the run is reused."""


class ProtocolError(Exception):
    """The protocol file is malformed; the message names the entry."""


@dataclass(frozen=True)
class Federation:
    name: str
    nodes: int
    rounds: int
    config: dict[str, Any]
    note: str = ""


@dataclass(frozen=True)
class Row:
    name: str
    kind: str
    label: str
    config: dict[str, Any]
    centralized: bool = False
    save_final_model: bool = False


@dataclass(frozen=True)
class Protocol:
    path: Path
    seeds: list[int]
    test_set: dict[str, Any]
    recipe: dict[str, Any]
    federations: dict[str, Federation]
    rows: dict[str, Row]
    quick: dict[str, Any] = field(default_factory=dict)


def load_protocol(path: Path) -> Protocol:
    """Read and check the protocol file; every run-config key is checked against RunConfig."""
    from raffm_core.task.config import RunConfig, key_of

    data = tomllib.loads(path.read_text())
    known = {key_of(f) for f in RunConfig.__dataclass_fields__}

    def keys(where: str, config: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(config) - known)
        if unknown:
            raise ProtocolError(f"{path.name}: {where} has unknown run-config keys {unknown}")
        return dict(config)

    for section in ("seeds", "test-set", "recipe", "federations", "rows"):
        if section not in data:
            raise ProtocolError(f"{path.name}: no [{section}]")
    federations = {
        name: Federation(
            name,
            int(f["nodes"]),
            int(f["rounds"]),
            keys(f"federation {name}", f["config"]),
            f.get("note", ""),
        )
        for name, f in data["federations"].items()
    }
    rows = {}
    for name, r in data["rows"].items():
        if r.get("kind") not in KINDS:
            raise ProtocolError(f"{path.name}: row {name}: kind must be one of {KINDS}")
        rows[name] = Row(
            name,
            r["kind"],
            r.get("label", ""),
            keys(f"row {name}", r.get("config", {})),
            bool(r.get("centralized", False)),
            bool(r.get("save-final-model", False)),
        )
    if "raffm" not in rows:
        raise ProtocolError(f"{path.name}: paired differences need a row named 'raffm'")
    quick = dict(data.get("quick", {}))
    if quick:
        quick["config"] = keys("[quick]", quick.get("config", {}))
    return Protocol(
        path,
        [int(s) for s in data["seeds"]],
        dict(data["test-set"]),
        keys("[recipe]", data["recipe"]),
        federations,
        rows,
        quick,
    )


# ------------------------------------------------------------------ the test set
def prepare_data(protocol: Protocol) -> tuple[Path, Path]:
    """``train.csv`` and ``test.csv``: a fixed test set, the same for every run and seed.

    Stratified by label, drawn with the test set's own seed; written once
    (the corpus is research-use data: it stays under ``data/``, never committed).
    """
    spec = protocol.test_set
    folder = ROOT / spec["folder"]
    train, test = folder / "train.csv", folder / "test.csv"
    stamp = folder / "test-set.json"
    wanted = {"source": spec["source"], "examples": spec["examples"], "seed": spec["seed"]}
    if train.is_file() and test.is_file() and stamp.is_file():
        if json.loads(stamp.read_text()) == wanted:
            return train, test
    source = ROOT / spec["source"]
    if not source.is_file():
        raise SystemExit(f"{source} is missing: run `make setup` first")
    with open(source, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader)
        rows = list(reader)
    label = header.index("label")
    by_label: dict[str, list[list[str]]] = {}
    for row in rows:
        by_label.setdefault(row[label], []).append(row)
    rng = random.Random(spec["seed"])
    chosen: set[int] = set()
    n = int(spec["examples"])
    ids = {id(r): i for i, r in enumerate(rows)}
    for members in by_label.values():
        take = round(n * len(members) / len(rows))
        chosen |= {ids[id(r)] for r in rng.sample(members, take)}
    folder.mkdir(parents=True, exist_ok=True)
    for path, keep in ((test, True), (train, False)):
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(r for i, r in enumerate(rows) if (i in chosen) == keep)
    stamp.write_text(json.dumps(wanted) + "\n")
    return train, test


# ------------------------------------------------------------------ one run
def federation_of(protocol: Protocol, name: str, quick: bool) -> Federation:
    fed = protocol.federations[name]
    if not quick:
        return fed
    nodes = min(fed.nodes, int(protocol.quick.get("nodes", 4)))
    config = {**fed.config, **protocol.quick.get("config", {})}
    return Federation(name, nodes, int(protocol.quick.get("rounds", 2)), config, fed.note)


def run_config(
    protocol: Protocol, federation: str, row: str, seed: int, quick: bool, extra: dict[str, Any]
) -> tuple[dict[str, Any], int]:
    """The run config of one run (kebab-case) and its number of nodes."""
    fed = federation_of(protocol, federation, quick)
    spec = protocol.rows[row]
    train, test = prepare_data(protocol)
    config = {
        **protocol.recipe,
        **fed.config,
        **spec.config,
        "dataset": str(train),
        "test-split": str(test),
        "seed": seed,
        "num-server-rounds": fed.rounds,
        "score-tiers": True,
        "save-models": spec.save_final_model and not quick,
    }
    if quick:
        config.update(protocol.quick.get("config", {}))
    config.update(extra)
    nodes = fed.nodes
    if spec.centralized:
        # One node with all the training data, as many optimizer steps a round as the
        # federation's clients take together.
        clients = max(config["min-train-nodes"], round(config["fraction-train"] * fed.nodes))
        clients = min(clients, fed.nodes)
        config.update(
            {
                "partitioner": "iid",
                "min-available-nodes": 1,
                "min-train-nodes": 1,
                "fraction-train": 1.0,
                "budget-assignment": "round-robin",
                "local-steps": clients * int(config["local-steps"]),
            }
        )
        nodes = 1
    return config, nodes


def run_dir(out: Path, federation: str, row: str, seed: int) -> Path:
    return out / "runs" / federation / row / f"seed-{seed}"


def run_one(spec_json: str) -> None:
    """The body of a ``--one`` subprocess: one federation through the app."""
    from flwr.simulation import run_simulation

    from client_app.app import build_client_app
    from server_app.app import build_server_app

    spec = json.loads(spec_json)
    run_simulation(
        server_app=build_server_app(spec["config"]),
        client_app=build_client_app(spec["config"]),
        num_supernodes=spec["nodes"],
        backend_config=BACKEND,
    )


def launch(folder: Path, config: dict[str, Any], nodes: int, tag: str) -> float:
    """Run one configuration in a fresh subprocess (log in ``run.log``); returns its wall time."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {**config, "results-dir": str(folder)}
    started = time.monotonic()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_DEDUP_LOGS": "0"}
    with open(folder / "run.log", "w") as logf:
        proc = subprocess.Popen(
            [sys.executable, __file__, "--one", json.dumps({"config": config, "nodes": nodes})],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=ROOT,
            env=env,
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            logf.write(line)
            if ("round " in line and "clients (" in line) or "tier " in line:
                print(f"    [{tag}] {line.strip().split(':', 1)[-1].strip()}", flush=True)
        code = proc.wait()
    (folder / DONE).unlink(missing_ok=True)
    if code != 0 or not (folder / "summary.json").is_file():
        raise RuntimeError(f"{tag} failed (exit {code}); see {folder}/run.log")
    wall = time.monotonic() - started
    rounds = read_json(folder / "rounds.json")
    rejected = [c for r in rounds for c in r.get("clients", []) if c["status"] == "rejected"]
    if rejected:  # a reply lost to the machine is not a result of the method
        aside = folder.with_name(f"{folder.name}.set-aside-{time.strftime('%Y%m%d-%H%M%S')}")
        folder.rename(aside)
        raise RuntimeError(f"{tag}: {len(rejected)} replies rejected; set aside in {aside}")
    compact(folder)
    (folder / DONE).write_text(json.dumps({"wall-time-s": wall}) + "\n")  # last: run complete
    return wall


def compact(folder: Path) -> None:
    """Keep what is committed small: ``rounds.json`` gzipped, plots and logs stay local."""
    rounds = folder / "rounds.json"
    if rounds.is_file():
        with open(rounds, "rb") as src, gzip.open(folder / "rounds.json.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        rounds.unlink()


def read_json(path: Path) -> Any:
    if not path.is_file() and path.with_suffix(path.suffix + ".gz").is_file():
        with gzip.open(path.with_suffix(path.suffix + ".gz"), "rt") as f:
            return json.load(f)
    return json.loads(path.read_text())


# ------------------------------------------------------------------ report
def collect(out: Path, feds: list[str], rows: list[str], seeds: list[int]) -> list[dict]:
    records = []
    for fed in feds:
        for row in rows:
            for seed in seeds:
                folder = run_dir(out, fed, row, seed)
                if not (folder / DONE).is_file():
                    continue
                summary = read_json(folder / "summary.json")
                rounds = read_json(folder / "rounds.json")
                tiers = (
                    read_json(folder / "tiers.json") if (folder / "tiers.json").is_file() else []
                )
                cost = read_json(folder / DONE)
                clients = [c for r in rounds for c in r.get("clients", [])]
                records.append(
                    {
                        "federation": fed,
                        "row": row,
                        "seed": seed,
                        "final-accuracy": summary.get("final-accuracy"),
                        "final-val-accuracy": _last(rounds, "val-accuracy"),
                        "val-best-round": summary.get("best-round"),
                        "test-accuracy-at-val-best": summary.get("best-accuracy"),
                        "params-fraction": summary.get("mean-client-params-fraction"),
                        "body-fraction": _mean([c.get("body-fraction") for c in clients]),
                        "left-out": sum(c.get("fused") == 0 for c in clients),
                        "total-bytes": sum(c["bytes-down"] + c["bytes-up"] for c in clients),
                        "wall-time-s": cost.get("wall-time-s"),
                        "tiers": tiers,
                        "curve": {r["round"]: r["accuracy"] for r in rounds if "accuracy" in r},
                        "config": read_json(folder / "run-config.json"),
                    }
                )
    return records


def _last(rounds: list[dict], key: str) -> float | None:
    """The last round's value of ``key`` among the evaluated rounds."""
    values = [r[key] for r in rounds if key in r]
    return values[-1] if values else None


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def mean_sd(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return mean, math.sqrt(var)


def t_interval(diffs: list[float]) -> tuple[float, float, float] | None:
    """Mean paired difference and its 95% t-interval over seeds (None for fewer than 2)."""
    if len(diffs) < 2:
        return None
    from scipy.stats import t

    mean, sd = mean_sd(diffs)
    half = t.ppf(0.975, len(diffs) - 1) * sd / math.sqrt(len(diffs))
    return mean, mean - half, mean + half


def config_diff(records: list[dict], fed: str, row: str) -> str:
    """Run-config keys in which ``row``'s runs differ from ``raffm``'s (same seed)."""
    ref = {
        r["seed"]: r["config"] for r in records if r["federation"] == fed and r["row"] == "raffm"
    }
    for r in records:
        if r["federation"] == fed and r["row"] == row and r["seed"] in ref:
            base = ref[r["seed"]]
            skip = {"results-dir"}
            diff = {k: v for k, v in r["config"].items() if k not in skip and base.get(k) != v}
            return ", ".join(f"`{k}={json.dumps(v)}`" for k, v in sorted(diff.items())) or "none"
    return "-"


def summary_table(records: list[dict], fed: str, rows: list[str], protocol: Protocol) -> list[str]:
    by = {(r["row"], r["seed"]): r for r in records if r["federation"] == fed}
    seeds = sorted({s for _, s in by})
    lines = [
        f"### {fed}",
        "",
        protocol.federations[fed].note + ".",
        "",
        "| row | kind | seeds | final accuracy, mean ± sd | minus raffm, mean [95% t-interval] "
        "| per seed | ahead of raffm | body held | params held | tier accuracy (smallest → full) |",
        "| --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | --- |",
    ]
    for row in rows:
        runs = [by[(row, s)] for s in seeds if (row, s) in by]
        if not runs:
            continue
        final = mean_sd([r["final-accuracy"] for r in runs])
        diffs = [
            by[(row, s)]["final-accuracy"] - by[("raffm", s)]["final-accuracy"]
            for s in seeds
            if (row, s) in by and ("raffm", s) in by
        ]
        interval = t_interval(diffs) if row != "raffm" else None
        shown = "-"
        if interval is not None:
            mean, lo, hi = interval
            inside = " (inside the noise)" if lo <= 0 <= hi else ""
            shown = f"{mean:+.4f} [{lo:+.4f}, {hi:+.4f}]{inside}"
        per_seed = ", ".join(f"{d:+.3f}" for d in diffs) if row != "raffm" else "-"
        ahead = f"{sum(d > 0 for d in diffs)} of {len(diffs)}" if row != "raffm" else "-"
        body = _mean([r["body-fraction"] for r in runs])
        params = _mean([r["params-fraction"] for r in runs])
        tiers = _tier_means(runs)
        lines.append(
            f"| {row} | {protocol.rows[row].kind} | {len(runs)} | {final[0]:.4f} ± {final[1]:.4f} "
            f"| {shown} | {per_seed} | {ahead} | {_fmt(body)} | {_fmt(params)} | {tiers} |"
        )
    lines += ["", "Rows differ from `raffm` in (their `run-config.json`):", ""]
    for row in rows:
        if row != "raffm" and any(r["row"] == row for r in by.values()):
            lines.append(
                f"* `{row}` ({protocol.rows[row].label}): {config_diff(records, fed, row)}"
            )
    return lines + [""]


def validation_table(records: list[dict], fed: str, rows: list[str]) -> list[str]:
    """The last round's validation accuracy per row and seed: what variants are chosen on."""
    mine = [r for r in records if r["federation"] == fed and r["final-val-accuracy"] is not None]
    if not mine:
        return []
    lines = [
        f"Validation accuracy of the last round ({fed}; the split carved from the training "
        "data, what variants are chosen on):",
        "",
        "| row | seeds | mean ± sd | per seed |",
        "| --- | ---: | ---: | --- |",
    ]
    for row in rows:
        runs = sorted((r for r in mine if r["row"] == row), key=lambda r: r["seed"])
        if runs:
            mean, sd = mean_sd([r["final-val-accuracy"] for r in runs])
            per_seed = ", ".join(f"{r['seed']}: {r['final-val-accuracy']:.4f}" for r in runs)
            lines.append(f"| {row} | {len(runs)} | {mean:.4f} ± {sd:.4f} | {per_seed} |")
    return lines + [""]


def _tier_means(runs: list[dict]) -> str:
    by_budget: dict[str, list[float]] = {}
    fraction: dict[str, list[float]] = {}
    for run in runs:
        for tier in run["tiers"]:
            by_budget.setdefault(tier["budget"], []).append(tier["accuracy"])
            fraction.setdefault(tier["budget"], []).append(tier["body-fraction"])
    if not by_budget:
        return "-"
    order = sorted(by_budget, key=lambda b: sum(fraction[b]) / len(fraction[b]))
    return " / ".join(
        f"{sum(by_budget[b]) / len(by_budget[b]):.3f}@{sum(fraction[b]) / len(fraction[b]):.2f}"
        for b in order
    )


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def plot(out: Path, records: list[dict], feds: list[str], rows: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for fed in feds:
        mine = [r for r in records if r["federation"] == fed]
        if not mine:
            continue
        fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
        for row in rows:
            curves = [r["curve"] for r in mine if r["row"] == row]
            if curves:
                xs = sorted(set.intersection(*(set(c) for c in curves)))
                values = [[c[x] for c in curves] for x in xs]
                ax.plot(
                    xs,
                    [sum(v) / len(v) for v in values],
                    marker="o",
                    ms=3,
                    label=f"{row} (n={len(curves)})",
                )
                ax.fill_between(xs, [min(v) for v in values], [max(v) for v in values], alpha=0.12)
            tiers = [t for r in mine if r["row"] == row for t in r["tiers"]]
            if tiers:
                bx.scatter(
                    [t["body-fraction"] for t in tiers],
                    [t["accuracy"] for t in tiers],
                    label=row,
                    alpha=0.7,
                    s=18,
                )
        ax.set(xlabel="round", ylabel="test accuracy (mean; band min..max)", title=fed)
        bx.set(
            xlabel="share of the body (heads + FFN) kept",
            ylabel="test accuracy",
            title=f"{fed}: tier sub-models of the final model",
        )
        for a in (ax, bx):
            a.grid(alpha=0.3)
            a.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / f"{fed}.png", dpi=110)
        plt.close(fig)


def report(out: Path, protocol: Protocol, feds: list[str], rows: list[str], argv: list[str]):
    records = collect(out, feds, rows, protocol.seeds)
    columns = [
        "federation",
        "row",
        "seed",
        "final-accuracy",
        "final-val-accuracy",
        "val-best-round",
        "test-accuracy-at-val-best",
        "params-fraction",
        "body-fraction",
        "left-out",
        "total-bytes",
        "wall-time-s",
    ]
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for r in records:
            writer.writerow({k: f"{v:.4f}" if isinstance(v, float) else v for k, v in r.items()})
    lines = [
        "# Evidence benchmark results",
        "",
        f"Command: `.venv/bin/python scripts/benchmark.py {' '.join(argv)}`".replace("  ", " "),
        f"Protocol: `{protocol.path.relative_to(ROOT)}`; test set: "
        f"{protocol.test_set['examples']} examples, fixed (seed {protocol.test_set['seed']}), "
        "scored whole. Final accuracy is the last round's global model on it; paired "
        "differences are the row minus `raffm` for the same seed, with a 95% t-interval over "
        "the seeds (df = seeds - 1). Body held: the mean share of the heads' and FFN neurons' "
        "parameters of the sub-models sent. Tier accuracy: each budget tier's sub-model cut "
        "from the final model (`tiers.json`), accuracy@body share.",
        "",
    ]
    for fed in feds:
        lines += summary_table(records, fed, rows, protocol)
        lines += validation_table(records, fed, rows)
    costs = [r["wall-time-s"] for r in records if r.get("wall-time-s")]
    if costs:
        lines.append(
            f"Cost: {len(costs)} runs, {sum(costs) / 60:.1f} min of wall time "
            f"({min(costs):.0f}-{max(costs):.0f} s a run)."
        )
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    plot(out, records, feds, rows)
    return records


# ------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--protocol", type=Path, default=PROTOCOL)
    parser.add_argument("--out", type=Path, help="default: the protocol's folder")
    parser.add_argument("--federations", help="comma list; default all")
    parser.add_argument("--rows", help="comma list; default all")
    parser.add_argument("--seeds", help="comma list; default the protocol's")
    parser.add_argument("--quick", action="store_true", help="a smoke check of every code path")
    parser.add_argument("--set", action="append", default=[], help="run-config key=value, all rows")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    if args.one:
        run_one(args.one)
        return 0
    protocol = load_protocol(args.protocol)
    quick = protocol.quick if args.quick else {}
    feds = (args.federations or quick.get("federation") or ",".join(protocol.federations)).split(
        ","
    )
    rows = (args.rows or ",".join(quick.get("rows", protocol.rows))).split(",")
    seeds = (
        [int(s) for s in args.seeds.split(",")]
        if args.seeds
        else quick.get("seeds", protocol.seeds)
    )
    for names, known in ((feds, protocol.federations), (rows, protocol.rows)):
        unknown = [n for n in names if n not in known]
        if unknown:
            raise SystemExit(f"unknown {unknown}; the protocol has {list(known)}")
    out = args.out or (ROOT / "results" / "benchmark-quick" if args.quick else args.protocol.parent)
    out.mkdir(parents=True, exist_ok=True)
    from raffm_core.task.config import parse_overrides

    extra = parse_overrides(args.set)  # TOML-typed: lr=3e-4 strategy=heterofl
    protocol = Protocol(
        protocol.path,
        seeds,
        protocol.test_set,
        protocol.recipe,
        protocol.federations,
        protocol.rows,
        protocol.quick,
    )
    failed = []
    if not args.report_only:
        plan = [(f, r, s) for f in feds for s in seeds for r in rows]
        todo = [p for p in plan if not (run_dir(out, *p) / DONE).is_file()]
        print(f"[benchmark] {len(plan)} runs, {len(plan) - len(todo)} reused, {len(todo)} to go")
        spent = []
        for i, (fed, row, seed) in enumerate(todo, 1):
            tag = f"{fed} {row} seed {seed}"
            print(f"[benchmark] {i}/{len(todo)}: {tag}", flush=True)
            config, nodes = run_config(protocol, fed, row, seed, args.quick, extra)
            try:
                spent.append(launch(run_dir(out, fed, row, seed), config, nodes, tag))
            except RuntimeError as err:  # one lost run does not stop the others
                print(f"[benchmark] FAILED: {err}", flush=True)
                failed.append(tag)
                continue
            summary = read_json(run_dir(out, fed, row, seed) / "summary.json")
            eta = (len(todo) - i) * sum(spent) / len(spent) / 60
            print(
                f"[benchmark] {tag}: final accuracy {summary['final-accuracy']:.4f}, "
                f"{spent[-1]:.0f} s; about {eta:.0f} min to go",
                flush=True,
            )
    records = report(out, protocol, feds, rows, argv)
    print((out / "summary.md").read_text())
    print(f"[benchmark] {len(records)} runs in {out / 'results.csv'}")
    if failed:
        print(f"[benchmark] {len(failed)} runs failed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
