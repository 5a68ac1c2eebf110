"""The baseline strategies (FedAvg, HeteroFL, FedRolex): unit tests and one simulation.

Unit tests drive each strategy with fake replies (tests/fakes.py) and check
what it sends against oracles written here: the global model as it is (no
prioritization), leading slices, FedRolex's window formula, ``np.average``.
The simulation runs the real ``server_app.app.run`` for every baseline, one
after the other, in one ``run_simulation`` (Ray starts once).
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from raffm_core import SubnetSpec, describe, rank_units
from raffm_core.task.config import STRATEGIES, ConfigError, RunConfig
from raffm_core.task.keys import SPEC
from server_app.app import build_strategy, run
from server_app.baselines import (
    STRATEGY_CLASSES,
    FedRolex,
    FullModelFedAvg,
    HeteroFL,
    strategy_class,
)
from server_app.outputs import summarize
from server_app.strategy import RaFFM
from tests.assets import tiny_bert_task
from tests.fakes import NODES, WEIGHTS, FakeGrid, make_strategy, respond_with
from tests.sim import TIMEOUTS, simulate

pytestmark = pytest.mark.usefixtures("flower_task")


def configure(strategy: RaFFM, model, server_round: int = 1):
    grid = FakeGrid(NODES, respond_with())
    if not strategy.nodes:
        strategy.query_budgets(grid)
    arrays = ArrayRecord(model.state_dict())
    messages = list(strategy.configure_train(server_round, arrays, ConfigRecord({}), grid))
    return grid, {m.metadata.dst_node_id: m for m in messages}


def specs_of(messages) -> dict[int, SubnetSpec]:
    return {n: SubnetSpec.from_json(m.content["config"][SPEC]) for n, m in messages.items()}


def sent(message) -> dict[str, torch.Tensor]:
    return dict(message.content["arrays"].to_torch_state_dict())


def test_tiny_model_is_not_already_in_salience_order(model):
    """Otherwise "no prioritization" below could not be told apart from RaFFM."""
    assert not rank_units(dict(model.state_dict()), describe(model)).is_identity


def test_fedavg_excludes_and_reports_nodes_the_full_model_does_not_fit(model, caplog):
    caplog.set_level(logging.WARNING, logger="flwr")
    strategy = make_strategy(model, FullModelFedAvg)
    grid, messages = configure(strategy, model)
    assert set(messages) == {303}
    assert sent(messages[303]).keys() == model.state_dict().keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in sent(messages[303]).items())
    excluded = strategy.history[1].excluded
    assert set(excluded) == {101, 202}
    assert "params=0.5" in excluded[101] and "full model" in excluded[101]
    assert "node 101 skipped in round 1" in caplog.text
    row = strategy.history[1].to_dict()
    assert sorted(e["node"] for e in row["clients-excluded"]) == [101, 202]
    strategy.aggregate_train(1, grid.send_and_receive(list(messages.values())))
    summary = summarize(strategy.history, {}, "accuracy", 1, 0.0)
    assert summary["clients-excluded"] == 2 and summary["client-rounds-excluded"] == 2


def test_fedavg_train_all_is_plain_weighted_fedavg_of_full_models(model):
    strategy = make_strategy(model, FullModelFedAvg, train_all=True)
    grid, messages = configure(strategy, model)
    assert set(messages) == set(NODES) and not strategy.history[1].excluded
    full = describe(model).full_spec()
    assert all(spec == full for spec in specs_of(messages).values())
    replies = grid.send_and_receive(list(messages.values()))
    new, _ = strategy.aggregate_train(1, replies)
    new = new.to_torch_state_dict()
    replies_by_node = {r.metadata.src_node_id: r for r in replies}
    for key, old in model.state_dict().items():
        if not old.is_floating_point():
            continue
        stacked = np.stack(
            [replies_by_node[n].content["arrays"][key].numpy() for n in sorted(NODES)]
        )
        expected = np.average(stacked, axis=0, weights=[WEIGHTS[n] for n in sorted(NODES)])
        np.testing.assert_allclose(new[key].numpy(), expected, rtol=1e-5, atol=1e-6, err_msg=key)


def test_heterofl_sends_leading_slices_of_the_unprioritized_model(model):
    strategy = make_strategy(model, HeteroFL)
    _, messages = configure(strategy, model)
    specs = specs_of(messages)
    assert set(messages) == set(NODES)
    assert all(spec.is_prefix for spec in specs.values())
    assert len({describe(model).count_params(s) for s in specs.values()}) == 3
    original = model.state_dict()
    for node, message in messages.items():
        for key, tensor in sent(message).items():
            leading = original[key][tuple(slice(0, n) for n in tensor.shape)]
            assert torch.equal(tensor, leading), (node, key)
    # static: the same widths in a later round
    _, later = configure(strategy, model, server_round=4)
    assert specs_of(later) == specs


def test_heterofl_and_raffm_choose_the_same_sizes(model):
    _, hetero = configure(make_strategy(model, HeteroFL), model)
    _, raffm = configure(make_strategy(model, RaFFM), model)
    assert specs_of(hetero) == specs_of(raffm)


def kept(width) -> list[int]:
    return list(range(width)) if isinstance(width, int) else list(width)


@pytest.mark.parametrize("step", [1, 2], ids=["step-1", "step-2"])
def test_fedrolex_windows_advance_each_round_and_wrap(model, step):
    """FedRolex's reference rolling: every axis's window moves ``step`` units a round."""
    layout = describe(model)
    groups, ffn = layout.num_groups, layout.ffn_size
    strategy = make_strategy(model, FedRolex, rolling_step=step)
    key = "bert.encoder.layer.0.intermediate.dense.weight"  # (ffn, hidden): rows are neurons
    windows, wrapped = {}, False
    lap = ffn // step  # a multiple of groups // step: both axes are back at the start
    for server_round in range(1, lap + groups + 1):
        _, messages = configure(strategy, model, server_round)
        layer = specs_of(messages)[101].layers[0]
        heads, neurons = kept(layer.heads), kept(layer.ffn)
        assert 1 <= len(heads) < groups and len(neurons) < ffn  # a narrow node
        start = server_round * step
        assert heads == sorted((start + i) % groups for i in range(len(heads)))
        expected = sorted((start + i) % ffn for i in range(len(neurons)))
        assert neurons == expected
        assert torch.equal(sent(messages[101])[key], model.state_dict()[key][expected])
        assert specs_of(messages)[303] == layout.full_spec()  # the full budget holds all
        wrapped |= start % ffn + len(neurons) > ffn
        windows[server_round] = (tuple(heads), tuple(neurons))
    assert wrapped  # some FFN window crosses the end of the axis and continues at 0
    assert len({windows[r] for r in range(1, lap + 1)}) == lap  # a new window every round
    assert all(windows[r] == windows[r + lap] for r in range(1, groups + 1))  # then it repeats


def test_raffm_rolling_tail_sends_the_salient_core_and_a_rolling_window_of_the_rest(model):
    """Oracle: the prioritized model's rows at positions 0..c-1 plus the window's positions."""
    layout = describe(model)
    ffn = layout.ffn_size
    key = "bert.encoder.layer.0.intermediate.dense.weight"
    nested = make_strategy(model, RaFFM)
    strategy = make_strategy(model, RaFFM, rolling_tail=0.5)
    cover = set()
    for server_round in (1, 2, 3):
        _, plain = configure(nested, model, server_round)
        _, messages = configure(strategy, model, server_round)
        width = kept(specs_of(plain)[101].layers[0].ffn)
        neurons = kept(specs_of(messages)[101].layers[0].ffn)
        core = max(1, round(0.5 * len(width)))
        start = server_round * (ffn // layout.num_groups)
        window = sorted(core + (start + i) % (ffn - core) for i in range(len(width) - core))
        assert neurons == list(range(core)) + window
        # sent rows = the same positions of the prioritized model RaFFM cut the prefix from
        prioritized = sent(plain[303])[key]  # the full budget gets the whole prioritized model
        assert torch.equal(sent(messages[101])[key], prioritized[neurons])
        cover |= set(neurons)
    assert len(cover) > len(width)  # the tail reached units no nested prefix of this node holds


def test_unknown_strategy_lists_the_valid_ones():
    with pytest.raises(ConfigError) as err:
        RunConfig(strategy="fedsgd")
    for name in ("raffm", "fedavg", "heterofl", "fedrolex", "fedsgd"):
        assert name in str(err.value)
    with pytest.raises(ValueError, match="'raffm', 'fedavg', 'heterofl', 'fedrolex'"):
        strategy_class("fedsgd")
    assert tuple(STRATEGY_CLASSES) == STRATEGIES


@pytest.mark.parametrize(
    "options",
    [{"fedavg-train-all": True}, {"rolling-step": 0}],
    ids=["train-all-without-fedavg", "rolling-step-zero"],
)
def test_baseline_options_are_validated(options):
    with pytest.raises(ConfigError, match=next(iter(options))):
        RunConfig.from_mapping(options)


@pytest.mark.parametrize(
    "name, options, cls",
    [
        ("raffm", {}, RaFFM),
        ("fedavg", {"fedavg-train-all": True}, FullModelFedAvg),
        ("heterofl", {}, HeteroFL),
        ("fedrolex", {"rolling-step": 3}, FedRolex),
    ],
    ids=["raffm", "fedavg", "heterofl", "fedrolex"],
)
def test_build_strategy_picks_the_class_and_its_options(model, name, options, cls):
    strategy = build_strategy(RunConfig.from_mapping({"strategy": name, **options}), model)
    assert type(strategy) is cls
    if cls is FullModelFedAvg:
        assert strategy.train_all is True
    if cls is FedRolex:
        assert strategy.rolling_step == 3


# ----------------------------------------------------------------- simulation
SIM_NODES = 3
SIM_ROUNDS = 2
SIM_RUNS = {
    "fedavg": {"strategy": "fedavg"},
    "fedavg-train-all": {"strategy": "fedavg", "fedavg-train-all": True},
    "heterofl": {"strategy": "heterofl"},
    "fedrolex": {"strategy": "fedrolex"},
}


@pytest.fixture(scope="module")
def sim_dir(tmp_path_factory):
    """Every baseline through ``server_app.app.run``, in turn, in one simulation."""
    tmp = tmp_path_factory.mktemp("baselines")
    common = {
        **tiny_bert_task(tmp, 150),
        **TIMEOUTS,
        "min-available-nodes": SIM_NODES,
        "num-server-rounds": SIM_ROUNDS,
        "min-replies": 1,
        "budget-profile": "params=0.5,params=0.65,params=1.0",
        "partitioner": "iid",
        "max-length": 16,
        "local-steps": 2,
        "batch-size": 8,
        "lr": 1e-3,
        "save-models": False,
    }
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        for name, options in SIM_RUNS.items():
            overrides = {**common, **options, "results-dir": str(tmp / name)}
            run(grid, RunConfig.from_mapping({}, overrides))

    simulate(common, SIM_NODES, server_app=server)
    return tmp


def rounds_of(sim_dir, name):
    return json.loads((sim_dir / name / "rounds.json").read_text())[1:]


def summary_of(sim_dir, name):
    return json.loads((sim_dir / name / "summary.json").read_text())


@pytest.mark.parametrize("name", list(SIM_RUNS))
def test_every_baseline_completes_its_rounds(sim_dir, name):
    summary = summary_of(sim_dir, name)
    assert summary["rounds"] == SIM_ROUNDS and summary["rounds-kept-previous-model"] == 0
    assert summary["final-accuracy"] is not None and summary["replies-rejected"] == 0
    assert (
        json.loads((sim_dir / name / "run-config.json").read_text())["strategy"]
        == (SIM_RUNS[name]["strategy"])
    )


def test_simulated_fedavg_reports_the_nodes_it_excluded(sim_dir):
    assert summary_of(sim_dir, "fedavg")["clients-excluded"] == 2
    assert summary_of(sim_dir, "fedavg-train-all")["clients-excluded"] == 0
    for name, clients in (("fedavg", 1), ("fedavg-train-all", SIM_NODES)):
        for row in rounds_of(sim_dir, name):
            assert len(row["clients"]) == clients
            assert len(row["clients-excluded"]) == SIM_NODES - clients
            assert all(c["params-fraction"] == 1.0 for c in row["clients"])


def test_simulated_heterofl_and_fedrolex_send_their_kinds_of_spec(sim_dir):
    for row in rounds_of(sim_dir, "heterofl"):
        assert all(SubnetSpec.from_dict(c["spec"]).is_prefix for c in row["clients"])
    by_round = [
        {c["partition-id"]: SubnetSpec.from_dict(c["spec"]) for c in row["clients"]}
        for row in rounds_of(sim_dir, "fedrolex")
    ]
    narrow = [p for p, spec in by_round[0].items() if not spec.is_prefix]
    assert len(narrow) == 2  # the two budgets below the full model get windows
    for p in narrow:
        assert by_round[0][p] != by_round[1][p]  # the windows moved between rounds
