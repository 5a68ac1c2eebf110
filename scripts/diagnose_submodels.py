"""Score a trained global model and the sub-models its clients trained, side by side.

A run in which no client holds the full model (every budget below 1.0) trains
only sub-models, yet is judged by the full model they are fused into. This
script separates the two: on the run's validation split (the test split if
the run carved none) it scores

* the full global model, as the benchmark does;
* for every budget of the run's ``budget-profile``, the sub-model the server
  would send that budget (the model prioritized as the server does each round
  for ``raffm``, cut with the run's ``selection-mode``), run plain and, if
  the run trained with ``width-scaler``, under the scaler it trained with.

Per model it prints accuracy, loss and the share of the most predicted class
(1.0: a one-class predictor). Outputs ``diagnosis.json`` and ``diagnosis.md``
next to the model (or in ``--out``).

Usage::

    .venv/bin/python scripts/diagnose_submodels.py RUN_DIR/final-model \\
        [--run-config RUN_DIR/run-config.json] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

from raffm_core import cut  # noqa: E402
from raffm_core.spec import width_count  # noqa: E402
from raffm_core.task.config import RAFFM, RunConfig  # noqa: E402
from raffm_core.task.data import DatasetSpec, load_splits  # noqa: E402
from raffm_core.task.encode import encode, make_loader, sort_by_length, take  # noqa: E402
from raffm_core.task.metrics import score_classifier  # noqa: E402


def diagnose(model_dir: Path, cfg: RunConfig, log=print) -> list[dict]:
    """One record per model scored: the full model, then one per profile budget."""
    model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    splits = load_splits(DatasetSpec.from_run_config(cfg))
    split_name = "validation" if splits.validation is not None else "test"
    split = splits.validation if splits.validation is not None else splits.test
    held_out = encode(take(split, cfg.eval_max_examples, cfg.seed), tokenizer, cfg.max_length)
    loader = make_loader(sort_by_length(held_out), tokenizer, 64)
    # what the server sends: raffm cuts the model in salience order, the baselines as stored
    salience = cfg.weight_norm if cfg.strategy == RAFFM else None
    records = [{"model": "full", "split": split_name, **score_classifier(model, loader)}]
    log(_line(records[-1]))
    for budget in cfg.budget_tiers:
        result = cut(model, budget, salience=salience, mode=cfg.selection_mode, seed=0)
        heads = sorted({width_count(layer.heads) for layer in result.spec.layers})
        common = {"model": budget, "split": split_name, "heads": heads}
        records.append({**common, "scaler": False, **score_classifier(result.model, loader)})
        log(_line(records[-1]))
        if cfg.width_scaler:
            scores = score_classifier(result.model, loader, scaled=True)
            records.append({**common, "scaler": True, **scores})
            log(_line(records[-1]))
    return records


def _line(r: dict) -> str:
    what = r["model"] + (" (scaler)" if r.get("scaler") else "")
    return (
        f"{what:>22}: accuracy {r['accuracy']:.4f}, loss {r['loss']:.3f}, "
        f"most predicted class {r['majority-share']:.2f} of {r['examples']} {r['split']} examples"
    )


def markdown(records: list[dict]) -> str:
    lines = [
        "| model | scaler | heads kept | accuracy | loss | most predicted class |",
        "| --- | --- | --- | ---: | ---: | ---: |",
    ]
    for r in records:
        lines.append(
            f"| {r['model']} | {'yes' if r.get('scaler') else 'no'} | "
            f"{r.get('heads', 'all')} | {r['accuracy']:.4f} | {r['loss']:.3f} | "
            f"{r['majority-share']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="a run's final-model/ folder")
    parser.add_argument("--run-config", type=Path, help="default: ../run-config.json")
    parser.add_argument("--out", type=Path, help="default: next to the model")
    args = parser.parse_args(argv)
    if not args.model.is_dir():
        raise SystemExit(f"{args.model}: no such model folder")
    config_path = args.run_config or args.model.parent / "run-config.json"
    if not config_path.is_file():
        raise SystemExit(f"{config_path}: no run-config.json; pass --run-config")
    cfg = RunConfig.from_mapping(json.loads(config_path.read_text()))
    torch.set_num_threads(2)
    records = diagnose(args.model, cfg)
    out = args.out or args.model.parent
    out.mkdir(parents=True, exist_ok=True)
    (out / "diagnosis.json").write_text(json.dumps(records, indent=2) + "\n")
    (out / "diagnosis.md").write_text(markdown(records))
    print(f"wrote {out}/diagnosis.json and diagnosis.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
