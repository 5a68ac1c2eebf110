"""Export a trained global model for a device: the largest sub-model it can run, evaluated.

After federated training, a device runs a sub-model of the global model that
fits its *inference* budget, which admits a larger sub-model than training
would (no gradients, optimizer state or saved activations). This script:

1. loads the trained model (a folder the ServerApp wrote, e.g.
   ``results/<run>/final-model``);
2. cuts the largest uniform sub-model within ``--budget`` out of it
   (:func:`raffm_core.cut`: prioritized first, function-preserving, so the
   prefix keeps the most salient units): ``memory-mb=N`` checks the
   inference memory model of :class:`raffm_core.InferenceProfile`
   (batch ``--batch-size``, ``--seq-len`` tokens or patches), ``params=F`` or
   ``params=N`` the parameter count;
3. evaluates it, without retraining, on the held-out split of the run
   (``run-config.json`` next to the model folder, or ``--run-config``);
4. exports it to ``--out`` with its tokenizer or image preprocessor, plus
   ``deploy.json`` (budget, spec, size, estimated memory, metrics). Load it with
   ``raffm_core.load_submodel(out)``; when the format is ``transformers`` plain
   ``AutoModelFor*.from_pretrained(out)`` loads it too.

With ``--curve DIR`` it instead evaluates parameter budgets from 25% to 100%
(``--fractions``) and writes ``curve.csv``, ``curve.md`` and ``curve.png``;
budgets below the model's smallest sub-model are listed as infeasible.

Usage::

    .venv/bin/python scripts/export_submodels.py results/RUN/final-model \\
        --budget memory-mb=450 --out deployed
    .venv/bin/python scripts/export_submodels.py results/RUN/final-model \\
        --curve benchmarks/deployment
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import datasets
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from raffm_core import (  # noqa: E402
    Budget,
    BudgetTooSmallError,
    CutResult,
    InferenceProfile,
    RaffmError,
    cut,
    describe,
    export_model,
)
from raffm_core.errors import DataError  # noqa: E402
from raffm_core.extract import model_class  # noqa: E402
from raffm_core.task import load_run_splits  # noqa: E402
from raffm_core.task.config import ConfigError, RunConfig, key_of  # noqa: E402
from raffm_core.task.encode import encode_task, make_loader, sort_by_length, take  # noqa: E402
from raffm_core.task.metrics import evaluate_model  # noqa: E402
from raffm_core.task.models import (  # noqa: E402
    image_tokens,
    is_image_model,
    load_pixel_processor,
    load_tokenizer,  # noqa: E402
)

log = logging.getLogger("export_submodels")
FRACTIONS = tuple(round(0.25 + 0.05 * i, 2) for i in range(16))
"""Parameter budgets of the curve: 25% to 100% in steps of 5%."""


@dataclass
class Trained:
    """A trained model with what cutting and evaluating its sub-models needs."""

    model: transformers.PreTrainedModel
    preprocessor: Any  # tokenizer or PixelProcessor
    loader: torch.utils.data.DataLoader
    task: Any
    profile: InferenceProfile
    salience: str  # the run's salience-norm

    def cut(self, budget: Budget) -> CutResult:
        """The largest uniform sub-model within ``budget``, most salient units first."""
        return cut(self.model, budget, salience=self.salience, profile=self.profile)


def read_run_config(path: Path, model_dir: Path) -> RunConfig:
    """The run's config with ``model-name`` set to ``model_dir``.

    Keys this checkout does not know (from another version) are dropped with a
    warning naming them.
    """
    data = json.loads(path.read_text())
    known = {key_of(f.name) for f in fields(RunConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        log.warning("%s: ignoring run-config keys this version does not know: %s", path, unknown)
    data = {k: v for k, v in data.items() if k in known}
    data["model-name"] = str(model_dir)
    return RunConfig.from_mapping(data)


def load_trained(model_dir: Path, cfg: RunConfig, batch_size: int, seq_len: int) -> Trained:
    """Load the trained model in ``model_dir`` and prepare scoring on the run's held-out split."""
    config = transformers.AutoConfig.from_pretrained(model_dir)
    model = model_class(config).from_pretrained(model_dir).eval()
    image = is_image_model(str(model_dir))
    preprocessor = load_pixel_processor(str(model_dir)) if image else load_tokenizer(str(model_dir))
    splits = load_run_splits(cfg)  # the run's task: labelled text, images, QA, instructions
    scored = take(splits.test, cfg.eval_max_examples, cfg.seed)
    held_out = sort_by_length(encode_task(scored, preprocessor, cfg.max_length, splits.task))
    loader = make_loader(held_out, preprocessor, cfg.eval_batch_size)
    seq_len = seq_len or (image_tokens(config) if image else cfg.max_length)
    profile = InferenceProfile(batch_size, seq_len)
    return Trained(model, preprocessor, loader, splits.task, profile, cfg.weight_norm)


def describe_fit(trained: Trained, result: CutResult) -> dict[str, Any]:
    """Size, estimated inference memory and held-out metrics of a cut, no retraining."""
    layout, spec = describe(trained.model), result.spec
    started = time.perf_counter()
    with torch.no_grad():
        metrics = evaluate_model(result.model, trained.loader, trained.task, trained.preprocessor)
    return {
        "params": layout.count_params(spec),
        "params-fraction": layout.count_params(spec) / layout.total_params,
        "inference-memory-mb": trained.profile.memory_mb(layout, spec),
        "heads": spec.layers[0].heads,
        "ffn": spec.layers[0].ffn,
        "spec": spec.to_dict(),
        **{k: v for k, v in metrics.items() if k != "num-examples"},
        "num-examples": metrics["num-examples"],
        "eval-time-s": time.perf_counter() - started,
    }


