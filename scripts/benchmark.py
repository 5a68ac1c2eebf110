"""The multi-seed benchmark: RaFFM against its peers in two federations, resumable run by run.

Federations (every row of one federation shares them):

* ``cross-device-100``: the paper's setting; 100 simulated clients, 10 sampled
  per round (seeded), Dirichlet(0.5) label partitions, each client's budget
  drawn (seeded) from ``params=0.6,0.7,0.8`` (mean parameter fraction <= 0.7);
* ``cross-silo-10``: 10 clients, all training every round, budgets
  round-robin over the same profile.

Rows: ``raffm`` (the app's defaults), ``raffm-paper`` (the paper's choices:
L1 weight salience re-ranked every round, sub-models drawn at random within
the budget), ``heterofl``, ``fedrolex``, ``fedavg`` (the full model; clients
it does not fit are excluded), ``fedavg-train-all`` (every client trains the
full model, budgets ignored: the FL upper bound) and ``centralized`` (the same
model and optimizer on the pooled training split, as many examples as
``fedavg-train-all`` sees: the ceiling).

Every row gets the same hyper-parameters (:data:`COMMON`), chosen once on a
validation split carved from the training data (``validation-fraction``);
the test split only reports. Each run's test accuracy is reported for the
final model and for the round chosen on validation.

Each run goes through the app's own ServerApp and ClientApp under Flower's
simulation engine (``flwr.simulation.run_simulation``, no SuperLink), in a
fresh subprocess, and leaves ``runs/<federation>/<row>/seed-<s>/`` with the
app's ``summary.json`` and ``rounds.json``. A run whose ``summary.json``
exists is reused, so an interrupted benchmark resumes where it stopped.
Then ``results.csv`` (one row per federation, strategy and seed),
``summary.md`` (mean, standard deviation, per-seed paired differences
against ``raffm``, gap to ``centralized``), ``accuracy-per-round-*.png``
(mean over seeds, band = min..max) and ``accuracy-vs-bytes.png``.

Usage::

    .venv/bin/python scripts/benchmark.py                  # the full protocol
    .venv/bin/python scripts/benchmark.py --quick          # smoke check, < 5 min, in results/
    .venv/bin/python scripts/benchmark.py --federations cross-silo-10 --rows raffm,heterofl
    .venv/bin/python scripts/benchmark.py --report-only    # tables and plots from what exists
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_OUT = ROOT / "docs" / "benchmarks"
SEEDS = (1, 2, 3)
PROFILE = "params=0.6,params=0.7,params=0.8"
PUBLISHED = {"vocab-trim": False, "nested-dropout": 0.0}
"""What the published methods do, whatever the app's defaults: the whole vocabulary,
no nested dropout."""


@dataclass(frozen=True)
class Federation:
    """How many clients, how many train per round, and for how many rounds."""

    nodes: int
    rounds: int
    overrides: dict[str, Any]


FEDERATIONS: dict[str, Federation] = {
    "cross-device-100": Federation(
        nodes=100,
        rounds=30,
        overrides={
            "fraction-train": 0.1,
            "min-train-nodes": 10,
            "min-available-nodes": 100,
            "budget-assignment": "random",
            "eval-every": 3,
        },
    ),
    "cross-silo-10": Federation(
        nodes=10,
        rounds=12,
        overrides={
            "local-steps": 12,
            "fraction-train": 1.0,
            "min-available-nodes": 10,
            "budget-assignment": "round-robin",
            "eval-every": 2,
        },
    ),
}

COMMON: dict[str, Any] = {
    "budget-profile": PROFILE,
    "partitioner": "dirichlet",
    "dirichlet-alpha": 0.5,
    "validation-fraction": 0.1,
    "eval-max-examples": 400,
    "local-steps": 4,
    "lr": 1e-4,
    "masked-loss": True,
    "width-scaler": False,
    "save-models": False,
    "min-replies": 1,
}
"""Settings every row shares on top of the app defaults (``pyproject.toml``)."""

ROWS: dict[str, dict[str, Any] | None] = {
    "raffm": {"strategy": "raffm", "vocab-trim": True, "nested-dropout": 0.0, "save-models": True},
    "raffm-paper": {
        "strategy": "raffm",
        "salience-norm": "l1",
        "selection-mode": "sample",
        **PUBLISHED,
    },
    "heterofl": {"strategy": "heterofl", **PUBLISHED},
    "fedrolex": {"strategy": "fedrolex", **PUBLISHED},
    "fedavg": {"strategy": "fedavg", **PUBLISHED},
    "fedavg-train-all": {"strategy": "fedavg", "fedavg-train-all": True, **PUBLISHED},
    "centralized": None,
}
"""Each row and the run-config keys that make it differ; ``None``: pooled training.

