"""A ``memory-mb`` budget bounds the node's whole process (issue 12, "Budgets are promises").

The node reports the RSS its process holds besides a training step
(``baseline-mb``) with its budget and in its train replies; the server fits
the step into what is left. The oracle for a fitted spec is the memory model
itself with the budget shifted by the baseline's excess over the fresh
process the model assumes.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import transformers as T
from flwr.app import ArrayRecord, ConfigRecord

from raffm_core import SubnetSpec, TrainingProfile, describe, select_subnet
from raffm_core.budget import RUNTIME_OVERHEAD_MB, STEP_WORKSPACE_MB, training_memory_mb
from raffm_core.families import attention_materialized
from raffm_core.task.config import ConfigError, RunConfig
from raffm_core.task.keys import BASELINE_MB, CONFIG, PEAK_MEMORY_MB, SPEC
from server_app.app import build_strategy
from server_app.baselines import FullModelFedAvg, HeteroFL
from server_app.memory import format_memory_table, memory_rows
from server_app.outputs import write_outputs
from server_app.records import ClientRound, RoundLog
from server_app.strategy import RaFFM
from tests.fakes import NODES, FakeGrid, make_strategy, respond_with
from tests.models import tiny_model

pytestmark = pytest.mark.usefixtures("flower_task")

BASELINE = 1000.0
"""A node process's RSS besides the step, well above a fresh process's."""

PROFILE = TrainingProfile(batch_size=16, seq_len=64)


def shift(baseline: float) -> float:
    """MB the memory model adds for a process holding ``baseline`` (over a fresh one)."""
    return max(0.0, baseline + STEP_WORKSPACE_MB - RUNTIME_OVERHEAD_MB)


def between_budget(model, baseline: float, profile: TrainingProfile = PROFILE) -> float:
    """A budget the full model fits without ``baseline``, but not with it."""
    layout = describe(model)
    with_baseline = profile.with_baseline(baseline)
    full = training_memory_mb(layout, layout.full_spec(), with_baseline)
    smallest = training_memory_mb(
        layout, SubnetSpec.uniform(layout.num_layers, 1, 1), with_baseline
    )
    assert smallest < full
    return round((smallest + full) / 2, 3)


def train_round(strategy: RaFFM, grid: FakeGrid, model, server_round: int = 1):
    """Configure a round, let the grid answer, aggregate; the spec each node was sent."""
    messages = list(
        strategy.configure_train(
            server_round, ArrayRecord(model.state_dict()), ConfigRecord(), grid
        )
    )
    strategy.aggregate_train(server_round, grid.send_and_receive(messages))
    return {m.metadata.dst_node_id: SubnetSpec.from_json(m.content[CONFIG][SPEC]) for m in messages}


# ------------------------------------------------------------------ the memory model


@pytest.mark.parametrize("baseline", [0.0, 200.0, 367.0, 600.0, 2500.0])
def test_a_baseline_adds_its_excess_over_a_fresh_process(model, baseline):
    layout = describe(model)
    spec = layout.full_spec()
    plain = training_memory_mb(layout, spec, PROFILE)
    held = training_memory_mb(layout, spec, PROFILE.with_baseline(baseline))
    assert held - plain == pytest.approx(shift(baseline))
    assert held >= plain  # never less room than a fresh process


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf, "600"], ids=["neg", "nan", "inf", "str"])
def test_a_bad_baseline_is_an_error_naming_it(bad):
    with pytest.raises(Exception, match="baseline_mb"):
        PROFILE.with_baseline(bad)


@pytest.mark.parametrize(
    "config, materialized",
    [
        pytest.param(T.BertConfig(), True, id="bert-attention-dropout"),
        pytest.param(T.BertConfig(attention_probs_dropout_prob=0.0), False, id="bert-no-dropout"),
        pytest.param(T.DistilBertConfig(), True, id="distilbert"),
        pytest.param(T.GPT2Config(), True, id="gpt2-attn-pdrop"),
        pytest.param(T.LlamaConfig(), False, id="llama-no-dropout"),
        pytest.param(T.T5Config(), True, id="t5-dropout-rate"),
    ],
)
def test_attention_is_materialized_with_attention_dropout(config, materialized):
    config._attn_implementation = "sdpa"
    assert attention_materialized(config) is materialized
    config._attn_implementation = "eager"
    assert attention_materialized(config) is True


def test_the_server_checks_memory_against_materialized_attention_when_the_model_has_dropout():
    """MiniLM trains with attention dropout: SDPA's CPU math kernel keeps the probabilities."""
    model = tiny_model("bert")
    model.config.attention_probs_dropout_prob = 0.1
    strategy = build_strategy(RunConfig(), model)
    assert strategy.profile.eager_attention is True
    model.config.attention_probs_dropout_prob = 0.0
    assert build_strategy(RunConfig(), model).profile.eager_attention is False


# ---------------------------------------------------------------- fitting per node


