"""The RaFFM ClientApp: report a budget, fine-tune and evaluate received sub-models.

A node rebuilds its sub-model from the instruction alone: the full model's
config (``base-config``), the :class:`~raffm_core.SubnetSpec` (``spec``) and
the sub-model's arrays. It never loads or materializes the full model; from
``model-name`` in the run config it loads only the tokenizer.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import datasets
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from transformers import AutoConfig, PreTrainedModel

from client_app.lora import build_lora_model
from client_app.partition import (
    LocalData,
    check_partition,
    load_local_data,
    node_budget,
    node_partition,
    token_ids,
)
from client_app.training import (
    InstructionError,
    TrainSettings,
    config_value,
    peak_memory,
    process_age_s,
    resident_mb,
    train_submodel,
)
from raffm_core import Budget, SubnetSpec, build_submodel
from raffm_core.spec import format_runs
from raffm_core.task.config import LORA, NO_PEFT, PEFT_METHODS, RunConfig
from raffm_core.task.encode import make_loader
from raffm_core.task.keys import (
    ARRAYS,
    BASE_CONFIG,
    BASELINE_MB,
    BATCH_SIZE,
    BUDGET,
    CONFIG,
    HANDLER_TIME_S,
    IMPORTANCE,
    LABELS_HELD,
    MAX_LENGTH,
    METRICS,
    NUM_EXAMPLES,
    PARTITION_ID,
    PEAK_MEMORY_MB,
    PEFT,
    PROCESS_AGE_S,
    SPEC,
    TRAIN_LOSS,
    TRAIN_STEPS,
    TRAIN_TIME_S,
    VOCAB,
)
from raffm_core.task.memory import pin_mmap_threshold, release_memory
from raffm_core.task.metrics import evaluate_model

datasets.disable_progress_bars()


@dataclass
class Job:
    """Everything a train or evaluate handler needs, loaded once."""

    cfg: RunConfig
    config: ConfigRecord
    partition_id: int
    model: PreTrainedModel
    keys: tuple[str, ...]
    data: LocalData
    read_state: Callable[[], Mapping[str, torch.Tensor]]
    """The arrays to send back: the model's state dict, or adapters and head under LoRA."""
    baseline_mb: float
    """RSS the process held besides the received sub-model, once the data was loaded."""


def load_job(msg: Message, context: Context, defaults: Mapping[str, Any] | None) -> Job:
    """Parse an instruction, rebuild its sub-model and load this node's data.

    Raises
    ------
    InstructionError
        If the message lacks a record or key; the ClientApp then answers
        with an error reply, which the server logs and excludes.
    """
    cfg = RunConfig.from_mapping(context.run_config, defaults)
    torch.set_num_threads(cfg.client_threads)
    if CONFIG not in msg.content.config_records or ARRAYS not in msg.content.array_records:
        raise InstructionError(f"instruction needs the records {CONFIG!r} and {ARRAYS!r}")
    config = msg.content.config_records[CONFIG]
    spec = SubnetSpec.from_json(config_value(config, SPEC, str))
    base = AutoConfig.for_model(**json.loads(config_value(config, BASE_CONFIG, str)))
    partition_id, num_partitions = node_partition(context.node_config)
    data = load_local_data(cfg, partition_id, num_partitions, config_value(config, MAX_LENGTH, int))
    arrays = msg.content.array_records[ARRAYS]
    # The received arrays become the model's weights, which the memory model counts.
    baseline_mb = max(0.0, resident_mb() - arrays.count_bytes() / 2**20)
    keys = tuple(arrays.keys())
    received = arrays.to_torch_state_dict(keep_input=False)
    peft = config.get(PEFT, NO_PEFT)
    if peft not in PEFT_METHODS:
        raise InstructionError(
            f"instruction {PEFT!r} = {peft!r} is not supported; expected one of {PEFT_METHODS}"
        )
    if peft == LORA:
        model, read_state = build_lora_model(cfg.model_name, base, spec, received, config)
    else:
        model = build_submodel(base, spec, received)
        read_state = model.state_dict
    return Job(cfg, config, partition_id, model, keys, data, read_state, baseline_mb)


