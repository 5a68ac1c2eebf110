"""Where a round's time and memory go at 10, 100 and 1,000 virtual clients; the soak run.

Scale mode (default) runs the same job, ``--per-round`` clients training per
round (``fraction-train = per-round / nodes``), once per node count, each in
a fresh subprocess under Flower's simulation engine (the app's own
ServerApp and ClientApp, ``run_simulation``), and prints per setting:

* the wait for nodes and the budget query (seconds);
* the round wall time (``rounds.json``, mean of rounds 2.., round 1 apart);
* the sum of the clients' own training time (their ``train-time-s``);
* the share of the round outside client training:
  ``(wall - sum / actors) / wall``, with ``actors`` Ray actors training in
  parallel (so uneven clients count as outside time too);
* the server process's peak RSS (``VmHWM``: the ServerApp, Flower's
  in-memory SuperLink and the Ray driver share that process) and, after the
  last round, the Ray actors' RSS.

Soak mode (``--soak``) runs one setting for ``--rounds`` rounds (>= 30) and
prints the server's and each actor's RSS after every round, then the ratio
of round ``--rounds`` to round 3; it writes ``soak.csv`` and ``soak.png`` to
``--out``. ``--no-trim`` sets ``RAFFM_MALLOC_TRIM=0`` in the run
(``client_app/memory.py``), to show what the trim is worth.

Presets (``--preset``): ``vit`` (``vit-tiny:`` on Debian's Fashion-MNIST,
60,000 images: enough for 1,000 Dirichlet partitions), ``minilm`` (the
app's default model and data, polarity), ``digits`` (a smaller ViT on
scikit-learn's digits: a smoke check in a minute). ``--set k=v`` overrides
any run-config key.

Usage::

    .venv/bin/python scripts/bench_scale.py --preset vit --nodes 10,100,1000
    .venv/bin/python scripts/bench_scale.py --preset minilm --nodes 10 --per-round 10
    .venv/bin/python scripts/bench_scale.py --soak --preset minilm --rounds 32 --out /tmp/soak
    .venv/bin/python scripts/bench_scale.py --preset digits --nodes 10,100 --rounds 2   # smoke
    .venv/bin/python scripts/bench_scale.py --plot a/soak.csv:trim b/soak.csv:no-trim --out DIR
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

PRESETS: dict[str, dict[str, Any]] = {
    "vit": {
        "model-name": "vit-tiny:",
        "dataset": "debian:fashion-mnist",
        "test-split": "test",
        "eval-max-examples": 1000,
        "local-steps": 20,
        "batch-size": 32,
        "lr": 1e-3,
        "budget-profile": "params=0.5,params=0.7,params=0.85,params=1.0",
    },
    "minilm": {},  # pyproject's [tool.flwr.app.config]: MiniLM on polarity
    "digits": {
        "model-name": "vit-tiny:image_size=8,patch_size=2,hidden_size=32,num_hidden_layers=2,"
        "intermediate_size=64,num_attention_heads=4",
        "dataset": "sklearn:digits",
        "eval-max-examples": 200,
        "local-steps": 5,
        "batch-size": 16,
        "lr": 1e-3,
        "budget-profile": "params=0.5,params=0.7,params=1.0",
    },
}
ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "RAY_DEDUP_LOGS": "0",
}
MB = 2**20


# ----------------------------------------------------------------- one setting (child)
class RoundProbe(logging.Handler):
    """Reads RSS when the ServerApp logs a finished round (``round N/M: ...``)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        import psutil

        self.me = psutil.Process()
        self.rows: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.msg if isinstance(record.msg, str) else ""
        if msg.startswith("round 0/%d:"):
            server_round = 0
        elif msg.startswith("round %d/%d:") and record.args:
            server_round = int(record.args[0])
        else:
            return
        actors = []
        for child in self.me.children(recursive=True):
            try:
                if "ClientAppActor" in " ".join(child.cmdline()):
                    actors.append(child.memory_info().rss / MB)
            except Exception:  # noqa: BLE001 - a worker that just exited
                continue
        row = {
            "round": server_round,
            "t": time.monotonic(),
            "server-mb": self.me.memory_info().rss / MB,
            "actors-mb": sorted(actors),
        }
        self.rows.append(row)
        if os.environ.get("BENCH_SCALE_ECHO"):
            print("RSS " + json.dumps(row), flush=True)


