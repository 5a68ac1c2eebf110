"""scripts/compare.py: the figures it reads back from a run's outputs, and its tables.

The runs themselves go through ``scripts/run_local.sh`` (``flwr run``), which
``--quick`` exercises; here fake run folders with known numbers are the oracle.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("compare_script", ROOT / "scripts" / "compare.py")
compare = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = compare  # dataclasses look their module up there
_spec.loader.exec_module(compare)

MB = 2**20


def client(bytes_each_way, status="accepted", time_s=2.0, memory=100.0):
    return {
        "bytes-down": bytes_each_way,
        "bytes-up": bytes_each_way if status == "accepted" else 0,
        "status": status,
        "train-time-s": time_s,
        "peak-memory-mb": memory,
    }


def write_run(path: Path, accuracies, clients_per_round, excluded=0):
    """A run folder as server_app.outputs writes it, with hand-chosen numbers."""
    path.mkdir(parents=True)
    rounds = [{"round": 0, "accuracy": accuracies[0]}]
    for r, (acc, clients) in enumerate(zip(accuracies[1:], clients_per_round, strict=True), 1):
        rounds.append({"round": r, "accuracy": acc, "clients": clients})
    everyone = [c for cs in clients_per_round for c in cs]
    mean_bytes = (
        sum(c["bytes-down"] + c["bytes-up"] for c in everyone) / len(everyone) if everyone else None
    )
    summary = {
        "final-accuracy": accuracies[-1],
        "best-accuracy": max(accuracies),
        "primary-metric": "accuracy",
        "mean-client-params-fraction": 0.7 if everyone else None,
        "mean-bytes-per-client-round": mean_bytes,
        "communication-ratio": mean_bytes / (8 * MB) if everyone else None,
        "clients-excluded": excluded,
        "wall-time-s": 12.0,
    }
    (path / "rounds.json").write_text(json.dumps(rounds))
    (path / "summary.json").write_text(json.dumps(summary))
    return path


def test_bytes_to_target_sum_every_round_up_to_the_first_that_reaches_it(tmp_path):
    run = write_run(
        tmp_path / "a",
        [0.5, 0.6, 0.8, 0.7],
        [[client(MB), client(2 * MB)], [client(MB)], [client(4 * MB)]],
    )
    row = compare.read_row("a", run, target=0.75)
    assert row.bytes_to_target == (2 * MB + 4 * MB) + 2 * MB  # rounds 1 and 2, down + up
    assert [p[2] for p in row.curve] == [0, 6 * MB, 8 * MB, 16 * MB]
    assert compare.read_row("a", run, target=0.9).bytes_to_target is None
    assert compare.read_row("a", run, target=0.5).bytes_to_target == 0  # the initial model


def test_client_means_count_accepted_replies_only(tmp_path):
    run = write_run(
        tmp_path / "b",
        [0.5, 0.6],
        [[client(MB, time_s=1.0, memory=10), client(MB, time_s=3.0, memory=30),
          client(MB, status="rejected", time_s=100.0, memory=1000)]],
    )  # fmt: skip
    row = compare.read_row("b", run, target=0.9)
    assert row.train_time_s == pytest.approx(2.0)
    assert row.peak_memory_mb == pytest.approx(20.0)


def test_a_run_that_trained_nobody_has_a_row_with_missing_figures(tmp_path):
    run = write_run(tmp_path / "c", [0.5, 0.5, 0.5], [[], []], excluded=10)
    row = compare.read_row("fedavg", run, target=0.75)
    cells = dict(zip(compare.COLUMNS, compare.table_cells(row), strict=True))
    assert cells["clients excluded"] == "10"
    assert cells["mean client params fraction"] == "n/a"
    assert cells["total MB to target"] == "not reached"
    assert cells["final accuracy"] == "0.5000"


def test_tables_have_one_row_per_strategy_and_every_column(tmp_path):
    rows = [
        compare.read_row(name, write_run(tmp_path / name, [0.5, acc], [[client(MB)]]), target=0.75)
        for name, acc in (("raffm", 0.8), ("heterofl", 0.7))
    ]
    compare.write_tables(rows, tmp_path, "header")
    with (tmp_path / "comparison.csv").open() as f:
        table = list(csv.reader(f))
    assert table[0] == list(compare.COLUMNS)
    assert [r[0] for r in table[1:]] == ["raffm", "heterofl"]
    assert table[1][compare.COLUMNS.index("total MB to target")] == "2"
    assert table[2][compare.COLUMNS.index("total MB to target")] == "not reached"
    md = (tmp_path / "comparison.md").read_text().splitlines()
    assert len([line for line in md if line.startswith("| ")]) == 4  # header, rule, 2 rows


@pytest.mark.parametrize(
    ("value", "literal"),
    [(True, "true"), (3, "3"), (1e-4, "0.0001"), ("params=0.6,params=1", '"params=0.6,params=1"')],
    ids=["bool", "int", "float", "str"],
)
def test_overrides_become_toml_literals(value, literal):
    assert compare.toml_value(value) == literal


@pytest.mark.parametrize("bad", ['strategy="fedavg"', 'dataset="x.csv"', "lr"])
def test_set_rejects_keys_the_script_owns_and_malformed_pairs(bad):
    with pytest.raises(SystemExit, match="--set"):
        compare.parse_sets([bad])


def test_unknown_rows_and_keys_fail_before_any_run(tmp_path, capsys):
    with pytest.raises(SystemExit):
        compare.main(["--strategies", "raffm,fedsgd", "--out", str(tmp_path)])
    assert "fedsgd" in capsys.readouterr().err
    with pytest.raises(Exception, match="no-such-key"):
        compare.main(["--set", "no-such-key=1", "--out", str(tmp_path)])
    assert not (tmp_path / "runs").exists()


def test_the_ablation_runs_as_the_script_the_benchmark_calls(tmp_path, monkeypatch, capsys):
    """compare.run_ablation: ``ablation_zero_shot.py MODEL --budget B --samples N --out DIR``."""
    from tests.assets import save_tiny_bert, write_polarity_csv

    model = save_tiny_bert(tmp_path / "raffm" / "final-model")
    data = write_polarity_csv(tmp_path / "polarity.csv", 60)
    run_config = {"dataset": str(data), "model-name": str(model), "max-length": 16}
    (tmp_path / "raffm" / "run-config.json").write_text(json.dumps(run_config))
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the script imports this checkout's code
    assert compare.run_ablation(model, "params=0.8", 2, 10, tmp_path / "ablation")
    saved = json.loads((tmp_path / "ablation" / "ablation.json").read_text())
    assert saved["samples"] == 2 and saved["held-out-examples"] == 10
    assert saved["budget"] == "params=0.8"
    assert capsys.readouterr().out.count("[ablation] sub-model ") == 2
    assert not compare.run_ablation(tmp_path / "nowhere", "params=0.8", 2, 10, tmp_path / "x")
    assert "run-config" in (tmp_path / "ablation.log").read_text()
