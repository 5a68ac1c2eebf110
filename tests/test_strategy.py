"""The RaFFM strategy against fake replies (tests/fakes.py), no Flower runtime."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord

from raffm_core import ServerOptimizer, SubnetSpec, base_config, describe
from raffm_core.task.keys import ARRAYS, BASE_CONFIG, CONFIG, PROXIMAL_MU, SERVER_ROUND, SPEC
from server_app.strategy import RaFFM
from tests.fakes import (
    DELTAS,
    NODES,
    REPLY_KINDS,
    WEIGHTS,
    FakeGrid,
    make_strategy,
    respond_with,
    train_reply,
)
from tests.models import tiny_model

pytestmark = pytest.mark.usefixtures("flower_task")


def run_round(strategy: RaFFM, grid: FakeGrid, arrays: ArrayRecord, server_round: int = 1):
    if not strategy.nodes:
        strategy.query_budgets(grid)
    messages = list(strategy.configure_train(server_round, arrays, ConfigRecord({"lr": 0.1}), grid))
    replies = grid.send_and_receive(messages)
    return messages, strategy.aggregate_train(server_round, replies)


def sent_state(message: Message) -> dict[str, torch.Tensor]:
    return dict(message.content[ARRAYS].to_torch_state_dict())


def test_each_node_gets_its_own_spec_and_the_leading_slices(model):
    strategy = make_strategy(model)
    grid = FakeGrid(NODES, respond_with())
    messages, _ = run_round(strategy, grid, ArrayRecord(model.state_dict()))
    assert {m.metadata.dst_node_id for m in messages} == set(NODES)
    assert all(m.metadata.message_type == MessageType.TRAIN for m in messages)
    by_node = {m.metadata.dst_node_id: m for m in messages}
    full = sent_state(by_node[303])  # the full budget receives the whole prioritized model
    sizes = {}
    for node, message in by_node.items():
        config = message.content[CONFIG]
        assert config[SERVER_ROUND] == 1 and config["lr"] == 0.1 and config[PROXIMAL_MU] == 0.0
        assert config[BASE_CONFIG] == base_config(model).to_json_string()
        spec = SubnetSpec.from_json(config[SPEC])
        state = sent_state(message)
        assert set(state) == set(model.state_dict())
        for key, tensor in state.items():  # a prefix spec keeps leading slices on every axis
            leading = full[key][tuple(slice(0, n) for n in tensor.shape)]
            assert torch.equal(tensor, leading), key
        sizes[node] = sum(t.numel() for t in state.values())
        assert sizes[node] == describe(model).count_params(spec)
    assert sizes[101] < sizes[202] < sizes[303] == describe(model).total_params


def test_prioritizing_preserves_the_global_model_function(model):
    strategy = make_strategy(model)
    grid = FakeGrid(NODES, respond_with())
    messages, _ = run_round(strategy, grid, ArrayRecord(model.state_dict()))
    full = next(m for m in messages if m.metadata.dst_node_id == 303)
    permuted = tiny_model("bert")
    permuted.load_state_dict(sent_state(full))
    inputs = {"input_ids": torch.randint(2, 60, (2, 9))}
    with torch.no_grad():
        torch.testing.assert_close(
            permuted(**inputs).logits, model(**inputs).logits, rtol=1e-5, atol=1e-5
        )


def test_good_replies_are_fused_slice_by_slice(model):
    """Each element moves by the weighted mean delta of exactly the nodes that held it."""
    strategy = make_strategy(model)
    grid = FakeGrid(NODES, respond_with())
    messages, (arrays, metrics) = run_round(strategy, grid, ArrayRecord(model.state_dict()))
    old = sent_state(next(m for m in messages if m.metadata.dst_node_id == 303))
    new = dict(arrays.to_torch_state_dict())
    w, d = WEIGHTS, DELTAS
    held_by_all = (w[101] * d[101] + w[202] * d[202] + w[303] * d[303]) / sum(w.values())
    held_by_two = (w[202] * d[202] + w[303] * d[303]) / (w[202] + w[303])
    expected = torch.tensor([held_by_all, held_by_two, d[303]])
    moved = torch.cat([(new[k] - old[k]).reshape(-1) for k in new])
    nearest = (moved[:, None] - expected).abs().argmin(1)
    torch.testing.assert_close(moved, expected[nearest], rtol=0, atol=1e-4)
    counts = torch.bincount(nearest, minlength=3).tolist()
    layout = describe(model)
    specs = {
        m.metadata.dst_node_id: SubnetSpec.from_json(m.content[CONFIG][SPEC]) for m in messages
    }
    assert counts[0] == layout.count_params(specs[101])
    assert counts[0] + counts[1] == layout.count_params(specs[202])
    assert sum(counts) == layout.total_params
    assert metrics["train-loss"] == pytest.approx(0.5)


@pytest.mark.parametrize("kind", [k for k in REPLY_KINDS if k != "good"])
def test_a_bad_reply_is_rejected_with_one_log_line(model, flwr_logs, kind):
    strategy = make_strategy(model)
    grid = FakeGrid(NODES, respond_with({303: kind}))
    messages, (arrays, _) = run_round(strategy, grid, ArrayRecord(model.state_dict()))
    lines = [r.getMessage() for r in flwr_logs.records if "rejected" in r.getMessage()]
    assert lines == [lines[0]] and lines[0].startswith("reply from node 303 rejected: ")
    # The full model's tail, which only node 303 held, keeps its value.
    old = sent_state(next(m for m in messages if m.metadata.dst_node_id == 303))
    new = dict(arrays.to_torch_state_dict())
    spec_202 = SubnetSpec.from_json(
        next(m for m in messages if m.metadata.dst_node_id == 202).content[CONFIG][SPEC]
    )
    mid = describe(model).count_params(spec_202)
    changed = sum(int((new[k] != old[k]).sum()) for k in new)
    assert changed == mid
    status = {c.node_id: c.status for c in strategy.history[1].clients}
    assert status == {101: "accepted", 202: "accepted", 303: "rejected"}


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("wrong-shape", "has shape"),
        ("nan", "NaN or Inf"),
        ("missing-key", "missing 1 key"),
        ("extra-key", "unexpected 1 key"),
        ("error", "error reply (code 2): ValueError: out of"),
        ("superlink-error", "error reply"),
        ("bad-num-examples", "num-examples"),
        ("timeout", "no reply within the timeout"),
        ("wrong-dtype", "dtype torch.float64"),
    ],
)
def test_the_log_line_names_the_reason(model, flwr_logs, kind, reason):
    strategy = make_strategy(model)
    run_round(strategy, FakeGrid(NODES, respond_with({202: kind})), ArrayRecord(model.state_dict()))
    line = next(r.getMessage() for r in flwr_logs.records if "rejected" in r.getMessage())
    assert line.startswith("reply from node 202 rejected: ") and reason in line


def test_zero_survivors_keep_the_global_model_bit_identical(model, flwr_logs):
    strategy = make_strategy(model)
    kinds = {101: "nan", 202: "error", 303: "timeout"}
    grid = FakeGrid(NODES, respond_with(kinds))
    initial = ArrayRecord(model.state_dict())
    seen = []

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        seen.append(dict(arrays.to_torch_state_dict()))
        return MetricRecord({"accuracy": 0.5})

    result = strategy.start(grid, initial, num_rounds=2, timeout=5, evaluate_fn=evaluate_fn)
    assert len(result.arrays) == 0  # no round produced a model
    reference = model.state_dict()
    assert len(seen) == 3
    for state in seen:
        assert all(torch.equal(state[k], reference[k]) for k in reference)
    assert all(entry.kept_previous for entry in strategy.history.values())
    text = flwr_logs.text
    assert "round 1/2: 3 clients (3 rejected, previous model kept)" in text


def test_too_few_survivors_keep_the_previous_model(model):
    strategy = make_strategy(model, min_replies=3)
    grid = FakeGrid(NODES, respond_with({101: "missing-key"}))
    _, (arrays, metrics) = run_round(strategy, grid, ArrayRecord(model.state_dict()))
    assert arrays is None and metrics is None
    assert strategy.history[1].kept_previous


def test_a_reply_to_no_instruction_is_ignored(model, flwr_logs):
    strategy = make_strategy(model)
    grid = FakeGrid(NODES, respond_with())
    strategy.query_budgets(grid)
    messages = list(
        strategy.configure_train(1, ArrayRecord(model.state_dict()), ConfigRecord(), grid)
    )
    replies = grid.send_and_receive(messages)
    stray = train_reply(messages[0])
    stray.metadata.__dict__["_reply_to_message_id"] = "not-sent"
    arrays, _ = strategy.aggregate_train(1, [*replies, stray])
    assert arrays is not None
    assert any("answers no instruction" in r.getMessage() for r in flwr_logs.records)


@pytest.mark.parametrize(
    "budget, why",
    [
        ("params=abc", "cannot parse budget"),
        ("params=0.01", "below the smallest sub-network"),
        ("gpu=big", "cannot parse budget"),
    ],
)
def test_unusable_budgets_skip_the_node(model, flwr_logs, budget, why):
    strategy = make_strategy(model)
    budgets = {**NODES, 202: (budget, 1)}
    grid = FakeGrid(NODES, respond_with(budgets=budgets))
    messages, _ = run_round(strategy, grid, ArrayRecord(model.state_dict()))
    assert {m.metadata.dst_node_id for m in messages} == {101, 303}
    line = next(r.getMessage() for r in flwr_logs.records if "skipped" in r.getMessage())
    assert line.startswith("node 202 skipped: ") and why in line


def test_sampling_is_seeded_and_follows_the_fraction(model):
    nodes = {100 + i: ("params=1.0", i) for i in range(10)}

    def picked(seed: int, server_round: int) -> list[int]:
        strategy = make_strategy(model, fraction_train=0.4, min_train_nodes=2, seed=seed)
        grid = FakeGrid(nodes, respond_with(budgets=nodes))
        strategy.query_budgets(grid)
        messages = strategy.configure_train(
            server_round, ArrayRecord(model.state_dict()), ConfigRecord(), grid
        )
        return sorted(m.metadata.dst_node_id for m in messages)

    assert len(picked(0, 1)) == 4
    assert picked(0, 1) == picked(0, 1)
    assert len({tuple(picked(0, r)) for r in range(1, 6)}) > 1


def test_sample_mode_draws_different_specs_within_the_budget(model):
    nodes = {100 + i: ("params=0.8", i) for i in range(6)}
    strategy = make_strategy(model, selection_mode="sample")
    grid = FakeGrid(nodes, respond_with(budgets=nodes))
    messages, _ = run_round(strategy, grid, ArrayRecord(model.state_dict()))
    layout = describe(model)
    specs = [SubnetSpec.from_json(m.content[CONFIG][SPEC]) for m in messages]
    assert len(set(specs)) > 1
    assert all(layout.count_params(s) <= 0.8 * layout.total_params for s in specs)


def test_fedadam_moves_only_covered_elements(model):
    strategy = make_strategy(model, server_optimizer=ServerOptimizer("fedadam", lr=0.01))
    grid = FakeGrid(NODES, respond_with({202: "error", 303: "timeout"}))
    messages, (arrays, _) = run_round(strategy, grid, ArrayRecord(model.state_dict()))
    by_node = {m.metadata.dst_node_id: m for m in messages}
    old = sent_state(by_node[303])  # the whole prioritized model
    new = dict(arrays.to_torch_state_dict())
    changed = sum(int((new[k] != old[k]).sum()) for k in new)
    spec = SubnetSpec.from_json(by_node[101].content[CONFIG][SPEC])
    assert 0 < changed <= describe(model).count_params(spec)


def test_federated_evaluation_scores_sub_models(model):
    strategy = make_strategy(model, fraction_evaluate=1.0, min_evaluate_nodes=1)
    grid = FakeGrid(NODES, respond_with())
    strategy.query_budgets(grid)
    messages = list(
        strategy.configure_evaluate(1, ArrayRecord(model.state_dict()), ConfigRecord(), grid)
    )
    assert {m.metadata.message_type for m in messages} == {MessageType.EVALUATE}
    specs = {SubnetSpec.from_json(m.content[CONFIG][SPEC]) for m in messages}
    assert len(specs) == 3
    metrics = strategy.aggregate_evaluate(1, grid.send_and_receive(messages))
    expected = sum(n / 1000 * WEIGHTS[n] for n in NODES) / sum(WEIGHTS.values())
    assert metrics["accuracy"] == pytest.approx(expected)