``vocab-trim`` is part of the method, not of the shared recipe: ``raffm``
(the app's default) trims each sub-model's vocabulary to its node's tokens;
``heterofl``, ``fedrolex`` and ``raffm-paper`` are the published methods,
which keep the whole vocabulary. ``raffm-whole-vocab`` is the app's previous
default (no trimming); ``raffm-nd25`` and ``raffm-nd50`` add nested dropout
(a share of local steps on a random salient prefix; 0.25 was the candidate
default and lost to plain ``raffm`` on validation); the ``*-vocab``
variants give the peers the same trimming.
"""

_WHOLE = PUBLISHED
_VOCAB = {"vocab-trim": True, "nested-dropout": 0.0}
VARIANTS: dict[str, dict[str, Any]] = {
    "raffm-whole-vocab": {"strategy": "raffm", **_WHOLE, "save-models": True},
    "raffm-nd25": {"strategy": "raffm", **_VOCAB, "nested-dropout": 0.25, "save-models": True},
    "raffm-nd50": {"strategy": "raffm", **_VOCAB, "nested-dropout": 0.5, "save-models": True},
    "heterofl-vocab": {"strategy": "heterofl", **_VOCAB},
    "fedrolex-vocab": {"strategy": "fedrolex", **_VOCAB},
    "raffm-tail": {"strategy": "raffm", "rolling-tail": 0.5, **_WHOLE},
    "raffm-scaler": {"strategy": "raffm", "width-scaler": True, **_WHOLE},
    "heterofl-scaler": {"strategy": "heterofl", "width-scaler": True, **_WHOLE},
    "fedrolex-scaler": {"strategy": "fedrolex", "width-scaler": True, **_WHOLE},
    "raffm-tail-scaler": {
        "strategy": "raffm",
        "rolling-tail": 0.5,
        "width-scaler": True,
        **_WHOLE,
    },
    "raffm-w1": {"strategy": "raffm", "width-weight-power": 1.0, **_WHOLE},
    "raffm-w2": {"strategy": "raffm", "width-weight-power": 2.0, **_WHOLE},
    "heterofl-w1": {"strategy": "heterofl", "width-weight-power": 1.0, **_WHOLE},
}
"""Candidate and ablation rows (diagnosis, choosing ``raffm``'s defaults); run with ``--rows``."""

ALL_ROWS: dict[str, dict[str, Any] | None] = {**ROWS, **VARIANTS}

QUICK: dict[str, Any] = {"local-steps": 1, "eval-max-examples": 64, "eval-every": 1}
QUICK_ROUNDS = 2
QUICK_NODES = 4
"""``--quick``: a smoke check of every row's code path, not a measurement: 2 rounds of
one local step on 4 nodes, one seed, ``cross-silo-10`` unless ``--federations`` says."""


def federation_of(name: str, quick: bool) -> Federation:
    """The federation ``name``; under ``--quick`` shrunk to :data:`QUICK_NODES` nodes."""
    fed = FEDERATIONS[name]
    if not quick:
        return fed
    nodes = min(fed.nodes, QUICK_NODES)
    overrides = {**fed.overrides, "min-available-nodes": nodes, "min-train-nodes": 2}
    return Federation(nodes=nodes, rounds=QUICK_ROUNDS, overrides=overrides)


BACKEND = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}}


