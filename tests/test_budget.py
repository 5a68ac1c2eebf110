"""Budget strings, and the training-memory cost model against a measured step.

The memory test trains real models in fresh Python processes and compares the
peak resident memory of the training step with :func:`training_memory_mb`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import raffm_core as R
from raffm_core import Budget, BudgetError

REPO = Path(__file__).resolve().parent.parent

# --------------------------------------------------------------------------- parsing

PARSE_CASES = [
    pytest.param("params=0.6", Budget("params", 0.6, relative=True), id="fraction"),
    pytest.param("params=40M", Budget("params", 40_000_000.0), id="millions"),
    pytest.param("params=1500000", Budget("params", 1_500_000.0), id="plain-count"),
    pytest.param("params=1.5M", Budget("params", 1_500_000.0), id="fractional-millions"),
    pytest.param("memory-mb=900", Budget("memory-mb", 900.0), id="memory"),
]


@pytest.mark.parametrize(("text", "expected"), PARSE_CASES)
def test_parse(text, expected):
    budget = Budget.parse(text)
    assert budget == expected
    assert budget.relative is expected.relative
    assert Budget.parse(str(budget)) == budget


PARSE_ERRORS = [
    pytest.param("", id="empty"),
    pytest.param("params=", id="no-value"),
    pytest.param("params=-1", id="negative"),
    pytest.param("params=0", id="zero"),
    pytest.param("memory-mb=0", id="zero-memory"),
    pytest.param("flops=3", id="unknown-kind"),
    pytest.param("memory-mb=9G", id="memory-with-suffix"),
    # Above 1 without a suffix is an absolute count, and 1.5 is not whole.
    pytest.param("params=1.5", id="fractional-count"),
]


@pytest.mark.parametrize("text", PARSE_ERRORS)
def test_parse_rejects(text):
    with pytest.raises(BudgetError) as err:
        Budget.parse(text)
    assert repr(text) in str(err.value)


@pytest.mark.parametrize(
    "text, expected",
    [("memory-mb=900", 900.0), ("params=0.6", None), ("memory-mb=0", None), ("memory", None)],
)
def test_memory_mb_of_reads_only_valid_memory_budgets(text, expected):
    assert Budget.memory_mb_of(text) == expected


@pytest.mark.parametrize("value", [0.6, None, b"params=0.6"], ids=["float", "none", "bytes"])
def test_parse_rejects_non_strings(value):
    with pytest.raises(BudgetError, match=type(value).__name__):
        Budget.parse(value)


# --------------------------------------------------------------------- memory model

BATCH, SEQ, STEPS = 16, 64, 2
TOLERANCE = 0.30
"""The issue's bound on estimate vs. measured peak RSS of the whole process."""
PART_TOLERANCE = 0.20
"""Bound on the model-dependent part (peak minus the runtime measured in the
same process). The fixed runtime is a third of the total for MiniLM; without
this check a model that forgot the AdamW state would still pass at 30%."""

# Runs in a fresh interpreter, so the peak RSS is its own. After the imports it
# trains a tiny BERT (warming autograd and the kernels every model needs) and
# records the peak: the runtime. Then it builds the model under test, resets
# the peak (writing 5 to /proc/self/clear_refs), and takes AdamW steps: the
# peak that follows is the whole process at its largest while training, which
# is what a device must hold. Loading and extraction come before the reset, as
# on a client they happen before training.
WORKER = r"""
import gc, json, sys
import torch, transformers
import raffm_core as R
from tests.models import minilm_path, tiny_model

def peak_mb():
    # VmHWM, not ru_maxrss: ru_maxrss also keeps the parent's peak from before
    # the fork, so it would report pytest's memory, not ours.
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024

def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

def train(model, batch, seq, steps):
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=g)
        labels = torch.randint(0, model.config.num_labels, (batch,), generator=g)
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

which, batch, seq, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(1)
model = tiny_model("bert")
if which != "tiny":
    train(model, batch, seq, steps)
    del model
    gc.collect()
runtime_mb = peak_mb()
if which != "tiny":
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        minilm_path(), num_labels=2)
if which == "sub":
    spec = R.select_subnet(model, "params=0.75")
    sub = R.extract_submodel(model, spec)
    del model
    gc.collect()
    model = sub
layout = R.describe(model)
spec = R.spec_of(model) or layout.full_spec()
# SDPA falls back to the math kernel, which materializes the attention
# probabilities, whenever attention dropout is on in training.
materialized = (model.config._attn_implementation == "eager"
                or model.config.attention_probs_dropout_prob > 0)
profile = R.TrainingProfile(batch_size=batch, seq_len=seq, eager_attention=materialized)
gc.collect()
reset_peak()
train(model, batch, seq, steps)
print(json.dumps({
    "measured_mb": peak_mb(),
    "runtime_mb": runtime_mb,
    "estimate_mb": R.training_memory_mb(layout, spec, profile),
    "params": layout.count_params(spec),
    "full_params": layout.total_params,
}))
"""

CASES = ("tiny", "full", "sub")


@pytest.fixture(scope="module")
def measured():
    """Peak RSS of a training step of each case, measured concurrently."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    procs = {
        case: subprocess.Popen(
            [sys.executable, "-c", WORKER, case, str(BATCH), str(SEQ), str(STEPS)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for case in CASES
    }
    results = {}
    for case, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        if proc.returncode:
            raise RuntimeError(f"memory worker {case!r} failed:\n{err[-3000:]}")
        results[case] = json.loads(out.strip().splitlines()[-1])
    return results


linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"),
    reason="reads and resets the peak RSS through /proc/self (Linux)",
)


@linux_only
@pytest.mark.parametrize("case", CASES)
def test_memory_estimate_within_30_percent_of_measured_peak(measured, case):
    r = measured[case]
    ratio = r["estimate_mb"] / r["measured_mb"]
    assert 1 - TOLERANCE <= ratio <= 1 + TOLERANCE, (
        f"{case}: estimated {r['estimate_mb']:.0f} MB, measured peak RSS "
        f"{r['measured_mb']:.0f} MB (ratio {ratio:.2f})"
    )


@linux_only
@pytest.mark.parametrize("case", ["full", "sub"])
def test_memory_estimate_of_the_model_part(measured, case):
    r = measured[case]
    got = r["measured_mb"] - r["runtime_mb"]
    want = r["estimate_mb"] - R.budget.RUNTIME_OVERHEAD_MB
    assert abs(want / got - 1) <= PART_TOLERANCE, (
        f"{case}: model part estimated {want:.0f} MB, measured {got:.0f} MB "
        f"(peak {r['measured_mb']:.0f} MB minus runtime {r['runtime_mb']:.0f} MB)"
    )


@linux_only
def test_memory_cases_are_what_they_claim(measured):
    """The sub-model case really is about 75% of MiniLM, and MiniLM is full size."""
    full, sub = measured["full"], measured["sub"]
    assert full["params"] == full["full_params"] > 22_000_000
    assert 0.70 * full["params"] <= sub["params"] <= 0.75 * full["params"]