def timed(fn: Any, box: dict[str, float], key: str) -> Any:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.monotonic()
        try:
            return fn(*args, **kwargs)
        finally:
            box[key] = box.get(key, 0.0) + time.monotonic() - started

    return wrapper


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """Run one setting in this process; return its figures."""
    os.environ.update(ENV)
    from flwr.simulation import run_simulation

    import server_app.loop as loop
    from client_app.app import build_client_app
    from server_app.app import build_server_app

    phases: dict[str, float] = {}
    loop.wait_for_nodes = timed(loop.wait_for_nodes, phases, "wait-s")
    loop.query_budgets = timed(loop.query_budgets, phases, "query-s")
    probe = RoundProbe()
    logging.getLogger("flwr").addHandler(probe)
    overrides = job["overrides"]
    started = time.monotonic()
    run_simulation(
        server_app=build_server_app(overrides),
        client_app=build_client_app(overrides),
        num_supernodes=job["nodes"],
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": job["actors"]},
        },
    )
    total = time.monotonic() - started
    out = Path(overrides["results-dir"])
    status = json.loads((out / "status.json").read_text())
    if status.get("status") != "completed":
        raise RuntimeError(f"the run failed: {status}")
    rounds = [r for r in json.loads((out / "rounds.json").read_text()) if r["round"] > 0]
    per_round = []
    for r in rounds:
        accepted = [c for c in r["clients"] if c["status"] == "accepted"]
        per_round.append(
            {
                "round": r["round"],
                "wall-s": r["wall-time-s"],
                "phases-s": r.get("phases-s", {}),
                "clients": len(r["clients"]),
                "accepted": len(accepted),
                "train-sum-s": sum(c.get("train-time-s", 0.0) for c in accepted),
                "handler-sum-s": sum(c.get("handler-time-s", 0.0) for c in accepted),
            }
        )
    return {
        "nodes": job["nodes"],
        "actors": job["actors"],
        "total-s": total,
        **phases,
        "rounds": per_round,
        "rss": probe.rows,
        "server-peak-mb": _vm_hwm_mb(),
        "rounds-json-bytes": (out / "rounds.json").stat().st_size,
        "final-accuracy": json.loads((out / "summary.json").read_text()).get("final-accuracy"),
    }


def _vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return float(line.split()[1]) / 1024
    return float("nan")


# ----------------------------------------------------------------- driver (parent)
def build_job(args: argparse.Namespace, nodes: int, out: Path) -> dict[str, Any]:
    per_round = min(args.per_round, nodes)
    overrides = {
        **PRESETS[args.preset],
        **_parse_sets(args.set),
        "num-server-rounds": args.rounds,
        "min-available-nodes": nodes,
        "fraction-train": per_round / nodes,
        "min-train-nodes": per_round,
        "min-replies": 1,
        "fraction-evaluate": 0.0,
        "query-timeout-s": 1800.0,
        "round-timeout-s": 1800.0,
        "save-models": False,
        "results-dir": str(out / f"nodes-{nodes}"),
    }
    return {"nodes": nodes, "actors": args.actors, "overrides": overrides}


def _parse_sets(items: list[str]) -> dict[str, Any]:
    """``--set key=value`` items, typed as the run config's keys."""
    from raffm_core.task.config import ConfigError, parse_overrides

    try:
        return parse_overrides(items)
    except ConfigError as err:
        raise SystemExit(f"--set: {err}") from None


def run_child(job: dict[str, Any], no_trim: bool, echo: bool) -> dict[str, Any]:
    env = {**os.environ, **ENV, "PYTHONPATH": str(ROOT)}
    if no_trim:
        env["RAFFM_MALLOC_TRIM"] = "0"
    if echo:
        env["BENCH_SCALE_ECHO"] = "1"
    Path(job["overrides"]["results-dir"]).mkdir(parents=True, exist_ok=True)
    log = Path(job["overrides"]["results-dir"]) / "bench.log"
    command = [sys.executable, str(Path(__file__).resolve()), "--one", json.dumps(job)]
    result = None
    with log.open("w") as sink:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=sink, text=True, env=env)
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("RESULT "):
                result = json.loads(line[len("RESULT ") :])
            elif line.startswith("RSS "):
                row = json.loads(line[4:])
                print(_rss_line(row), flush=True)
            else:
                sink.write(line)
        proc.wait()
    if proc.returncode != 0 or result is None:
        raise SystemExit(f"the {job['nodes']}-node run failed (exit {proc.returncode}); see {log}")
    return result