def test_a_node_with_a_large_baseline_gets_a_smaller_sub_model(model):
    budget = between_budget(model, BASELINE)
    nodes = {
        101: (f"memory-mb={budget}", 0),  # reports no baseline: a fresh process
        202: (f"memory-mb={budget}", 1, BASELINE),
    }
    strategy = make_strategy(model, profile=PROFILE, min_available_nodes=2)
    grid = FakeGrid(nodes, respond_with(budgets=nodes))
    strategy.query_budgets(grid)
    specs = train_round(strategy, grid, model)
    layout = describe(model)
    assert specs[101] == layout.full_spec()
    # the oracle: the same budget, less the baseline's excess, for a fresh process
    expected = select_subnet(layout, f"memory-mb={budget - shift(BASELINE)}", profile=PROFILE)
    assert specs[202] == expected != layout.full_spec()
    client = next(c for c in strategy.history[1].clients if c.node_id == 202)
    assert client.fit_baseline_mb == BASELINE
    assert client.predicted_mb == pytest.approx(
        training_memory_mb(layout, expected, PROFILE) + shift(BASELINE)
    )
    assert client.predicted_mb <= budget


def test_a_baseline_does_not_change_a_params_budget(model):
    nodes = {101: ("params=0.75", 0), 202: ("params=0.75", 1, 5000.0)}
    strategy = make_strategy(model, profile=PROFILE, min_available_nodes=2)
    grid = FakeGrid(nodes, respond_with(budgets=nodes))
    strategy.query_budgets(grid)
    specs = train_round(strategy, grid, model)
    assert specs[101] == specs[202]


def test_a_baseline_above_the_budget_skips_the_node_naming_both(model, flwr_logs):
    nodes = {**NODES, 202: ("memory-mb=900", 1, 1234.0)}
    strategy = make_strategy(model, profile=PROFILE)
    strategy.query_budgets(FakeGrid(nodes, respond_with(budgets=nodes)))
    assert 202 not in strategy.nodes
    reason = strategy.skipped[202]
    assert "memory-mb=900" in reason and "1,234 MB" in reason and "baseline-mb" in reason
    assert any(r.getMessage() == f"node 202 skipped: {reason}" for r in flwr_logs.records)


def test_a_baseline_that_leaves_no_room_for_the_smallest_step_names_it(model):
    budget = BASELINE + STEP_WORKSPACE_MB - 1  # below the budget, but no step fits
    nodes = {**NODES, 202: (f"memory-mb={budget}", 1, BASELINE)}
    strategy = make_strategy(model, profile=PROFILE)
    strategy.query_budgets(FakeGrid(nodes, respond_with(budgets=nodes)))
    reason = strategy.skipped[202]
    assert "below the smallest sub-network" in reason and "1,000 MB" in reason


@pytest.mark.parametrize("bad", [-5.0, math.nan, "lots"], ids=["negative", "nan", "string"])
def test_a_malformed_baseline_skips_the_node_naming_the_key(model, bad):
    nodes = {**NODES, 202: ("memory-mb=2000", 1, bad)}
    strategy = make_strategy(model, profile=PROFILE)
    strategy.query_budgets(FakeGrid(nodes, respond_with(budgets=nodes)))
    assert "'baseline-mb'" in strategy.skipped[202] and repr(bad) in strategy.skipped[202]


def test_a_larger_baseline_in_a_train_reply_shrinks_later_rounds(model, flwr_logs):
    """A Ray actor or a long-lived process holds more after earlier rounds."""
    budget = between_budget(model, BASELINE)
    nodes = {101: (f"memory-mb={budget}", 0, 300.0), 202: ("params=1.0", 1)}
    strategy = make_strategy(model, profile=PROFILE, min_available_nodes=2)
    grid = FakeGrid(nodes, respond_with(budgets=nodes, train_baselines={101: BASELINE}))
    strategy.query_budgets(grid)
    layout = describe(model)
    first = train_round(strategy, grid, model, 1)
    assert strategy.nodes[101].baseline_mb == BASELINE
    second = train_round(strategy, grid, model, 2)
    assert first[101] == layout.full_spec()
    expected = select_subnet(layout, f"memory-mb={budget - shift(BASELINE)}", profile=PROFILE)
    assert second[101] == expected != first[101]
    assert strategy.history[2].clients[0].fit_baseline_mb == BASELINE
    assert any("holds 1000 MB besides a step" in r.getMessage() for r in flwr_logs.records)


@pytest.mark.parametrize("cls", [FullModelFedAvg, HeteroFL], ids=["fedavg", "heterofl"])
def test_the_peers_fit_the_same_baseline(model, cls):
    budget = between_budget(model, BASELINE)
    nodes = {101: (f"memory-mb={budget}", 0), 202: (f"memory-mb={budget}", 1, BASELINE)}
    strategy = make_strategy(model, cls=cls, profile=PROFILE, min_available_nodes=2)
    grid = FakeGrid(nodes, respond_with(budgets=nodes))
    strategy.query_budgets(grid)
    specs = train_round(strategy, grid, model)
    full = describe(model).full_spec()
    assert specs[101] == full
    if cls is FullModelFedAvg:
        assert 202 not in specs and "over the budget" in strategy.history[1].excluded[202]
    else:
        assert describe(model).count_params(specs[202]) < describe(model).count_params(full)


