"""The ClientApp's handlers, called directly with messages the strategy builds."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from client_app.app import build_client_app
from client_app.training import InstructionError, TrainSettings, resident_mb
from raffm_core import Budget, base_config, describe, prioritize_state, select_subnet
from raffm_core.task.keys import (
    ARRAYS,
    BASELINE_MB,
    BUDGET,
    CONFIG,
    METRICS,
    NUM_EXAMPLES,
    PARTITION_ID,
    PEAK_MEMORY_MB,
    TRAIN_REPLY_METRICS,
)
from server_app.instructions import build_instruction
from server_app.records import NodeBudget
from tests.assets import tiny_bert_task

TRAIN_CONFIG = {
    "lr": 1e-3,
    "local-steps": 0,
    "local-epochs": 1.0,
    "batch-size": 8,
    "max-length": 16,
    "weight-decay": 0.0,
    "seed": 1,
    "mixed-precision": "no",
}

pytestmark = pytest.mark.usefixtures("flower_task")


@pytest.fixture
def task_node_id() -> int:
    return 5  # the node every instruction and context here is addressed to


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    defaults = {
        **tiny_bert_task(tmp_path_factory.mktemp("client"), 100),
        "partitioner": "iid",
        "budget-profile": "params=0.6,params=1.0",
    }
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(defaults["model-name"])
    return build_client_app(defaults), model


def context(partition_id: int = 1, **node_config) -> Context:
    config = {"partition-id": partition_id, "num-partitions": 2, **node_config}
    return Context(run_id=7, node_id=5, node_config=config, state=RecordDict(), run_config={})


def instruction(model, budget: str, kind: str = MessageType.TRAIN, **config) -> Message:
    layout = describe(model)
    state, _ = prioritize_state(model.state_dict(), layout, "l1")
    spec = select_subnet(layout, budget)
    node = NodeBudget(5, Budget.parse(budget), 1, 1.0)
    extra = {
        "server-round": 1,
        "base-config": base_config(model).to_json_string(),
        "proximal-mu": 0.0,
    }
    sent = build_instruction(
        node, spec, state, layout, ConfigRecord({**TRAIN_CONFIG, **config}), extra, kind
    )
    sent.message.metadata.__dict__["_message_id"] = "m1"
    return sent.message


def test_query_answers_the_profile_tier_or_the_node_budget(setup):
    app, _ = setup
    query = Message(RecordDict({CONFIG: ConfigRecord({})}), dst_node_id=5, message_type="query")
    query.metadata.__dict__["_message_id"] = "q1"
    reply = app(query, context(partition_id=1))
    assert reply.content[CONFIG][BUDGET] == "params=1.0"
    assert reply.content[CONFIG][PARTITION_ID] == 1
    reply = app(query, context(partition_id=0, budget="memory-mb=900"))
    assert reply.content[CONFIG][BUDGET] == "memory-mb=900"


def test_train_replies_with_exactly_the_received_arrays_and_the_metrics(setup):
    app, model = setup
    message = instruction(model, "params=0.6")
    sent = dict(message.content[ARRAYS].to_torch_state_dict())
    reply = app(message, context())
    assert not reply.has_error()
    received = dict(reply.content[ARRAYS].to_torch_state_dict())
    assert list(received) == list(sent)
    for key, tensor in sent.items():
        assert received[key].shape == tensor.shape and received[key].dtype == tensor.dtype
    assert any(not torch.equal(received[k], sent[k]) for k in sent)  # it trained
    metrics = reply.content[METRICS]
    assert set(TRAIN_REPLY_METRICS) <= set(metrics)
    assert metrics[NUM_EXAMPLES] == 40  # half of the 80 training sentences, not batches
    assert metrics["train-steps"] == 5  # one pass, batches of 8
    assert metrics["peak-memory-mb"] > 0 and metrics["train-time-s"] > 0


def test_train_rebuilds_from_the_message_alone(setup, monkeypatch):
    """No weights are loaded by name: from_pretrained must not be called."""
    app, model = setup
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("the client loaded a model by name")

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", refuse)
    reply = app(instruction(model, "params=1.0", **{"local-steps": 2}), context())
    assert reply.content[METRICS]["train-steps"] == 2


def test_evaluate_scores_the_received_sub_model(setup):
    app, model = setup
    reply = app(instruction(model, "params=0.6", kind=MessageType.EVALUATE), context())
    metrics = reply.content[METRICS]
    assert metrics[NUM_EXAMPLES] == 10  # this node's share of the 20 held-out sentences
    assert {"loss", "accuracy", "f1"} <= set(metrics)


def test_a_bad_instruction_raises_a_clear_error(setup):
    app, model = setup
    message = instruction(model, "params=0.6")
    del message.content[CONFIG]["spec"]
    with pytest.raises(InstructionError, match="instruction has no 'spec'"):
        app(message, context())


def test_an_unknown_peft_method_is_an_error_not_full_fine_tuning(setup):
    app, model = setup
    message = instruction(model, "params=0.6")
    message.content[CONFIG]["peft"] = "qlora"
    with pytest.raises(InstructionError, match="'peft' = 'qlora' is not supported"):
        app(message, context())


@pytest.mark.parametrize(
    "config, steps",
    [({"local-steps": 7}, 7), ({"local-epochs": 0.5}, 3), ({"local-epochs": 2.0}, 10)],
    ids=["exact-steps", "half-epoch", "two-epochs"],
)
def test_steps_follow_local_steps_or_epochs(setup, config, steps):
    app, model = setup  # 40 local examples in batches of 8: 5 batches per pass
    reply = app(instruction(model, "params=0.6", **config), context())
    assert reply.content[METRICS]["train-steps"] == steps


@pytest.mark.parametrize(
    "config, message",
    [
        ({"lr": "fast"}, "'lr' must be a float"),
        ({"mixed-precision": "fp8"}, "mixed-precision must be one of"),
        ({"local-epochs": 0.0}, "local-epochs > 0"),
    ],
)
def test_bad_settings_are_errors(config, message):
    with pytest.raises(InstructionError, match=message):
        TrainSettings.from_config(
            {**TRAIN_CONFIG, "server-round": 1, "proximal-mu": 0.0, **config}, 0
        )


# ------------------------------------------------ memory: what the process holds (issue 12)


def query(app, ctx: Context) -> ConfigRecord:
    message = Message(RecordDict({CONFIG: ConfigRecord({})}), dst_node_id=5, message_type="query")
    message.metadata.__dict__["_message_id"] = "q2"
    return app(message, ctx).content[CONFIG]


def test_a_memory_budget_comes_with_the_rss_the_process_holds(setup):
    app, _ = setup
    reply = query(app, context(budget="memory-mb=1500"))
    after = resident_mb()
    assert reply[BUDGET] == "memory-mb=1500"
    # the whole process (pytest, torch, the node's data), not an increment
    assert 0.9 * after <= reply[BASELINE_MB] <= after + 1
    assert BASELINE_MB not in query(app, context(budget="params=0.6"))  # irrelevant to params


def test_the_baseline_is_measured_after_releasing_what_earlier_messages_freed(setup, monkeypatch):
    """A Ray actor's heap still maps the previous node's step until it is trimmed."""
    app, _ = setup
    released = []
    monkeypatch.setattr("client_app.app.release_memory", lambda: released.append(True))
    monkeypatch.setattr("client_app.app.resident_mb", lambda: 700.0 if released else 1900.0)
    assert query(app, context(budget="memory-mb=1500"))[BASELINE_MB] == 700.0


def test_the_peak_covers_the_whole_instruction_not_only_the_steps(setup, monkeypatch):
    """A transient 256 MB while the sub-model is built must show in peak-memory-mb."""
    app, model = setup
    import client_app.app as client_module

    build = client_module.build_submodel

    def build_with_a_transient(*args, **kwargs):
        transient = torch.ones(64 * 2**20)  # 256 MB, written, then freed
        del transient
        return build(*args, **kwargs)

    monkeypatch.setattr(client_module, "build_submodel", build_with_a_transient)
    metrics = app(instruction(model, "params=0.6", **{"local-steps": 1}), context()).content[
        METRICS
    ]
    assert metrics[PEAK_MEMORY_MB] >= metrics[BASELINE_MB] + 250
