"""The evidence benchmark's protocol, fixed test set, statistics and report (no runs)."""

from __future__ import annotations

import csv
import gzip
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("benchmark", ROOT / "scripts" / "benchmark.py")
benchmark = importlib.util.module_from_spec(_spec)
sys.modules["benchmark"] = benchmark
_spec.loader.exec_module(benchmark)

METHOD_KEYS = {
    "strategy",
    "salience-norm",
    "selection-mode",
    "rolling-step",
    "rolling-tail",
    "fedavg-train-all",
}
RECIPE_CANDIDATES = {"raffm-scaler", "heterofl-scaler", "raffm-tail50-scaler"}
"""Candidate rows that try another recipe value (``width-scaler``) on validation."""
"""Run-config keys that make a row the method it is; every other key is the shared recipe."""


@pytest.fixture(scope="module")
def protocol():
    return benchmark.load_protocol(benchmark.PROTOCOL)


def test_every_row_but_the_labelled_ablation_trims_the_vocabulary(protocol):
    for name, row in protocol.rows.items():
        extra = set(row.config) - METHOD_KEYS
        if name in RECIPE_CANDIDATES:
            assert row.kind == "candidate" and extra == {"width-scaler"}
        elif name == "raffm-whole-vocab":
            assert row.kind == "ablation" and row.config["vocab-trim"] is False
            assert extra == {"vocab-trim"}
        else:
            assert not extra, f"row {name} differs from the recipe in {extra}"
    assert protocol.recipe["vocab-trim"] is True


def test_tight_federations_bind_and_loose_ones_are_kept(protocol):
    assert {
        "cross-device-100-tight",
        "cross-silo-10-tight",
        "cross-device-100",
        "cross-silo-10",
    } <= set(protocol.federations)
    for name in ("cross-device-100-tight", "cross-silo-10-tight"):
        assert protocol.federations[name].config["budget-profile"] == (
            "params=0.30,params=0.35,params=0.40"
        )
    assert len(protocol.seeds) >= 5


def test_an_unknown_run_config_key_names_its_entry(tmp_path, protocol):
    text = benchmark.PROTOCOL.read_text().replace(
        'strategy = "heterofl"', 'strategy = "heterofl"\nlearning-rate = 1e-3'
    )
    path = tmp_path / "protocol.toml"
    path.write_text(text)
    with pytest.raises(benchmark.ProtocolError, match=r"row heterofl has unknown .*learning-rate"):
        benchmark.load_protocol(path)


def test_the_test_set_is_fixed_stratified_and_disjoint_from_training(tmp_path, protocol):
    source = tmp_path / "corpus.csv"
    with open(source, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["label", "text"])
        writer.writerows([[1 if i % 4 else -1, f"sentence {i}"] for i in range(400)])
    test_set = {"source": str(source), "examples": 100, "seed": 0, "folder": str(tmp_path / "d")}
    mine = benchmark.Protocol(
        protocol.path, [1, 2], test_set, protocol.recipe, protocol.federations, protocol.rows
    )
    train, test = benchmark.prepare_data(mine)
    first = test.read_text()
    with open(test) as f:
        rows = list(csv.reader(f))[1:]
    with open(train) as f:
        train_rows = list(csv.reader(f))[1:]
    assert len(rows) == 100 and len(train_rows) == 300
    assert sum(r[0] == "-1" for r in rows) == 25  # the corpus's label shares
    assert not {r[1] for r in rows} & {r[1] for r in train_rows}
    test.unlink()
    assert benchmark.prepare_data(mine)[1].read_text() == first  # the same draw again
    a, _ = benchmark.run_config(mine, "cross-silo-10-tight", "raffm", 1, False, {})
    b, _ = benchmark.run_config(mine, "cross-silo-10-tight", "heterofl", 2, False, {})
    assert a["test-split"] == b["test-split"] == str(test)
    assert a["eval-max-examples"] == 0  # scored whole


def test_centralized_is_one_node_with_the_federations_steps_a_round(protocol):
    config, nodes = benchmark.run_config(
        protocol, "cross-device-100-tight", "centralized", 1, False, {}
    )
    fed = protocol.federations["cross-device-100-tight"].config
    assert nodes == 1 and config["partitioner"] == "iid"
    assert config["local-steps"] == fed["min-train-nodes"] * protocol.recipe["local-steps"]


def test_t_interval_matches_the_textbook_formula():
    mean, lo, hi = benchmark.t_interval([0.01, 0.02, 0.03])
    half = 4.302652729911275 * 0.01 / math.sqrt(3)  # t(0.975, df=2)
    assert mean == pytest.approx(0.02)
    assert (lo, hi) == pytest.approx((0.02 - half, 0.02 + half))
    assert benchmark.t_interval([0.5]) is None


def _fake_run(out: Path, row: str, seed: int, accuracy: float, config: dict) -> None:
    folder = benchmark.run_dir(out, "cross-silo-10-tight", row, seed)
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(
        json.dumps({"final-accuracy": accuracy, "mean-client-params-fraction": 0.35})
    )
    rounds = [
        {"round": 0, "accuracy": 0.5},
        {
            "round": 1,
            "accuracy": accuracy,
            "clients": [
                {
                    "bytes-down": 10,
                    "bytes-up": 10,
                    "body-fraction": 0.6,
                    "fused": 1,
                    "status": "accepted",
                },
                {
                    "bytes-down": 10,
                    "bytes-up": 10,
                    "body-fraction": 0.8,
                    "fused": 0,
                    "status": "accepted",
                },
            ],
        },
    ]
    with gzip.open(folder / "rounds.json.gz", "wt") as f:
        json.dump(rounds, f)
    (folder / "run-config.json").write_text(json.dumps({**config, "seed": seed}))
    tiers = [{"budget": "params=0.3", "body-fraction": 0.55, "accuracy": accuracy - 0.1}]
    (folder / "tiers.json").write_text(json.dumps(tiers))
    (folder / benchmark.DONE).write_text(json.dumps({"wall-time-s": 60.0}))


def test_the_report_pairs_seeds_counts_wins_and_diffs_configs(tmp_path, protocol):
    mine = benchmark.Protocol(
        protocol.path,
        [1, 2, 3],
        protocol.test_set,
        protocol.recipe,
        protocol.federations,
        protocol.rows,
    )
    raffm = {1: 0.80, 2: 0.70, 3: 0.75}
    hetero = {1: 0.78, 2: 0.71, 3: 0.70}
    for seed in raffm:
        _fake_run(tmp_path, "raffm", seed, raffm[seed], {"strategy": "raffm", "lr": 1e-4})
        _fake_run(tmp_path, "heterofl", seed, hetero[seed], {"strategy": "heterofl", "lr": 1e-4})
    benchmark.plot = lambda *a, **k: None  # no figures in a unit test
    records = benchmark.report(tmp_path, mine, ["cross-silo-10-tight"], ["raffm", "heterofl"], [])
    assert len(records) == 6 and records[0]["left-out"] == 1
    assert records[0]["body-fraction"] == pytest.approx(0.7)
    text = (tmp_path / "summary.md").read_text()
    diffs = [hetero[s] - raffm[s] for s in (1, 2, 3)]
    mean, lo, hi = benchmark.t_interval(diffs)
    assert f"{mean:+.4f} [{lo:+.4f}, {hi:+.4f}] (inside the noise)" in text
    assert "| 1 of 3 |" in text
    assert '`strategy="heterofl"`' in text and "`lr=" not in text
    with open(tmp_path / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 6