# ----------------------------------------------------------------- one run
def run_overrides(federation: str, row: str, seed: int, quick: bool, extra: dict) -> dict:
    """The run config of one run (kebab-case), everything but the results directory."""
    fed = federation_of(federation, quick)
    overrides = {
        **COMMON,
        **fed.overrides,
        **(ALL_ROWS[row] or {}),
        "seed": seed,
        "num-server-rounds": fed.rounds,
    }
    if quick:
        overrides.update(QUICK)
    overrides.update(extra)
    overrides.setdefault("dataset", str(ROOT / "data" / "polarity" / "polarity.csv"))
    return overrides


def simulate(overrides: dict[str, Any], nodes: int) -> None:
    """One federation through the app's ServerApp and ClientApp (in this process)."""
    from flwr.simulation import run_simulation

    from client_app.app import build_client_app
    from server_app.app import build_server_app

    run_simulation(
        server_app=build_server_app(overrides),
        client_app=build_client_app(overrides),
        num_supernodes=nodes,
        backend_config=BACKEND,
    )


def train_centralized(
    overrides: dict[str, Any], federation: Federation, *, fine_tune: bool = True
) -> None:
    """The ceiling: the full model fine-tuned on the pooled train split.

    Same model, head seed, optimizer and learning rate as the federated rows;
    one "round" is as many steps as ``fedavg-train-all`` takes in one round
    (clients per round x ``local-steps``), with the same central evaluation,
    so the curves line up by examples seen. With ``fine_tune=False`` only the
    initial model is scored (round 0).
    """
    import torch
    from flwr.app import ArrayRecord

    from client_app.training import TrainSettings, train_submodel
    from raffm_core.task import load_task
    from raffm_core.task.config import RunConfig
    from raffm_core.task.encode import make_loader, sort_by_length, take
    from server_app.app import CentralEvaluator
    from server_app.outputs import prepare_results_dir, write_json
    from server_app.outputs import summarize as summarize_run

    cfg = RunConfig.from_mapping(overrides)
    started = time.monotonic()
    out = prepare_results_dir(cfg.results_dir)
    torch.set_num_threads(2)
    task = load_task(cfg)
    model = task.load_model(cfg.seed)
    train = task.encode(task.splits.train, cfg.max_length)

    def loader(split):
        picked = take(split, cfg.eval_max_examples, cfg.seed)
        encoded = sort_by_length(task.encode(picked, cfg.max_length))
        return make_loader(encoded, task.preprocessor, cfg.eval_batch_size)

    evaluator = CentralEvaluator(
        model,
        loader(task.splits.test),
        task.info,
        task.preprocessor,
        validation=None if task.splits.validation is None else loader(task.splits.validation),
        every=cfg.eval_every,
        last_round=cfg.num_server_rounds,
    )
    clients = max(cfg.min_train_nodes, round(cfg.fraction_train * federation.nodes))
    steps = clients * (cfg.local_steps or 1)
    central = {0: dict(evaluator(0, ArrayRecord(model.state_dict())))}
    for server_round in range(1, cfg.num_server_rounds + 1 if fine_tune else 1):
        settings = TrainSettings(
            lr=cfg.lr,
            local_steps=steps,
            local_epochs=cfg.local_epochs,
            batch_size=cfg.batch_size,
            weight_decay=cfg.weight_decay,
            proximal_mu=0.0,
            seed=cfg.seed * 1000 + server_round,
            bf16=cfg.mixed_precision == "bf16",
        )
        result = train_submodel(model, train, task.preprocessor, settings)
        metrics = evaluator(server_round, ArrayRecord(model.state_dict()))
        if metrics is not None:
            central[server_round] = dict(metrics)
        print(f"round {server_round}/{cfg.num_server_rounds}: loss {result.loss:.3f}", flush=True)
    summary = summarize_run({}, central, task.info.primary_metric, 0, time.monotonic() - started)
    summary["rounds"] = cfg.num_server_rounds
    summary["mean-client-params-fraction"] = 1.0
    rows = [{"round": r, **{k: v for k, v in m.items()}} for r, m in sorted(central.items())]
    write_json(out / "rounds.json", rows)
    write_json(out / "run-config.json", cfg.to_mapping())
    write_json(out / "summary.json", summary)