def export(trained: Trained, budget: Budget, out: Path) -> dict[str, Any]:
    """Fit ``budget``, evaluate, export to ``out``; returns what ``deploy.json`` holds."""
    result = trained.cut(budget)
    row = describe_fit(trained, result)
    kind = export_model(result.model, out)
    trained.preprocessor.save_pretrained(out)
    report = {
        "budget": str(budget),
        "inference-profile": {
            "batch-size": trained.profile.batch_size,
            "seq-len": trained.profile.seq_len,
        },
        "format": kind,
        **row,
    }
    (out / "deploy.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def curve(trained: Trained, fractions: Sequence[float], out: Path) -> list[dict[str, Any]]:
    """Evaluate parameter budgets ``fractions``; write ``curve.{csv,md,png}`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    metric = trained.task.primary_metric
    rows = []
    for fraction in fractions:
        budget = Budget("params", fraction, relative=True)
        try:
            result = trained.cut(budget)
        except BudgetTooSmallError as err:
            rows.append({"budget": str(budget), "feasible": False, "note": str(err)})
            log.info("%s: infeasible (%s)", budget, err)
            continue
        row = {"budget": str(budget), "feasible": True, **describe_fit(trained, result)}
        rows.append(row)
        log.info(
            "%s: %.3f of the parameters, %.0f MB, %s %.4f",
            budget,
            row["params-fraction"],
            row["inference-memory-mb"],
            metric,
            row[metric],
        )
    columns = ["budget", "params", "params-fraction", "heads", "ffn", "inference-memory-mb", metric]
    with (out / "curve.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, [*columns, "loss", "feasible"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (out / "curve.md").write_text(curve_table(rows, metric))
    plot_curve([r for r in rows if r["feasible"]], metric, out / "curve.png")
    return rows


def curve_table(rows: Sequence[dict[str, Any]], metric: str) -> str:
    """The curve as a Markdown table."""
    lines = [
        f"| budget | parameters | fraction | heads | FFN | inference MB | {metric} |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        if not r["feasible"]:
            lines.append(f"| {r['budget']} | infeasible | | | | | |")
            continue
        lines.append(
            f"| {r['budget']} | {r['params'] / 1e6:.2f}M | {r['params-fraction']:.3f} | "
            f"{r['heads']} | {r['ffn']} | {r['inference-memory-mb']:.0f} | {r[metric]:.4f} |"
        )
    return "\n".join(lines) + "\n"


def plot_curve(rows: Sequence[dict[str, Any]], metric: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["params"] / 1e6 for r in rows], [r[metric] for r in rows], "o-")
    for r in rows:
        ax.annotate(
            f"{r['inference-memory-mb']:.0f} MB",
            (r["params"] / 1e6, r[metric]),
            textcoords="offset points",
            xytext=(0, 6),
            ha="center",
            fontsize=7,
        )
    ax.set_xlabel("sub-model parameters (M)")
    ax.set_ylabel(f"held-out {metric}")
    ax.set_title("Sub-models without retraining (labels: estimated inference memory)", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "model", type=Path, help="trained model folder (e.g. results/<run>/final-model)"
    )
    parser.add_argument(
        "--budget", help="device budget: memory-mb=N (inference), params=0.6, params=40M"
    )
    parser.add_argument("--out", type=Path, help="where to export the sub-model (with --budget)")
    parser.add_argument("--curve", type=Path, help="write curve.{csv,md,png} here instead")
    parser.add_argument(
        "--fractions",
        default=",".join(f"{f:g}" for f in FRACTIONS),
        help="parameter budgets of the curve (comma-separated fractions)",
    )
    parser.add_argument("--run-config", type=Path, help="default: run-config.json beside the model")
    parser.add_argument("--batch-size", type=int, default=1, help="inference batch (memory model)")
    parser.add_argument(
        "--seq-len",
        type=int,
        default=0,
        help="tokens per input; default the run's max-length (text) or patches + 1 (ViT)",
    )
    args = parser.parse_args(argv)
    if bool(args.budget) != bool(args.out) or bool(args.budget) == bool(args.curve):
        parser.error("give either --budget and --out, or --curve")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    args = parse_args(argv)
    if not args.model.is_dir():
        what = "is not a folder" if args.model.exists() else "does not exist"
        raise SystemExit(
            f"export_submodels: the model folder {args.model} {what}; expected a trained "
            "model folder such as results/<run>/final-model"
        )
    run_config = args.run_config or args.model.parent / "run-config.json"
    if not run_config.is_file():
        raise SystemExit(f"no run config at {run_config}; pass --run-config")
    try:
        budget = Budget.parse(args.budget) if args.budget else None
        cfg = read_run_config(run_config, args.model)
        trained = load_trained(args.model, cfg, args.batch_size, args.seq_len)
        if budget is None:
            fractions = [float(f) for f in args.fractions.split(",") if f.strip()]
            curve(trained, fractions, args.curve)
            print((args.curve / "curve.md").read_text(), end="")
            return 0
        report = export(trained, budget, args.out)
    except (RaffmError, DataError, ConfigError) as err:
        raise SystemExit(f"export_submodels: {err}") from None
    print(json.dumps({k: v for k, v in report.items() if k != "spec"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