# ------------------------------------------------------------- margin and records


@pytest.mark.parametrize("margin", [0.0, 0.25, 1.0])
def test_the_margin_scales_the_step_but_not_the_process(model, margin):
    layout = describe(model)
    spec = layout.full_spec()
    held = PROFILE.with_baseline(BASELINE)
    plain = training_memory_mb(layout, spec, held)
    padded = training_memory_mb(layout, spec, dataclasses.replace(held, margin=margin))
    step = plain - held.runtime_mb
    assert padded == pytest.approx(held.runtime_mb + (1 + margin) * step)


def test_the_fit_keeps_the_margin_and_records_the_plain_estimate(model):
    profile = dataclasses.replace(PROFILE, margin=0.5)
    budget = between_budget(model, BASELINE, profile)
    nodes = {101: (f"memory-mb={budget}", 0, BASELINE), 202: ("params=1.0", 1)}
    strategy = make_strategy(model, profile=profile, min_available_nodes=2)
    grid = FakeGrid(nodes, respond_with(budgets=nodes))
    strategy.query_budgets(grid)
    spec = train_round(strategy, grid, model)[101]
    layout = describe(model)
    held = PROFILE.with_baseline(BASELINE)
    plain = training_memory_mb(layout, spec, held)
    client = next(c for c in strategy.history[1].clients if c.node_id == 101)
    assert client.predicted_mb == pytest.approx(plain)
    assert held.runtime_mb + 1.5 * (plain - held.runtime_mb) <= budget
    assert spec == select_subnet(
        layout, f"memory-mb={budget}", profile=profile.with_baseline(BASELINE)
    )


def test_build_strategy_takes_the_margin_from_the_run_config():
    strategy = build_strategy(RunConfig(memory_margin=0.4), tiny_model("bert"))
    assert strategy.profile.margin == 0.4
    with pytest.raises(ConfigError, match="memory-margin"):
        RunConfig(memory_margin=-0.1)


def client_round(node, partition, budget, peak, baseline, predicted, fit_baseline=None):
    spec = SubnetSpec.uniform(2, 1, 1)
    metrics = {PEAK_MEMORY_MB: peak} if peak is not None else {}
    if baseline is not None:
        metrics[BASELINE_MB] = baseline
    client = ClientRound(node, partition, budget, spec, 10, 0.5, 100, 100, "accepted", "", metrics)
    client.fit_baseline_mb, client.predicted_mb = fit_baseline, predicted
    return client


HISTORY = {
    1: RoundLog(
        1,
        0.0,
        [
            client_round(7, 1, "memory-mb=1500", 1400.0, 700.0, 1390.0, 650.0),
            client_round(9, 0, "params=0.5", 900.0, 600.0, 880.0, 600.0),
        ],
    ),
    2: RoundLog(
        2,
        0.0,
        [
            client_round(7, 1, "memory-mb=1500", 1620.0, 1100.0, 1450.0, 700.0),
            client_round(9, 0, "params=0.5", None, None, 880.0),  # a reply without a peak
        ],
    ),
}


def test_the_rows_per_node_hold_budget_baselines_predictions_and_peaks():
    rows = memory_rows(HISTORY)
    assert [(r.label, r.budget_mb) for r in rows] == [("p0", None), ("p1", 1500.0)]
    p1 = rows[1]
    assert (p1.query_baseline_mb, p1.train_baseline_mb) == (650.0, [700.0, 1100.0])
    assert (p1.predicted_mb, p1.peak_mb, p1.over_budget) == ([1390.0, 1450.0], [1400.0, 1620.0], 1)
    table = format_memory_table(rows).splitlines()
    assert table[2] == "| p0 | params=0.5 | 600 | 600 | 880 | 900 | - |"
    assert table[3] == "| p1 | memory-mb=1500 | 650 | 700-1100 | 1390-1450 | 1400-1620 | 1.08 |"


def test_the_run_writes_the_memory_plot_and_counts_rounds_over_budget(tmp_path):
    summary = write_outputs(tmp_path, RunConfig(), HISTORY, {}, "accuracy", 1000, 1.0)
    assert (tmp_path / "memory-budget.png").stat().st_size > 0
    assert summary["client-rounds-over-memory-budget"] == 1
    rounds = json.loads((tmp_path / "rounds.json").read_text())
    first = rounds[0]["clients"][0]
    assert (first["fit-baseline-mb"], first["predicted-mb"], first[BASELINE_MB]) == (
        650.0,
        1390.0,
        700.0,
    )
    back = RoundLog.from_dict(rounds[0]).clients[0]
    assert (back.fit_baseline_mb, back.predicted_mb, back.metrics) == (
        650.0,
        1390.0,
        {PEAK_MEMORY_MB: 1400.0, BASELINE_MB: 700.0},
    )


def test_a_checkpoint_from_before_baselines_still_loads():
    entry = HISTORY[1].clients[0].to_dict()
    del entry["fit-baseline-mb"], entry["predicted-mb"]
    client = ClientRound.from_dict(entry)
    assert client.fit_baseline_mb is None and client.predicted_mb is None