def _rss_line(row: dict[str, Any]) -> str:
    actors = ", ".join(f"{a:.0f}" for a in row["actors-mb"]) or "-"
    return f"  after round {row['round']:>3}: server {row['server-mb']:.0f} MB, actors {actors} MB"


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def cycle_times(rss: list[dict[str, Any]]) -> dict[int, float]:
    """Round ``r`` -> seconds from the end of round ``r - 1`` to the end of round ``r``.

    Unlike ``wall-time-s`` this includes what happens between two rounds (the
    checkpoint, ``rounds.json``, the memory release after a round).
    """
    ends = {row["round"]: row["t"] for row in rss}
    return {r: ends[r] - ends[r - 1] for r in sorted(ends) if r - 1 in ends}


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Per setting: round figures are means over rounds 2.. (round 1 warms up)."""
    rounds = result["rounds"]
    steady = rounds[1:] or rounds
    actors = result["actors"]
    cycles = cycle_times(result["rss"])
    wall = _mean([r["wall-s"] for r in steady])
    measured = [cycles[r["round"]] for r in steady if r["round"] in cycles]
    cycle = _mean(measured) if measured else wall  # no RSS readings: the rounds' own time
    train = _mean([r["train-sum-s"] for r in steady])
    handler = _mean([r["handler-sum-s"] for r in steady])
    phases = (
        {key: _mean([r["phases-s"].get(key, 0.0) for r in steady]) for key in steady[0]["phases-s"]}
        if steady and steady[0]["phases-s"]
        else {}
    )
    outside = max(0.0, cycle - train / actors)
    last = result["rss"][-1] if result["rss"] else {"actors-mb": []}
    # Where the time outside client training goes, in seconds of the round.
    parts = {name.removesuffix("-s"): value for name, value in phases.items()}
    if "train-wait" in parts:
        parts["train-wait"] -= handler / actors  # what is left: Flower, Ray, idle actors
        parts["flower+ray"] = parts.pop("train-wait")
    parts["client rebuild+reply"] = (handler - train) / actors
    parts["between rounds"] = cycle - wall
    return {
        "nodes": result["nodes"],
        "wait-s": result.get("wait-s", float("nan")),
        "query-s": result.get("query-s", float("nan")),
        "round1-s": rounds[0]["wall-s"] if rounds else float("nan"),
        "round-s": cycle,
        "train-sum-s": train,
        "outside-share": outside / cycle if cycle else float("nan"),
        "outside-parts-s": parts,
        "server-peak-mb": result["server-peak-mb"],
        "actors-mb": last["actors-mb"],
        "rounds-json-kb": result["rounds-json-bytes"] / 1024,
    }


def print_scale(rows: list[dict[str, Any]], actors: int) -> None:
    print(
        f"\nper setting (round s: end of one round to the end of the next, mean of rounds 2..; "
        f"{actors} Ray actors):"
    )
    print(
        "| nodes | wait s | query s | round 1 s | round s | client train sum s | "
        "outside share | server peak RSS MB | actors RSS MB | rounds.json KB |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|")
    for r in rows:
        actors_mb = ", ".join(f"{a:.0f}" for a in r["actors-mb"]) or "-"
        print(
            f"| {r['nodes']} | {r['wait-s']:.1f} | {r['query-s']:.1f} | {r['round1-s']:.1f} | "
            f"{r['round-s']:.1f} | {r['train-sum-s']:.1f} | {r['outside-share']:.0%} | "
            f"{r['server-peak-mb']:.0f} | {actors_mb} | {r['rounds-json-kb']:.0f} |"
        )
    print("\ntime outside client training, seconds per round (largest first):")
    for r in rows:
        parts = sorted(r["outside-parts-s"].items(), key=lambda kv: -kv[1])
        print(f"  {r['nodes']} nodes: " + ", ".join(f"{k} {v:.2f}" for k, v in parts))
    if len(rows) > 1:
        small, big = rows[0], rows[-1]
        print(
            f"\n{big['nodes']} vs {small['nodes']} nodes: round time x"
            f"{big['round-s'] / small['round-s']:.2f}, server peak RSS x"
            f"{big['server-peak-mb'] / small['server-peak-mb']:.2f} (targets: <= 1.2)"
        )


def report_soak(result: dict[str, Any], out: Path, first: int = 3) -> None:
    rows = [r for r in result["rss"] if r["round"] > 0]
    by_round = {r["round"]: r for r in rows}
    last = max(by_round)
    if first not in by_round:
        raise SystemExit(f"soak: no reading after round {first}")
    a, b = by_round[first], by_round[last]
    print(f"\nsoak, {result['nodes']} nodes, {last} rounds:")
    print(
        f"  server RSS: round {first} {a['server-mb']:.0f} MB -> round {last} "
        f"{b['server-mb']:.0f} MB (x{b['server-mb'] / a['server-mb']:.3f}; target <= 1.10)"
    )
    for i, (x, y) in enumerate(zip(a["actors-mb"], b["actors-mb"], strict=False)):
        print(
            f"  actor {i} RSS: round {first} {x:.0f} MB -> round {last} {y:.0f} MB (x{y / x:.3f})"
        )
    out.mkdir(parents=True, exist_ok=True)
    with (out / "soak.csv").open("w") as f:
        width = max(len(r["actors-mb"]) for r in rows)
        f.write("round,server_mb," + ",".join(f"actor{i}_mb" for i in range(width)) + "\n")
        for r in rows:
            cells = [f"{r['server-mb']:.1f}"] + [f"{v:.1f}" for v in r["actors-mb"]]
            f.write(f"{r['round']}," + ",".join(cells) + "\n")
    plot_csvs([str(out / "soak.csv")], out / "soak.png")
    print(f"  wrote {out / 'soak.csv'} and {out / 'soak.png'}")


def plot_csvs(items: list[str], path: Path) -> None:
    """``soak.csv`` files (``PATH:LABEL``) on one plot: server and actor RSS per round."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for item, style in zip(items, ("-", "--", ":", "-."), strict=False):
        name, _, label = item.partition(":")
        with open(name) as f:
            rows = list(csv.DictReader(f))
        rounds = [int(r["round"]) for r in rows]
        for key in rows[0]:
            if key == "round":
                continue
            who = "server" if key.startswith("server") else key.replace("_mb", "")
            values = [float(r[key]) if r[key] else None for r in rows]
            ax.plot(rounds, values, style, marker=".", label=f"{who} ({label or name})")
    ax.set_xlabel("round")
    ax.set_ylabel("RSS after the round (MB)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Soak: resident memory per round")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="vit")
    parser.add_argument("--nodes", default="10,100,1000", help="comma list of node counts")
    parser.add_argument("--per-round", type=int, default=10, help="clients training per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--actors", type=int, default=2, help="Ray CPUs = actors (1 CPU each)")
    parser.add_argument("--set", action="append", default=[], help="run-config key=value")
    parser.add_argument("--soak", action="store_true", help="one setting, RSS after every round")
    parser.add_argument("--no-trim", action="store_true", help="RAFFM_MALLOC_TRIM=0 in the run")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench-scale")
    parser.add_argument("--plot", nargs="+", help="soak.csv[:label] files: plot to --out/soak.png")
    parser.add_argument("--fresh", action="store_true", help="rerun settings already on disk")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.plot:
        args.out.mkdir(parents=True, exist_ok=True)
        plot_csvs(args.plot, args.out / "soak.png")
        print(f"wrote {args.out / 'soak.png'}")
        return 0
    if args.one:
        print("RESULT " + json.dumps(run_one(json.loads(args.one))), flush=True)
        return 0
    nodes = [int(n) for n in args.nodes.split(",")]
    print(
        f"bench_scale: preset {args.preset}, {args.per_round} clients per round, "
        f"{args.rounds} rounds, {args.actors} actors, nodes {nodes}"
        f"{', RAFFM_MALLOC_TRIM=0' if args.no_trim else ''}",
        flush=True,
    )
    if args.soak:
        if len(nodes) != 1:
            raise SystemExit("--soak runs one setting: pass one --nodes value")
        result = run_child(build_job(args, nodes[0], args.out), args.no_trim, echo=True)
        report_soak(result, args.out)
        return 0
    rows = []
    for n in nodes:
        saved = args.out / f"nodes-{n}" / "bench.json"
        if saved.exists() and not args.fresh:
            print(f"{n} nodes: reusing {saved} (--fresh reruns)", flush=True)
            result = json.loads(saved.read_text())
        else:
            print(f"{n} nodes ...", flush=True)
            result = run_child(build_job(args, n, args.out), args.no_trim, echo=False)
            saved.write_text(json.dumps(result, indent=1))
        rows.append(summarize(result))
    print_scale(rows, args.actors)
    return 0


if __name__ == "__main__":
    sys.exit(main())
