"""Choose the benchmark's shared learning rate and scaler setting on validation.

Pooled (centralized) fine-tuning of the full model and of the sub-models the
benchmark's budgets give (cut from the prioritized pretrained model), at each
learning rate, with and without HeteroFL's scaler: 4 chunks of ``--steps``
optimizer steps (a fresh AdamW each chunk, as a client gets each round) on the
pooled training split, scored after each chunk on the validation split the
benchmark carves from the training data. The test split is never read.

A recipe under which the full model itself collapses to one class, or under
which a sub-model cannot learn when it sees all the data, cannot tell
federated methods apart; this pilot picks the recipe every row then shares.

Outputs ``pilot.json`` and ``pilot.md`` in ``--out``.

Usage::

    .venv/bin/python scripts/pilot_recipe.py [--seed 1] [--lrs 3e-4,1e-4,5e-5] \\
        [--budgets full,params=0.8,params=0.6] [--steps 40] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "scripts"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import benchmark  # noqa: E402

from client_app.training import TrainSettings, train_submodel  # noqa: E402
from raffm_core import (  # noqa: E402
    base_config,
    build_submodel,
    describe,
    extract_state_dict,
    permute_state,
    rank_units,
    select_subnet,
)
from raffm_core.task import load_task  # noqa: E402
from raffm_core.task.config import RunConfig  # noqa: E402
from raffm_core.task.encode import make_loader, sort_by_length, take  # noqa: E402
from raffm_core.task.metrics import score_classifier as score  # noqa: E402


def curve(task, cfg, budget, lr, scaler, steps, chunks, train, val) -> list[dict]:
    model = task.load_model(cfg.seed)
    if budget != "full":
        layout = describe(model)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        permute_state(state, layout, rank_units(state, layout, cfg.weight_norm))
        spec = select_subnet(layout, budget, "largest", seed=0)
        model = build_submodel(base_config(model), spec, extract_state_dict(state, layout, spec))
    points = [{"steps": 0, **score(model, val)}]
    for chunk in range(1, chunks + 1):
        settings = TrainSettings(
            lr=lr,
            local_steps=steps,
            local_epochs=1.0,
            batch_size=cfg.batch_size,
            weight_decay=cfg.weight_decay,
            proximal_mu=0.0,
            seed=cfg.seed * 1000 + chunk,
            bf16=cfg.mixed_precision == "bf16",
            width_scaler=scaler,
        )
        train_submodel(model, train, task.preprocessor, settings)
        points.append({"steps": chunk * steps, **score(model, val)})
    return points


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--lrs", default="3e-4,1e-4,5e-5")
    parser.add_argument("--budgets", default="full,params=0.8,params=0.6")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--federation", default="cross-silo-10-tight")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/pilots/recipe-central")
    args = parser.parse_args(argv)
    protocol = benchmark.load_protocol(benchmark.PROTOCOL)
    overrides, _ = benchmark.run_config(protocol, args.federation, "raffm", args.seed, False, {})
    cfg = RunConfig.from_mapping(overrides)
    torch.set_num_threads(2)
    task = load_task(cfg)
    if task.splits.validation is None:
        raise SystemExit("the benchmark's run config carves no validation split")
    train = task.encode(task.splits.train, cfg.max_length)
    picked = take(task.splits.validation, cfg.eval_max_examples, cfg.seed)
    val = make_loader(sort_by_length(task.encode(picked, cfg.max_length)), task.preprocessor, 64)
    results = []
    for lr in [float(x) for x in args.lrs.split(",")]:
        for budget in args.budgets.split(","):
            for scaler in (False, True) if budget != "full" else (False,):
                started = time.monotonic()
                points = curve(task, cfg, budget, lr, scaler, args.steps, args.chunks, train, val)
                results.append({"lr": lr, "budget": budget, "scaler": scaler, "curve": points})
                shown = ", ".join(f"{p['accuracy']:.3f}" for p in points)
                print(
                    f"lr {lr:g} {budget}{' scaler' if scaler else ''}: val accuracy {shown} "
                    f"({time.monotonic() - started:.0f} s)",
                    flush=True,
                )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pilot.json").write_text(json.dumps(results, indent=2) + "\n")
    header = " | ".join(f"{(i + 1) * args.steps} steps" for i in range(args.chunks))
    lines = [
        f"Pooled fine-tuning, seed {args.seed}, validation accuracy (most predicted class's "
        f"share in brackets); command: `.venv/bin/python scripts/pilot_recipe.py "
        f"{' '.join(sys.argv[1:] if argv is None else argv)}`",
        "",
        f"| lr | model | scaler | {header} |",
        "| --- | --- | --- |" + " ---: |" * args.chunks,
    ]
    for r in results:
        cells = " | ".join(
            f"{p['accuracy']:.3f} ({p['majority-share']:.2f})" for p in r["curve"][1:]
        )
        scaler = "yes" if r["scaler"] else "no"
        lines.append(f"| {r['lr']:g} | {r['budget']} | {scaler} | {cells} |")
    (args.out / "pilot.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}/pilot.json and pilot.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
