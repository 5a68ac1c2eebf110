"""Updates that carry no signal, label rows, rejection sampling and federated Taylor importance.

Oracles: numpy weighted means over masks (not slices), brute-force
enumeration of the configurations a budget allows, a full model with units
switched off by zeroing their inputs (the sub-model's function), and
hand-computed moving averages.
"""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

import raffm_core as R
from raffm_core.importance import ImportanceTracker, record_taylor, taylor_importance
from raffm_core.select import _ffn_grid
from raffm_core.task.keys import ARRAYS, CONFIG, IMPORTANCE, LABELS_HELD, METRICS, SPEC
from tests.fakes import NODES, WEIGHTS, FakeGrid, make_strategy, train_reply
from tests.models import tiny_inputs, tiny_model

pytestmark = pytest.mark.usefixtures("flower_task")


# ------------------------------------------------------------ label rows
def test_label_keys_are_the_classifier_output():
    assert R.label_keys(tiny_model("bert")) == ("classifier.weight", "classifier.bias")
    assert R.label_keys(tiny_model("distilbert")) == ("classifier.weight", "classifier.bias")


def test_rows_fuse_only_the_labels_each_update_holds():
    model = tiny_model("bert")  # 3 labels
    layout = R.describe(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    spec = layout.full_spec()
    rng = np.random.default_rng(0)
    rows = [(0, 1), (1, 2), None]
    weights = [10, 30, 60]
    updates, values = [], []
    for held, w in zip(rows, weights, strict=True):
        new = {k: v + float(rng.normal()) for k, v in state.items()}
        values.append(new)
        keys = R.label_keys(model)
        updates.append(
            R.Update(spec, new, w, rows=None if held is None else {k: held for k in keys})
        )
    fused, coverage = R.aggregate_with_coverage(state, updates, layout)
    for key in ("classifier.weight", "classifier.bias"):
        stack = np.stack([v[key].numpy() for v in values])  # (update, label, ...)
        mask = np.zeros((3, 3), dtype=bool)  # update x label
        for i, held in enumerate(rows):
            mask[i, list(range(3) if held is None else held)] = True
        w = np.array(weights, dtype=np.float64)[:, None] * mask
        shape = (3, 3) + (1,) * (stack.ndim - 2)
        expected = (stack * w.reshape(shape)).sum(0) / w.sum(0).reshape((3,) + shape[2:])
        np.testing.assert_allclose(fused[key].numpy(), expected, rtol=1e-5, atol=1e-6)
        assert bool(coverage[key].all())
    other = "bert.pooler.dense.weight"
    plain = np.average(np.stack([v[other].numpy() for v in values]), axis=0, weights=weights)
    np.testing.assert_allclose(fused[other].numpy(), plain, rtol=1e-5, atol=1e-6)


def test_a_label_nobody_holds_keeps_its_row():
    model = tiny_model("bert")
    layout = R.describe(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    new = {k: v + 1.0 for k, v in state.items()}
    keys = R.label_keys(model)
    update = R.Update(layout.full_spec(), new, 5, rows={k: (0, 2) for k in keys})
    fused = R.aggregate(state, [update], layout)
    assert torch.equal(fused["classifier.weight"][1], state["classifier.weight"][1])
    torch.testing.assert_close(
        fused["classifier.bias"][[0, 2]], state["classifier.bias"][[0, 2]] + 1
    )


@pytest.mark.parametrize(
    "rows, message",
    [
        ({"classifier.bias": (0, 3)}, r"distinct ints in \[0, 3\)"),
        ({"classifier.bias": (1, 1)}, "distinct"),
        ({"nope": (0,)}, "'nope', which is not aggregated"),
        ({"bert.encoder.layer.0.intermediate.dense.weight": (0,)}, "which the spec slices"),
    ],
    ids=["out-of-range", "repeated", "unknown-key", "elastic-key"],
)
def test_bad_rows_are_rejected_naming_the_key(rows, message):
    model = tiny_model("bert")
    layout = R.describe(model)
    state = model.state_dict()
    with pytest.raises(R.UpdateError, match=message):
        R.check_update(R.Update(layout.full_spec(), state, 1, rows=rows), layout, state)


def _labelled(held: dict[int, list[int]]):
    """A responder: good replies (+1.0 to every float) that name the classes they hold."""

    def respond(message: Message) -> Message | None:
        node = message.metadata.dst_node_id
        reply = train_reply(message, delta=1.0, num_examples=WEIGHTS[node])
        content = RecordDict(
            {
                ARRAYS: reply.content.array_records[ARRAYS],
                METRICS: reply.content.metric_records[METRICS],
                CONFIG: ConfigRecord({LABELS_HELD: held[node]}),
            }
        )
        return Message(content, reply_to=message)

    return respond


def _query_and_round(strategy, respond, arrays):
    grid = FakeGrid(NODES, respond)
    from tests.fakes import respond_with

    strategy.query_budgets(FakeGrid(NODES, respond_with()))
    messages = list(strategy.configure_train(1, arrays, ConfigRecord({"lr": 0.1}), grid))
    return messages, strategy.aggregate_train(1, grid.send_and_receive(messages))


def test_one_label_nodes_are_left_out_and_label_rows_follow_the_holders(flwr_logs):
    model = tiny_model("bert")
    strategy = make_strategy(model, label_keys=R.label_keys(model))
    held = {101: [2], 202: [0, 1], 303: [1, 2]}
    messages, (arrays, _) = _query_and_round(
        strategy, _labelled(held), ArrayRecord(model.state_dict())
    )
    sent = next(m for m in messages if m.metadata.dst_node_id == 303)
    old = dict(sent.content[ARRAYS].to_torch_state_dict())
    new = dict(arrays.to_torch_state_dict())
    moved = new["classifier.bias"] - old["classifier.bias"]
    # every reply adds 1.0: a row moves by 1 where some fused node holds its class, else 0
    torch.testing.assert_close(moved, torch.tensor([1.0, 1.0, 1.0]))
    assert "node 101 holds class 2 only" in flwr_logs.text
    by_node = {c.node_id: c for c in strategy.history[1].clients}
    assert by_node[101].metrics["fused"] == 0 and by_node[202].metrics["fused"] == 1
    # node 101 (the smallest sub-model) is out: what only it would have held stays
    spec_101 = R.SubnetSpec.from_json(
        next(m for m in messages if m.metadata.dst_node_id == 101).content[CONFIG][SPEC]
    )
    spec_202 = R.SubnetSpec.from_json(
        next(m for m in messages if m.metadata.dst_node_id == 202).content[CONFIG][SPEC]
    )
    assert R.describe(model).count_params(spec_101) < R.describe(model).count_params(spec_202)
    torch.testing.assert_close(
        new["bert.embeddings.word_embeddings.weight"]
        - old["bert.embeddings.word_embeddings.weight"],
        torch.ones_like(old["bert.embeddings.word_embeddings.weight"]),
    )


def test_a_class_only_one_label_nodes_hold_keeps_its_row(flwr_logs):
    model = tiny_model("bert")
    strategy = make_strategy(model, label_keys=R.label_keys(model))
    held = {101: [2], 202: [0, 1], 303: [0, 1]}
    messages, (arrays, _) = _query_and_round(
        strategy, _labelled(held), ArrayRecord(model.state_dict())
    )
    old = dict(
        next(m for m in messages if m.metadata.dst_node_id == 303)
        .content[ARRAYS]
        .to_torch_state_dict()
    )
    new = dict(arrays.to_torch_state_dict())
    torch.testing.assert_close(
        new["classifier.bias"] - old["classifier.bias"], torch.tensor([1.0, 1.0, 0.0])
    )


def test_when_every_reply_is_one_label_the_model_is_kept(flwr_logs):
    model = tiny_model("bert")
    strategy = make_strategy(model, label_keys=R.label_keys(model))
    _, (arrays, metrics) = _query_and_round(
        strategy, _labelled({101: [0], 202: [1], 303: [2]}), ArrayRecord(model.state_dict())
    )
    assert arrays is None and metrics is None
    assert strategy.history[1].kept_previous
    assert "carry a training signal" in flwr_logs.text


# ------------------------------------------------------------ rejection sampling
def test_sample_mode_draws_uniformly_among_the_configurations_that_fit():
    model = tiny_model("bert")  # 2 layers, 4 head groups, 40 FFN neurons (grid of 40)
    layout = R.describe(model)
    grid = _ffn_grid(layout)
    budget = R.Budget.parse("params=0.85")
    limit = budget.limit(layout)
    fitting = Counter()
    per_layer = list(itertools.product(range(1, 5), grid))
    for a, b in itertools.product(per_layer, per_layer):
        spec = R.SubnetSpec((R.LayerSpec(*a), R.LayerSpec(*b)))
        if layout.count_params(spec) <= limit:
            fitting[a[0]] += 1  # marginal of layer 0's head groups
    total = sum(fitting.values())
    draws = [R.select_subnet(layout, budget, "sample", seed=s) for s in range(3000)]
    assert all(layout.count_params(d) <= limit for d in draws)
    seen = Counter(d.layers[0].heads for d in draws)
    for heads in range(1, 5):
        assert seen[heads] / len(draws) == pytest.approx(fitting[heads] / total, abs=0.03)
    assert len(set(draws)) > 1000  # the draws really differ


def test_sample_mode_below_every_uniform_draw_still_fits_and_varies():
    model = tiny_model("bert")
    layout = R.describe(model)
    largest = R.select_subnet(layout, "params=0.45", "largest")
    draws = {R.select_subnet(layout, "params=0.45", "sample", seed=s) for s in range(50)}
    assert all(layout.count_params(d) <= 0.45 * layout.total_params for d in draws)
    assert len(draws) > 10
    assert all(x.heads <= largest.layers[0].heads for d in draws for x in d.layers)


# ------------------------------------------------------------ Taylor importance
def _switch_off(model, spec):
    """Hooks that zero the inputs of the dropped units: the sub-model's function, in place."""
    layout = R.describe(model)
    block = layout.group_size * layout.head_dim
    handles = []
    for layer, kept in zip(layout.layers, spec.layers, strict=True):
        for role, path in layer.modules.items():
            kind = role.rpartition(".")[2]
            if kind not in ("attn_out", "ffn_out"):
                continue
            keep = kept.heads * block if kind == "attn_out" else kept.ffn

            def hook(module, args, keep=keep):
                mask = torch.zeros(args[0].shape[-1])
                mask[:keep] = 1
                return (args[0] * mask,)

            handles.append(model.get_submodule(path).register_forward_pre_hook(hook))
    return handles


def test_a_submodels_recorded_importance_is_that_of_its_units_in_the_full_model():
    model = tiny_model("bert")
    spec = R.SubnetSpec.uniform(2, 2, 25)
    sub = R.extract_submodel(model, spec)
    batch = {**tiny_inputs("bert", batch=4), "labels": torch.tensor([0, 1, 2, 1])}
    sub.eval()
    with record_taylor(sub) as recorder:
        sub(**batch).loss.backward()
        recorder.count(4)
    handles = _switch_off(model, spec)
    try:
        full = taylor_importance(model, [batch])
    finally:
        for h in handles:
            h.remove()
    for (h, f), (fh, ff) in zip(recorder.scores, full, strict=True):
        torch.testing.assert_close(h, fh[:2], rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(f, ff[:25], rtol=1e-4, atol=1e-9)
    assert recorder.examples == 4
    torch.testing.assert_close(recorder.mean()[0][1], recorder.scores[0][1] / 4)


def test_tracker_fuses_over_holders_and_moves_by_a_moving_average():
    layout = R.describe(tiny_model("bert"))  # 4 head groups, 40 FFN neurons
    tracker = ImportanceTracker(layout, decay=0.5)
    assert tracker.salience(tiny_model("bert").state_dict()) is None
    narrow = R.SubnetSpec.uniform(2, 2, 10)
    window = R.SubnetSpec((R.LayerSpec((1, 3), 10), R.LayerSpec(2, 10)))

    def scores(spec, value):
        return [
            (
                torch.full((R.spec.width_count(x.heads),), value).double(),
                torch.full((R.spec.width_count(x.ffn),), value).double(),
            )
            for x in spec.layers
        ]

    tracker.update([(narrow, scores(narrow, 1.0), 10.0), (window, scores(window, 4.0), 30.0)])
    # layer 0 heads: unit 0 by narrow only, 1 by both, 3 by window only, 2 by nobody
    np.testing.assert_allclose(tracker.heads[0].numpy(), [1.0, (10 * 1 + 30 * 4) / 40, np.nan, 4.0])
    tracker.update([(narrow, scores(narrow, 2.0), 10.0)])
    np.testing.assert_allclose(tracker.heads[0].numpy(), [1.5, 0.5 * 3.25 + 0.5 * 2.0, np.nan, 4.0])
    permutation = R.rank_units(tiny_model("bert").state_dict(), layout)
    before = [h.clone() for h in tracker.heads]
    tracker.permute(permutation)
    for i, layer in enumerate(permutation.layers):
        np.testing.assert_array_equal(tracker.heads[i].numpy(), before[i][layer.heads].numpy())


def test_unscored_units_rank_after_scored_ones_by_weight_norm():
    model = tiny_model("bert")
    layout = R.describe(model)
    tracker = ImportanceTracker(layout)
    spec = R.SubnetSpec.uniform(2, 2, 10)
    scores = [(torch.tensor([0.1, 0.3]).double(), torch.linspace(1, 0, 10).double())] * 2
    tracker.update([(spec, scores, 1.0)])
    state = model.state_dict()
    permutation = R.rank_units(state, layout, scores=tracker.salience(state))
    l1 = R.rank_units(state, layout)  # weight-norm order of every unit
    for layer, by_norm in zip(permutation.layers, l1.layers, strict=True):
        assert layer.heads[:2].tolist() == [1, 0]
        assert layer.heads[2:].tolist() == [h for h in by_norm.heads.tolist() if h >= 2]
        assert layer.ffn[:10].tolist() == list(range(10))
        assert layer.ffn[10:].tolist() == [f for f in by_norm.ffn.tolist() if f >= 10]


def test_bad_importance_is_rejected_before_anything_changes():
    layout = R.describe(tiny_model("bert"))
    tracker = ImportanceTracker(layout)
    spec = R.SubnetSpec.uniform(2, 2, 10)
    good = [(torch.ones(2).double(), torch.ones(10).double())] * 2
    wrong = [(torch.ones(3).double(), torch.ones(10).double())] * 2
    with pytest.raises(ValueError, match="layer 0 has shapes"):
        tracker.update([(spec, good, 1.0), (spec, wrong, 1.0)])
    assert not tracker.scored
    negative = [(-torch.ones(2).double(), torch.ones(10).double())] * 2
    with pytest.raises(ValueError, match="non-negative"):
        tracker.update([(spec, negative, 1.0)])


def test_taylor_strategy_asks_for_importance_and_ranks_by_it():
    model = tiny_model("bert")
    strategy = make_strategy(model, salience_norm="taylor")

    def respond(message: Message) -> Message | None:
        node = message.metadata.dst_node_id
        assert message.content[CONFIG]["record-importance"] is True
        reply = train_reply(message, delta=0.0, num_examples=WEIGHTS[node])
        spec = R.SubnetSpec.from_json(message.content[CONFIG][SPEC])
        record = {}
        for i, kept in enumerate(spec.layers):  # the last kept unit is the most important
            n_h, n_f = R.spec.width_count(kept.heads), R.spec.width_count(kept.ffn)
            record[f"heads.{i}"] = torch.arange(n_h, dtype=torch.float32)
            record[f"ffn.{i}"] = torch.arange(n_f, dtype=torch.float32)
        content = RecordDict(
            {
                ARRAYS: reply.content.array_records[ARRAYS],
                METRICS: reply.content.metric_records[METRICS],
                IMPORTANCE: ArrayRecord(record),
            }
        )
        return Message(content, reply_to=message)

    messages, (arrays, _) = _query_and_round(strategy, respond, ArrayRecord(model.state_dict()))
    entry = strategy.history[1]
    assert entry.importance["replies"] == 3 and entry.importance["bytes"] > 0
    state, permutation = strategy.prepare_state(arrays)
    widest = max(
        (R.SubnetSpec.from_json(m.content[CONFIG][SPEC]) for m in messages),
        key=lambda s: R.describe(model).count_params(s),
    )
    for layer, kept in zip(permutation.layers, widest.layers, strict=True):
        n = R.spec.width_count(kept.ffn)
        assert layer.ffn[0].item() == n - 1  # the unit every holder scored highest leads


def test_recording_keeps_no_activation_alive_after_its_step():
    """Without the garbage collector, a step's activations are freed when its graph is."""
    import gc
    import weakref

    model = tiny_model("bert")
    batch = {**tiny_inputs("bert", batch=4), "labels": torch.tensor([0, 1, 2, 1])}
    seen = []
    module = model.bert.encoder.layer[0].output.dense  # the FFN output projection
    spy = module.register_forward_pre_hook(lambda m, args: seen.append(weakref.ref(args[0])))
    gc.disable()
    try:
        with record_taylor(model) as recorder:
            for _ in range(3):
                model(**batch).loss.backward()
                recorder.count(4)
        assert seen and all(ref() is None for ref in seen)
    finally:
        gc.enable()
        spy.remove()
    assert float(recorder.scores[0][1].sum()) > 0
