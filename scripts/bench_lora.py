"""Benchmark RaFFM + LoRA against full-model LoRA and full fine-tuning on SmolLM2-135M.

One run prints a side-by-side table, per client and round, of:

* **bytes down / up**: the ``ArrayRecord`` a client receives and sends
  (``count_bytes``): adapters and task head under LoRA, the whole state dict
  under full fine-tuning;
* **peak memory** of a fresh process (``VmHWM``, read after resetting the
  high-water mark through ``/proc/self/clear_refs``; Linux): while training
  (the paper's figure; also minus the resident memory before the model was
  built, i.e. libraries and tokenized data), and while building the model.
  Building reads the checkpoint through a memory map, whose touched pages
  count as resident (page cache, not allocations): a column slice touches
  every page of its tensor;
* **step time**: mean seconds per optimizer step over ``--steps`` steps;
* optionally (``--accuracy-steps N``), held-out accuracy after ``N`` steps of
  more centralized training of each client-side model (a fresh AdamW, as in
  a new round). This is a short, single-client proxy, not a federated result.

The three settings, each in its own process, on the embedded SmolLM2-135M-Instruct
(``embedded:smollm2``; sequence classification on the polarity data):

* ``raffm-lora``: the budget's sub-network (default ``params=0.6``), picked by
  salience on the frozen base and read slice-wise from the checkpoint
  (:func:`raffm_core.lora.build_lora_submodel`), with LoRA on it;
* ``full-lora``: LoRA on the whole model;
* ``full-ft``: every weight trainable.

All use AdamW, fp32, one thread (a Ray actor's share), and the same batches.

Run with the project venv::

    .venv/bin/python scripts/bench_lora.py                      # about 2 minutes
    .venv/bin/python scripts/bench_lora.py --accuracy-steps 60  # plus a short accuracy proxy
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent

import torch  # noqa: E402
import transformers as T  # noqa: E402
from flwr.app import ArrayRecord  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import raffm_core as R  # noqa: E402
from client_app.training import TrainSettings, peak_memory, train_submodel  # noqa: E402
from raffm_core.lora import (  # noqa: E402
    LoraSettings,
    attach_lora,
    build_lora_submodel,
    parse_target_modules,
    place_spec,
    trainable_state,
    with_lora,  # noqa: E402
)
from raffm_core.task.config import EMBEDDED_SMOLLM2, RunConfig  # noqa: E402
from raffm_core.task.data import DatasetSpec, load_splits  # noqa: E402
from raffm_core.task.encode import encode, make_loader, take  # noqa: E402
from raffm_core.task.metrics import evaluate_model  # noqa: E402
from raffm_core.task.models import resolve_model_source  # noqa: E402

MODES = ("raffm-lora", "full-lora", "full-ft")
SEED = 0


def load_data(args: argparse.Namespace, tokenizer):
    """Encoded train and held-out splits of the polarity CSV, and the task."""
    cfg = RunConfig.from_mapping({"dataset": args.dataset, "model-name": EMBEDDED_SMOLLM2})
    splits = load_splits(DatasetSpec.from_run_config(cfg))
    train = encode(splits.train, tokenizer, args.seq_len)
    test = encode(take(splits.test, args.eval_examples, SEED), tokenizer, args.seq_len)
    return train, test, splits.task


def load_classifier(path: Path, num_labels: int) -> T.PreTrainedModel:
    torch.manual_seed(SEED)
    return T.AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)


def prepare(args: argparse.Namespace, path: Path, work: Path) -> dict[str, dict]:
    """Server side, in this process: the sub-network and the initial adapters and head.

    Writes ``<mode>.safetensors`` (what the server would send) and
    ``<mode>.spec.json`` into ``work``; returns per-mode facts for the table.
    """
    model = load_classifier(path, 2)
    layout = R.describe(model)
    settings = LoraSettings(args.rank, args.alpha, 0.0, parse_target_modules(args.targets))
    ranking = R.rank_units(model.state_dict(), layout)
    full = layout.full_spec()
    sub = place_spec(R.select_subnet(layout, args.budget), ranking)
    lora_layout = with_lora(layout, settings.target_modules, settings.rank)
    torch.manual_seed(SEED)
    wrapped = attach_lora(model, settings)
    state = {k: v.clone() for k, v in trainable_state(wrapped).items()}
    facts = {}
    for mode, spec in (("raffm-lora", sub), ("full-lora", full)):
        sent = R.extract_state_dict(state, lora_layout, spec)
        save_file({k: v.contiguous() for k, v in sent.items()}, str(work / f"{mode}.safetensors"))
        (work / f"{mode}.spec.json").write_text(spec.to_json())
        facts[mode] = {"params": layout.count_params(spec) / layout.total_params}
    facts["full-ft"] = {"params": 1.0}
    return facts


def worker(args: argparse.Namespace) -> dict:
    """One client setting in this (fresh) process: build, train, measure."""
    torch.set_num_threads(1)
    path = Path(resolve_model_source(EMBEDDED_SMOLLM2))
    tokenizer = T.AutoTokenizer.from_pretrained(path)
    train, test, task = load_data(args, tokenizer)
    work = Path(args.work)
    settings = TrainSettings(
        lr=args.full_lr if args.worker == "full-ft" else args.lr,
        local_steps=args.steps,
        local_epochs=0.0,
        batch_size=args.batch_size,
        weight_decay=0.0,
        proximal_mu=0.0,
        seed=SEED,
    )
    start_mb = _resident_mb()
    with peak_memory() as building:
        if args.worker == "full-ft":
            model = load_classifier(path, task.num_labels)
        else:
            config = T.AutoConfig.from_pretrained(path, num_labels=task.num_labels)
            config.architectures = ["LlamaForSequenceClassification"]
            spec = R.SubnetSpec.from_json((work / f"{args.worker}.spec.json").read_text())
            with torch.device("meta"):
                layout = R.describe(T.LlamaForSequenceClassification(config))
            lora = LoraSettings(args.rank, args.alpha, 0.0, parse_target_modules(args.targets))
            sent = load_file(str(work / f"{args.worker}.safetensors"))
            model = build_lora_submodel(config, spec, path, lora, sent, layout)
    state = trainable_state(model) if args.worker != "full-ft" else model.state_dict()
    nbytes = ArrayRecord({k: v.detach() for k, v in state.items()}).count_bytes()
    del state
    with peak_memory() as training:
        timed = train_submodel(model, train, tokenizer, settings)
    result = {
        "bytes": nbytes,
        "build-mb": building["peak-mb"],
        "peak-mb": training["peak-mb"],
        "extra-mb": training["peak-mb"] - start_mb,
        "step-s": timed.seconds / timed.steps,
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total": sum(p.numel() for p in model.parameters()),
    }
    if args.accuracy_steps > 0:
        more = dataclasses.replace(settings, local_steps=args.accuracy_steps, seed=SEED + 1)
        train_submodel(model, train, tokenizer, more)
        loader = make_loader(test, tokenizer, 16)
        result["accuracy"] = evaluate_model(model, loader, task)[task.primary_metric]
    return result


def _resident_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return float(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", default="params=0.6", help="RaFFM client budget")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--targets", default="q_proj,v_proj", help="LoRA target modules")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64, help="max tokens (padded per batch)")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps")
    parser.add_argument("--lr", type=float, default=5e-4, help="LoRA learning rate")
    parser.add_argument("--full-lr", type=float, default=2e-5, help="full fine-tuning's")
    parser.add_argument("--accuracy-steps", type=int, default=0, help="0: no accuracy proxy")
    parser.add_argument("--eval-examples", type=int, default=200)
    parser.add_argument("--dataset", default=str(ROOT / "data/polarity/polarity.csv"))
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args)))
        return

    path = Path(resolve_model_source(EMBEDDED_SMOLLM2))
    with tempfile.TemporaryDirectory() as work:
        facts = prepare(args, path, Path(work))
        for mode in MODES:
            command = [sys.executable, __file__, *sys.argv[1:], "--worker", mode, "--work", work]
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            line = next(x for x in out.splitlines() if x.startswith("RESULT "))
            facts[mode].update(json.loads(line.removeprefix("RESULT ")))
            print(f"{mode}: {facts[mode]}", file=sys.stderr)
    report(args, facts)


def report(args: argparse.Namespace, facts: dict[str, dict]) -> None:
    ours = facts["raffm-lora"]
    print(
        f"\nSmolLM2-135M-Instruct, polarity sequence classification; RaFFM budget {args.budget}; "
        f"LoRA r={args.rank} alpha={args.alpha:g} on {args.targets}; batch {args.batch_size} x "
        f"<= {args.seq_len} tokens, AdamW, fp32, 1 thread, {args.steps} timed steps\n"
    )
    accuracy = args.accuracy_steps > 0
    head = "| setting | params kept | trainable | bytes per round (each way) | "
    head += "training peak RSS MB | above start MB | building peak RSS MB | s/step |"
    print(head + (" accuracy |" if accuracy else ""))
    print("|" + " --- |" * (9 if accuracy else 8))
    for mode in MODES:
        f = facts[mode]
        row = (
            f"| {mode} | {f['params']:.2f} | {f['trainable']:,} | {f['bytes']:,} | "
            f"{f['peak-mb']:.0f} | {f['extra-mb']:.0f} | {f['build-mb']:.0f} | {f['step-s']:.2f} |"
        )
        print(row + (f" {f['accuracy']:.3f} |" if accuracy else ""))
    print("\nRatios (other / raffm-lora; > 1 means RaFFM+LoRA needs less):\n")
    print("| against | bytes | training peak RSS | above start | building peak RSS | s/step |")
    print("| --- | --- | --- | --- | --- | --- |")
    for mode in MODES[1:]:
        f = facts[mode]
        print(
            f"| {mode} | {f['bytes'] / ours['bytes']:.2f}x | {f['peak-mb'] / ours['peak-mb']:.2f}x"
            f" | {f['extra-mb'] / ours['extra-mb']:.2f}x | {f['build-mb'] / ours['build-mb']:.2f}x"
            f" | {f['step-s'] / ours['step-s']:.2f}x |"
        )
    print("\nPaper, Table 5 (LLaMA-2 + LoRA): 1.63x less memory for a 0.6-point accuracy loss.")


if __name__ == "__main__":
    main()
