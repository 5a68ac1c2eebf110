"""Measure what a ClientApp process adds over its baseline to train a sub-model, against the model.

For each sub-model (the widest uniform MiniLM sub-networks that the
budgets below allow a process holding 687 MB, the baseline the Ray actors
reported in docs/memory.md's simulation) and each precision, a fresh
process does what the ClientApp's train handler does: it imports
``client_app.app``, loads a node's data (long reviews, 256 tokens), measures
its RSS (the baseline), then, under ``peak_memory()``, builds the sub-model
from its arrays and takes AdamW steps of 16 x 256 tokens. It prints the
measured peak minus the baseline against the memory model's step (its
estimate without the runtime, plus the 38 MB step workspace), which is what
``memory-margin`` has to cover.

Usage: .venv/bin/python scripts/memory_step.py REVIEWS.csv
(REVIEWS.csv from scripts/long_reviews.py). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BUDGETS = (1200, 1500, 2000, 2600)
BASELINE_MB = 687.0
BATCH, SEQ, STEPS = 16, 256, 4
PRECISIONS = ("bf16", "fp32")


def overrides(reviews: Path) -> dict:
    return {"dataset": str(reviews), "max-length": SEQ, "partitioner": "iid"}


def prepare(reviews: Path, out: Path) -> list[dict]:
    """Save each budget's sub-model (arrays, spec, base config); return what the model says."""
    import torch

    import raffm_core as R
    from client_app.partition import load_local_data, token_ids
    from raffm_core.budget import STEP_WORKSPACE_MB
    from raffm_core.families import attention_materialized
    from raffm_core.task import load_task
    from raffm_core.task.config import RunConfig
    from raffm_core.task.models import load_model

    cfg = RunConfig.from_mapping({}, overrides(reviews))
    model = load_model(cfg.model_name, load_task(cfg).info)
    layout = R.describe(model)
    profile = R.TrainingProfile(
        batch_size=BATCH, seq_len=SEQ, eager_attention=attention_materialized(model.config)
    )
    vocab = token_ids(load_local_data(cfg, 0, 4, SEQ))
    cases = []
    for budget in BUDGETS:
        spec = R.select_subnet(
            layout, f"memory-mb={budget}", profile=profile.with_baseline(BASELINE_MB), vocab=vocab
        )
        path = out / f"{budget}.pt"
        torch.save(
            {
                "spec": spec.to_json(),
                "base": R.base_config(model).to_json_string(),
                "state": R.extract_state_dict(model.state_dict(), layout, spec),
            },
            path,
        )
        step = R.training_memory_mb(layout, spec, profile) - profile.runtime_mb
        cases.append(
            {
                "budget": budget,
                "path": str(path),
                "heads": spec.layers[0].heads,
                "ffn": spec.layers[0].ffn,
                "fraction": layout.count_params(spec) / layout.total_params,
                "estimate_mb": step + STEP_WORKSPACE_MB,
            }
        )
    return cases


def worker(reviews: Path, path: str, precision: str) -> None:
    """One fresh process: the train handler's work, measured."""
    import torch
    from transformers import AutoConfig

    import client_app.app  # noqa: F401 - what a ClientApp process imports
    import raffm_core as R
    from client_app.partition import load_local_data
    from client_app.training import TrainSettings, peak_memory, resident_mb, train_submodel
    from raffm_core.task.config import RunConfig

    torch.set_num_threads(1)
    cfg = RunConfig.from_mapping({}, overrides(reviews))
    data = load_local_data(cfg, 0, 4, SEQ)
    baseline = resident_mb()
    blob = torch.load(path)  # stands for the message's arrays
    spec = R.SubnetSpec.from_json(blob["spec"])
    config = AutoConfig.for_model(**json.loads(blob["base"]))
    settings = TrainSettings(
        lr=1e-4,
        local_steps=STEPS,
        local_epochs=0.0,
        batch_size=BATCH,
        weight_decay=0.01,
        proximal_mu=0.0,
        seed=1,
        bf16=precision == "bf16",
    )
    with peak_memory() as memory:
        model = R.build_submodel(config, spec, blob.pop("state"))
        train_submodel(model, data.train, data.tokenizer, settings)
    print(json.dumps({"baseline_mb": baseline, "peak_mb": memory["peak-mb"]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reviews", type=Path, help="the CSV of scripts/long_reviews.py")
    parser.add_argument("--worker", nargs=2, metavar=("PT", "PRECISION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    reviews = args.reviews.resolve()
    if args.worker:
        worker(reviews, *args.worker)
        return
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(ROOT))
    print(
        f"| sub-model ({BATCH} x {SEQ} tokens) | estimated step | "
        + " | ".join(f"measured, {p} (ratio)" for p in PRECISIONS)
        + " |"
    )
    print("| --- | --- | " + " | ".join("---" for _ in PRECISIONS) + " |")
    with tempfile.TemporaryDirectory() as tmp:
        for case in prepare(reviews, Path(tmp)):
            cells = []
            for precision in PRECISIONS:  # one at a time: a fresh process each
                proc = subprocess.run(
                    [sys.executable, __file__, str(reviews), "--worker", case["path"], precision],
                    capture_output=True,
                    text=True,
                    env=env,
                    cwd=ROOT,
                )
                if proc.returncode:
                    raise RuntimeError(f"worker failed:\n{proc.stderr[-3000:]}")
                got = json.loads(proc.stdout.strip().splitlines()[-1])
                step = got["peak_mb"] - got["baseline_mb"]
                cells.append(f"{step:.0f} MB ({step / case['estimate_mb']:.2f})")
            name = (
                f"memory-mb={case['budget']}: {case['heads']} heads, FFN {case['ffn']} "
                f"({case['fraction']:.2f} of the parameters)"
            )
            print(f"| {name} | {case['estimate_mb']:.0f} MB | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
