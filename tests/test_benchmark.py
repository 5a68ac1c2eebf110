"""scripts/benchmark.py's bookkeeping: tables from run folders, and runs with lost replies.

The runs are folders written here with hand-chosen numbers; the expected
figures (means, sample standard deviations, paired differences) are worked
out by hand in the tests.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location(
    "benchmark_script", ROOT / "scripts" / "benchmark.py"
)
benchmark = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = benchmark
_spec.loader.exec_module(benchmark)

FED = "cross-silo-10"


def write_run(out: Path, row: str, seed: int, final: float, chosen: float, statuses=("accepted",)):
    folder = benchmark.run_dir(out, FED, row, seed)
    folder.mkdir(parents=True)
    clients = [{"status": s, "bytes-down": 10, "bytes-up": 10} for s in statuses]
    rounds = [{"round": 0, "accuracy": 0.5}, {"round": 1, "accuracy": final, "clients": clients}]
    summary = {
        "rounds": 1,
        "final-accuracy": final,
        "best-round": 1,
        "best-accuracy": chosen,
        "mean-client-params-fraction": 0.7,
        "communication-ratio": 0.7,
        "clients-excluded": 0,
    }
    (folder / "rounds.json").write_text(json.dumps(rounds))
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "run.log").write_text("WARNING : reply from node 7 rejected: error reply (OOM)\n")
    return folder


def test_summary_has_mean_sd_paired_differences_and_gap_to_the_ceiling(tmp_path):
    for seed, (r, h, c) in enumerate([(0.70, 0.72, 0.80), (0.60, 0.55, 0.80), (0.80, 0.83, 0.86)]):
        write_run(tmp_path, "raffm", seed + 1, r, r)
        write_run(tmp_path, "heterofl", seed + 1, h, h - 0.01)
        write_run(tmp_path, "centralized", seed + 1, c, c)
    rows = ["raffm", "heterofl", "centralized"]
    records = benchmark.report(tmp_path, [FED], rows, [1, 2, 3], [])
    assert len(records) == 9
    with open(tmp_path / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [(t["strategy"], t["seed"], t["final-accuracy"]) for t in table[:2]] == [
        ("raffm", "1", "0.7000"),
        ("raffm", "2", "0.6000"),
    ]
    lines = {line.split(" | ")[0]: line for line in benchmark.summary_table(records, FED, rows)}
    hetero = lines["| heterofl"]
    # mean (0.72+0.55+0.83)/3 = 0.700; sd = sqrt(((.02)^2+(.15)^2+(.13)^2)/2) = 0.1411
    assert "0.700 ± 0.141" in hetero
    assert "0.690 ± 0.141" in hetero  # at the round chosen on validation
    assert "1: +0.020, 2: -0.050, 3: +0.030" in hetero and "2 of 3" in hetero
    # ceiling mean (0.80+0.80+0.86)/3 = 0.82; raffm mean 0.70 -> gap -0.120
    assert lines["| raffm"].endswith("| -0.120 |")


def test_a_run_with_rejected_replies_is_counted_and_its_reasons_read(tmp_path):
    clean = write_run(tmp_path, "raffm", 1, 0.7, 0.7)
    lossy = write_run(tmp_path, "heterofl", 1, 0.5, 0.5, ("accepted", "rejected", "rejected"))
    assert benchmark.rejected_replies(clean) == 0
    assert benchmark.rejected_replies(lossy) == 2
    assert "error reply (OOM)" in benchmark.rejected_reasons(lossy)


def test_set_aside_runs_are_not_reported(tmp_path):
    folder = write_run(tmp_path, "raffm", 1, 0.7, 0.7)
    folder.rename(folder.with_name("seed-1.set-aside-20261202-101500"))
    assert benchmark.collect(tmp_path, [FED], ["raffm"], [1]) == []


@pytest.mark.parametrize("row", ["raffm-tail", "heterofl-scaler"])
def test_variant_rows_differ_from_their_base_only_in_their_keys(row):
    """(The ``raffm`` row also keeps its final model, for the zero-shot ablation.)"""
    base = benchmark.run_overrides(FED, benchmark.VARIANTS[row]["strategy"], 1, False, {})
    variant = benchmark.run_overrides(FED, row, 1, False, {})
    changed = {k: v for k, v in variant.items() if base.get(k) != v and k != "save-models"}
    declared = {k: v for k, v in benchmark.VARIANTS[row].items() if k != "strategy"}
    assert changed == {k: v for k, v in declared.items() if base.get(k) != v}
    assert changed, "a variant identical to its base row measures nothing"


@pytest.mark.parametrize(
    "row, profile, expected",
    [
        ("fedavg", "params=0.6,params=0.7,params=0.8", True),  # nobody trains: scored untrained
        ("fedavg", "params=0.6,params=1.0", False),  # the full-budget clients train
        ("fedavg", "memory-mb=900", False),  # memory budgets: the run decides
        ("fedavg-train-all", "params=0.6", False),  # trains everyone regardless
        ("heterofl", "params=0.6", False),
    ],
)
def test_fedavg_without_a_client_that_holds_the_full_model_is_scored_untrained(
    row, profile, expected
):
    overrides = benchmark.run_overrides(FED, row, 1, False, {"budget-profile": profile})
    assert benchmark.nobody_holds_the_full_model(overrides) is expected


def test_zero_shot_table_reports_each_seeds_medians_and_which_is_higher(tmp_path):
    for seed, (pri, rnd) in enumerate([(0.70, 0.55), (0.60, 0.60), (0.50, 0.52)], start=1):
        folder = write_run(tmp_path, "raffm", seed, 0.7, 0.7) / "zero-shot"
        folder.mkdir()
        stats = {"prioritized": {"median": pri}, "unprioritized": {"median": rnd}}
        (folder / "ablation.json").write_text(json.dumps({"full-model": 0.75, "stats": stats}))
    lines = benchmark.zero_shot_table(tmp_path, [FED], ["raffm"], [1, 2, 3, 4])
    rows = [line for line in lines if line.startswith(f"| {FED}")]
    assert rows == [
        f"| {FED} | raffm | 1 | weights (L1) |  | 0.7500 | 0.7000 | 0.5500 | prioritized |",
        f"| {FED} | raffm | 2 | weights (L1) |  | 0.7500 | 0.6000 | 0.6000 | tie |",
        f"| {FED} | raffm | 3 | weights (L1) |  | 0.7500 | 0.5000 | 0.5200 | random order |",
    ]
    assert benchmark.zero_shot_table(tmp_path / "none", [FED], ["raffm"], [1]) == []
    # A run without a final model gets no ablation (and no error).
    write_run(tmp_path, "raffm", 5, 0.7, 0.7)
    assert benchmark.zero_shot(tmp_path, FED, "raffm", 5, quick=True) is None
    assert benchmark.keeps_models("raffm") and not benchmark.keeps_models("heterofl")


def test_quick_runs_every_row_on_a_small_federation():
    for name in benchmark.FEDERATIONS:
        fed = benchmark.federation_of(name, quick=True)
        assert fed.nodes == min(benchmark.FEDERATIONS[name].nodes, benchmark.QUICK_NODES)
        assert fed.overrides["min-available-nodes"] == fed.nodes and fed.rounds == 2
        assert benchmark.federation_of(name, quick=False) is benchmark.FEDERATIONS[name]
    overrides = benchmark.run_overrides("cross-device-100", "raffm", 1, True, {})
    assert overrides["num-server-rounds"] == 2 and overrides["local-steps"] == 1