def build_client_app(defaults: Mapping[str, Any] | None = None) -> ClientApp:
    """The ClientApp; ``defaults`` (kebab-case) replace built-in run-config defaults.

    ``flwr run`` passes the full run config, so ``defaults`` matter only when
    the run config is empty, as under ``flwr.simulation.run_simulation``.
    """
    app = ClientApp()

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        """Answer the server's budget query with this node's budget string.

        Under ``vocab-trim`` the reply also names the token ids of the node's
        data (``vocab``), the only embedding rows its sub-models need. With a
        ``memory-mb`` budget, which bounds the whole process, it carries
        ``baseline-mb``: the RSS this process holds once the node's data and
        tokenizer are loaded, which the server keeps out of the training step.
        A node with a partition (simulation) checks it first: partitions that
        cannot be drawn are an error reply here, before any round.
        """
        settle_memory()  # what earlier messages left is not this node's baseline
        cfg = RunConfig.from_mapping(context.run_config, defaults)
        budget = node_budget(cfg, context.node_config)
        reply = ConfigRecord({BUDGET: budget})
        if PARTITION_ID in context.node_config:
            partition_id, num_partitions = node_partition(context.node_config)
            check_partition(cfg, partition_id, num_partitions)
            reply[PARTITION_ID] = partition_id
        memory = Budget.memory_mb_of(budget) is not None
        if cfg.trims_vocab or memory:
            partition_id, num_partitions = node_partition(context.node_config)
            data = load_local_data(cfg, partition_id, num_partitions, cfg.max_length)
            if memory:
                reply[BASELINE_MB] = resident_mb()
            ids = token_ids(data) if cfg.trims_vocab else None
            if ids is not None:
                reply[VOCAB] = format_runs(ids)
        return Message(RecordDict({CONFIG: reply}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        """Fine-tune the received sub-model; reply with exactly the received keys."""
        started, age = time.perf_counter(), process_age_s()
        settle_memory()  # what earlier messages left is not this instruction's
        # The peak covers the whole instruction: loading, training and the reply's copy.
        with peak_memory() as memory:
            job = load_job(msg, context, defaults)
            settings = TrainSettings.from_config(job.config, job.partition_id)
            result = train_submodel(job.model, job.data.train, job.data.tokenizer, settings)
            release_memory()  # activations and optimizer state are garbage now
            state = job.read_state()
            arrays = ArrayRecord({k: state[k].detach() for k in job.keys})
        metrics = MetricRecord(
            {
                NUM_EXAMPLES: len(job.data.train),
                TRAIN_LOSS: result.loss,
                TRAIN_TIME_S: result.seconds,
                TRAIN_STEPS: result.steps,
                PEAK_MEMORY_MB: memory["peak-mb"],
                BASELINE_MB: job.baseline_mb,
                HANDLER_TIME_S: time.perf_counter() - started,
                PROCESS_AGE_S: age,
            }
        )
        content = RecordDict({ARRAYS: arrays, METRICS: metrics})
        if result.labels_held is not None:
            content[CONFIG] = ConfigRecord({LABELS_HELD: list(result.labels_held)})
        if result.importance is not None:
            content[IMPORTANCE] = ArrayRecord(
                {
                    f"{kind}.{i}": scores.to(torch.float32)
                    for i, pair in enumerate(result.importance)
                    for kind, scores in zip(("heads", "ffn"), pair, strict=True)
                }
            )
        return Message(content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        """Score the received sub-model on this node's share of the held-out split."""
        settle_memory()
        job = load_job(msg, context, defaults)
        loader = make_loader(
            job.data.test, job.data.tokenizer, config_value(job.config, BATCH_SIZE, int)
        )
        metrics = evaluate_model(job.model, loader, job.data.task, job.data.tokenizer)
        return Message(RecordDict({METRICS: MetricRecord(metrics)}), reply_to=msg)

    return app


def settle_memory() -> None:
    """Before a message: release memory, and pin glibc's mmap threshold if asked (once).

    The pin (``RAFFM_MMAP_THRESHOLD``, off by default) keeps a Ray actor that
    serves sub-models of changing widths flatter over long runs, at a cost in
    training speed; see :mod:`raffm_core.task.memory`.
    """
    pin_mmap_threshold()
    release_memory()


app = build_client_app()