def run_dir(out: Path, federation: str, row: str, seed: int) -> Path:
    return out / "runs" / federation / row / f"seed-{seed}"


def launch(out: Path, federation: str, row: str, seed: int, quick: bool, extra: dict) -> float:
    """Run one (federation, row, seed) in a fresh subprocess; its output goes to ``run.log``.

    Progress lines (``round k/R``) are echoed. Returns the wall time.
    """
    folder = run_dir(out, federation, row, seed)
    folder.mkdir(parents=True, exist_ok=True)
    spec = json.dumps(
        {
            "federation": federation,
            "row": row,
            "seed": seed,
            "quick": quick,
            "extra": extra,
            "results-dir": str(folder),
        }
    )
    started = time.monotonic()
    with open(folder / "run.log", "w") as logf:
        proc = subprocess.Popen(
            [sys.executable, __file__, "--one", spec],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT), "RAY_DEDUP_LOGS": "0"},
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            logf.write(line)
            if "round " in line and ("/" in line) and ("clients" in line or "loss" in line):
                text = line.strip().split(":", 1)[-1].strip() if "INFO" in line else line.strip()
                print(f"    [{federation} {row} seed {seed}] {text}", flush=True)
        code = proc.wait()
    if code != 0 or not (folder / "summary.json").is_file():
        raise RuntimeError(
            f"{federation} {row} seed {seed} failed (exit {code}); see {folder}/run.log"
        )
    wall = time.monotonic() - started
    (folder / "cost.json").write_text(json.dumps({"wall-time-s": wall}) + "\n")
    rejected = rejected_replies(folder)
    if rejected:
        # A reply lost to the machine (a Ray worker killed for memory, a timeout) is
        # not a result of the method: the run is set aside, on disk, and not reported.
        aside = folder.with_name(f"{folder.name}.set-aside-{time.strftime('%Y%m%d-%H%M%S')}")
        folder.rename(aside)
        raise RuntimeError(
            f"{federation} {row} seed {seed}: {rejected} replies rejected "
            f"({rejected_reasons(aside)}); set aside in {aside}, run it again"
        )
    return wall


def rejected_replies(folder: Path) -> int:
    """Client replies the server rejected in a finished run (0 for pooled training)."""
    rounds = read_json(folder / "rounds.json")
    return sum(c.get("status") == "rejected" for r in rounds for c in r.get("clients", []))


def rejected_reasons(folder: Path) -> str:
    """The distinct first words of the rejection reasons in ``run.log``, for the message."""
    reasons = set()
    for line in (folder / "run.log").read_text(errors="replace").splitlines():
        if "rejected:" in line:
            reasons.add(line.split("rejected:", 1)[1].strip()[:70])
    return "; ".join(sorted(reasons)[:3])


def run_one(spec_json: str) -> None:
    """The body of a ``--one`` subprocess."""
    spec = json.loads(spec_json)
    overrides = run_overrides(
        spec["federation"], spec["row"], spec["seed"], spec["quick"], spec["extra"]
    )
    overrides["results-dir"] = spec["results-dir"]
    federation = federation_of(spec["federation"], spec["quick"])
    if ALL_ROWS[spec["row"]] is None:
        train_centralized(overrides, federation)
    elif nobody_holds_the_full_model(overrides):
        untrained(overrides, federation)
    else:
        simulate(overrides, federation.nodes)


def nobody_holds_the_full_model(overrides: dict[str, Any]) -> bool:
    """FedAvg with honest exclusion, and every budget of the profile below the full model.

    Only ``params=`` fractions are decided here; other budgets go to the run.
    """
    from raffm_core.budget import Budget

    if overrides.get("strategy") != "fedavg" or overrides.get("fedavg-train-all"):
        return False
    budgets = [Budget.parse(b) for b in str(overrides["budget-profile"]).split(",") if b.strip()]
    return all(b.kind == "params" and b.relative and b.value < 1.0 for b in budgets)


def untrained(overrides: dict[str, Any], federation: Federation) -> None:
    """The ``fedavg`` row when no client can hold the full model: nobody trains.

    The run is not a failure but the honest result: the model stays the
    initial one, scored once, and every client is excluded in every round.
    """
    train_centralized(overrides, federation, fine_tune=False)
    folder = Path(overrides["results-dir"])
    summary = read_json(folder / "summary.json")
    summary.update(
        {
            "rounds": overrides["num-server-rounds"],
            "mean-client-params-fraction": 0.0,
            "communication-ratio": 0.0,
            "clients-excluded": federation.nodes,
            "note": "no client's budget holds the full model; nothing was trained",
        }
    )
    (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


# -------------------------------------------------------- zero-shot ablation
def keeps_models(row: str) -> bool:
    """Rows whose runs keep their final model: the zero-shot ablation runs on them."""
    return bool((ALL_ROWS.get(row) or {}).get("save-models"))


ZERO_SHOT_BUDGET = "params=0.7"
ZERO_SHOT_SAMPLES = 50


def zero_shot(out: Path, federation: str, row: str, seed: int, quick: bool) -> Path | None:
    """Run ``scripts/ablation_zero_shot.py`` on a finished run's final model.

    Prioritized against random unit order at ``params=0.7`` (paper Appendix
    A.2), written to the run's ``zero-shot/``; reused when it exists. Returns
    the folder, or ``None`` when the run kept no final model.
    """
    folder = run_dir(out, federation, row, seed)
    target = folder / "zero-shot"
    if (target / "ablation.json").is_file():
        return target
    if not (folder / "final-model").is_dir():
        return None
    samples = 4 if quick else ZERO_SHOT_SAMPLES
    command = [
        sys.executable,
        str(ROOT / "scripts" / "ablation_zero_shot.py"),
        str(folder / "final-model"),
        "--budget",
        ZERO_SHOT_BUDGET,
        "--samples",
        str(samples),
        "--out",
        str(target),
    ]
    with open(folder / "zero-shot.log", "w") as logf:
        code = subprocess.call(command, stdout=logf, stderr=subprocess.STDOUT, cwd=ROOT)
    if code != 0:
        raise RuntimeError(f"zero-shot ablation of {folder} failed; see {folder}/zero-shot.log")
    return target


ZERO_SHOT_FOLDERS = {"zero-shot": "weights (L1)", "zero-shot-taylor": "Taylor"}
"""Ablation folders of a run and the salience each ranked by (``--salience taylor``
runs are made by hand: ``scripts/ablation_zero_shot.py ... --out RUN/zero-shot-taylor``)."""


def zero_shot_table(
    out: Path, federations: list[str], rows: list[str], seeds: list[int]
) -> list[str]:
    """Markdown lines: per federation, row, seed and salience, the two medians."""
    lines = [
        "### Zero-shot sub-models of each final model kept",
        "",
        f"Sub-models drawn at `{ZERO_SHOT_BUDGET}` (the paper's random draw; "
        f"{ZERO_SHOT_SAMPLES} per run unless the samples column says otherwise), each cut "
        "from the model in salience order and in a random unit order "
        "(`scripts/ablation_zero_shot.py`), scored on the run's held-out examples. Taylor "
        "salience is measured on the run's validation split.",
        "",
        "| federation | row | seed | salience | samples | full model | prioritized median "
        "| random-order median | higher |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    found = False
    for fed, row, seed in ((f, r, s) for f in federations for r in rows for s in seeds):
        for folder, salience in ZERO_SHOT_FOLDERS.items():
            path = run_dir(out, fed, row, seed) / folder / "ablation.json"
            if not path.is_file():
                continue
            found = True
            data = read_json(path)
            pri = data["stats"]["prioritized"]["median"]
            rnd = data["stats"]["unprioritized"]["median"]
            higher = "prioritized" if pri > rnd else ("tie" if pri == rnd else "random order")
            samples = data.get("samples", data["stats"]["prioritized"].get("n", ""))
            lines.append(
                f"| {fed} | {row} | {seed} | {salience} | {samples} | {data['full-model']:.4f} "
                f"| {pri:.4f} | {rnd:.4f} | {higher} |"
            )
    return lines + [""] if found else []


# ------------------------------------------------------------------ report
def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def collect(out: Path, federations: list[str], rows: list[str], seeds: list[int]) -> list[dict]:
    """One record per finished run: the summary figures, the per-round curve, the cost."""
    records = []
    for fed in federations:
        for row in rows:
            for seed in seeds:
                folder = run_dir(out, fed, row, seed)
                if not (folder / "summary.json").is_file():
                    continue
                summary = read_json(folder / "summary.json")
                rounds = read_json(folder / "rounds.json")
                cost = read_json(folder / "cost.json") if (folder / "cost.json").is_file() else {}
                curve = {r["round"]: r["accuracy"] for r in rounds if "accuracy" in r}
                total_bytes = sum(
                    c.get("bytes-down", 0) + c.get("bytes-up", 0)
                    for r in rounds
                    for c in r.get("clients", [])
                )
                records.append(
                    {
                        "federation": fed,
                        "strategy": row,
                        "seed": seed,
                        "rounds": summary.get("rounds"),
                        "final-accuracy": summary.get("final-accuracy"),
                        "val-best-round": summary.get("best-round"),
                        "test-accuracy-at-val-best": summary.get("best-accuracy"),
                        "mean-client-params-fraction": summary.get("mean-client-params-fraction"),
                        "bytes-ratio": summary.get("communication-ratio"),
                        "total-bytes": total_bytes,
                        "clients-excluded": summary.get("clients-excluded"),
                        "wall-time-s": cost.get("wall-time-s"),
                        "curve": curve,
                    }
                )
    return records


CSV_COLUMNS = [
    "federation",
    "strategy",
    "seed",
    "rounds",
    "final-accuracy",
    "val-best-round",
    "test-accuracy-at-val-best",
    "mean-client-params-fraction",
    "bytes-ratio",
    "total-bytes",
    "clients-excluded",
    "wall-time-s",
]


def write_csv(path: Path, records: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for record in records:
            writer.writerow({k: _fmt_csv(record.get(k)) for k in CSV_COLUMNS})


def _fmt_csv(value: Any) -> Any:
    return f"{value:.4f}" if isinstance(value, float) else ("" if value is None else value)


def mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return mean, math.sqrt(var)


def summary_table(records: list[dict], federation: str, rows: list[str]) -> list[str]:
    """Markdown lines: per row, mean +- sd, per-seed paired differences, gap to the ceiling."""
    by = {(r["strategy"], r["seed"]): r for r in records if r["federation"] == federation}
    seeds = sorted({s for _, s in by})
    ceiling = [by[("centralized", s)]["final-accuracy"] for s in seeds if ("centralized", s) in by]
    ceiling_mean = mean_std(ceiling)[0] if ceiling else None
    lines = [
        f"### {federation}",
        "",
        "| strategy | seeds | final accuracy (mean ± sd) | at round chosen on validation "
        "| params fraction | bytes ratio | paired diff vs raffm, per seed | ahead of raffm "
        "| gap to centralized |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        runs = [by[(row, s)] for s in seeds if (row, s) in by]
        if not runs:
            continue
        final = mean_std([r["final-accuracy"] for r in runs])
        chosen = mean_std([r["test-accuracy-at-val-best"] for r in runs])
        frac = [r["mean-client-params-fraction"] for r in runs if r["mean-client-params-fraction"]]
        ratio = [r["bytes-ratio"] for r in runs if r["bytes-ratio"] is not None]
        diffs, ahead = [], 0
        for s in seeds:
            if (row, s) in by and ("raffm", s) in by:
                d = by[(row, s)]["final-accuracy"] - by[("raffm", s)]["final-accuracy"]
                diffs.append(f"{s}: {d:+.3f}")
                ahead += d > 0
        gap = f"{final[0] - ceiling_mean:+.3f}" if ceiling_mean is not None else "-"
        lines.append(
            f"| {row} | {len(runs)} | {final[0]:.3f} ± {final[1]:.3f} | "
            f"{chosen[0]:.3f} ± {chosen[1]:.3f} | "
            f"{(sum(frac) / len(frac)) if frac else float('nan'):.3f} | "
            f"{(sum(ratio) / len(ratio)) if ratio else float('nan'):.3f} | "
            f"{', '.join(diffs) if row != 'raffm' else '-'} | "
            f"{f'{ahead} of {len(diffs)}' if row != 'raffm' else '-'} | {gap} |"
        )
    return lines + [""]


def plot(out: Path, records: list[dict], federations: list[str], rows: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for fed in federations:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for row in rows:
            curves = [
                r["curve"] for r in records if r["federation"] == fed and r["strategy"] == row
            ]
            if not curves:
                continue
            xs = sorted(set.intersection(*(set(c) for c in curves)))
            values = [[c[x] for c in curves] for x in xs]
            mean = [sum(v) / len(v) for v in values]
            ax.plot(xs, mean, marker="o", markersize=3, label=f"{row} (n={len(curves)})")
            ax.fill_between(xs, [min(v) for v in values], [max(v) for v in values], alpha=0.15)
        ax.set_xlabel("round")
        ax.set_ylabel("test accuracy (mean over seeds; band: min..max)")
        ax.set_title(fed)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"accuracy-per-round-{fed}.png", dpi=120)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = {fed: m for fed, m in zip(federations, "os^", strict=False)}
    for row in rows:
        pts = [r for r in records if r["strategy"] == row and r["total-bytes"]]
        if pts:
            for fed in federations:
                mine = [r for r in pts if r["federation"] == fed]
                if mine:
                    ax.scatter(
                        [r["total-bytes"] / 2**30 for r in mine],
                        [r["final-accuracy"] for r in mine],
                        marker=markers[fed],
                        label=f"{row} / {fed}",
                        alpha=0.8,
                    )
    ax.set_xlabel("total bytes moved, GiB (all clients, all rounds)")
    ax.set_ylabel("final test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "accuracy-vs-bytes.png", dpi=120)
    plt.close(fig)


def report(out: Path, federations: list[str], rows: list[str], seeds: list[int], argv: list[str]):
    records = collect(out, federations, rows, seeds)
    write_csv(out / "results.csv", records)
    lines = [
        "# Benchmark results",
        "",
        f"Command: `.venv/bin/python scripts/benchmark.py {' '.join(argv)}`".replace("  ", " "),
        "",
        f"Settings shared by every row: `{json.dumps(COMMON)}`; federations: "
        + "; ".join(
            f"`{name}`: {f.nodes} clients, {f.rounds} rounds, `{json.dumps(f.overrides)}`"
            for name, f in FEDERATIONS.items()
            if name in federations
        )
        + ".",
        "",
        "Final accuracy is the test accuracy of the last round's global model; the "
        "round chosen on validation uses the validation split carved from the training "
        "data. Paired differences are the row minus `raffm` for the same seed.",
        "",
    ]
    for fed in federations:
        lines += summary_table(records, fed, rows)
    lines += zero_shot_table(out, federations, [r for r in rows if keeps_models(r)], seeds)
    costs = [r["wall-time-s"] for r in records if r.get("wall-time-s")]
    if costs:
        lines.append(
            f"Cost: {len(costs)} runs, {sum(costs) / 60:.1f} min in total "
            f"({min(costs):.0f}-{max(costs):.0f} s per run; per run in `results.csv`)."
        )
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    plot(out, records, federations, rows)
    return records


# -------------------------------------------------------------------- main
def parse_set(items: list[str]) -> dict[str, Any]:
    """``--set key=value`` with TOML-typed values (``lr=3e-4``, ``strategy='"x"'``)."""
    import tomllib

    extra = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected key=value")
        extra[key.strip()] = tomllib.loads(f"v = {value}")["v"]
    return extra


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--federations", default=",".join(FEDERATIONS))
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    parser.add_argument("--quick", action="store_true", help="2 rounds, 1 seed: a smoke check")
    parser.add_argument("--set", action="append", default=[], help="run-config key=value, all rows")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    if args.one:
        run_one(args.one)
        return 0
    federations = [f for f in args.federations.split(",") if f]
    rows = [r for r in args.rows.split(",") if r]
    for name, known in ((federations, FEDERATIONS), (rows, ALL_ROWS)):
        unknown = [n for n in name if n not in known]
        if unknown:
            raise SystemExit(f"unknown {unknown}; expected some of {list(known)}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    if args.quick and "--federations" not in " ".join(argv):
        federations = ["cross-silo-10"]
    if args.quick and "--seeds" not in " ".join(argv):
        seeds = seeds[:1]
    out = (
        ROOT / "results" / "benchmark-quick" if args.quick and args.out == DEFAULT_OUT else args.out
    )
    out.mkdir(parents=True, exist_ok=True)
    extra = parse_set(args.set)
    if not args.report_only:
        plan = [(f, r, s) for f in federations for s in seeds for r in rows]
        todo = [p for p in plan if not (run_dir(out, *p) / "summary.json").is_file()]
        print(
            f"[benchmark] {len(plan)} runs, {len(plan) - len(todo)} reused, {len(todo)} to go",
            flush=True,
        )
        spent, failed = [], []
        for i, (fed, row, seed) in enumerate(todo, 1):
            print(f"[benchmark] {i}/{len(todo)}: {fed} {row} seed {seed}", flush=True)
            try:
                wall = launch(out, fed, row, seed, args.quick, extra)
            except RuntimeError as err:  # one lost run does not stop the others
                print(f"[benchmark] FAILED: {err}", flush=True)
                failed.append(f"{fed} {row} seed {seed}")
                continue
            spent.append(wall)
            if keeps_models(row) and zero_shot(out, fed, row, seed, args.quick):
                print(f"[benchmark] {fed} {row} seed {seed}: zero-shot ablation done", flush=True)
            eta = (len(todo) - i) * sum(spent) / len(spent)
            summary = read_json(run_dir(out, fed, row, seed) / "summary.json")
            print(
                f"[benchmark] {fed} {row} seed {seed}: final accuracy "
                f"{summary['final-accuracy']:.4f}, {wall:.0f} s; about {eta / 60:.0f} min to go",
                flush=True,
            )
    if not args.report_only:  # runs finished before the ablation was part of the benchmark
        for fed, row, seed in ((f, r, s) for f in federations for r in rows for s in seeds):
            if keeps_models(row) and (run_dir(out, fed, row, seed) / "summary.json").is_file():
                zero_shot(out, fed, row, seed, args.quick)
    records = report(out, federations, rows, seeds, argv)
    print((out / "summary.md").read_text())
    print(f"[benchmark] {len(records)} runs in {out}/results.csv")
    if not args.report_only and failed:
        print(f"[benchmark] {len(failed)} runs failed: {', '.join(failed)}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
