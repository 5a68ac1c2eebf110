"""What one node holds: its budget and its share of the data.

In simulation a virtual node knows only its ``partition-id`` and
``num-partitions`` (Flower's node config); its budget tier and its data are
derived from them and the run config. In deployment the node config can
carry ``budget`` directly (``flower-supernode --node-config 'budget="params=0.5"
partition-id=0 num-partitions=4'``), or ``budget="auto"``: the node then
measures the memory it may use and reports a ``memory-mb`` budget
(:mod:`raffm_core.task.device`).

Loading is cached per process: a Ray actor serves many virtual nodes in turn,
and the dataset, tokenizer and partitioner are the same for all of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from logging import INFO
from typing import Any

import datasets
import numpy as np
from flwr.common.logger import log
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, Partitioner

from raffm_core.task import Task, load_task
from raffm_core.task.config import REGRESSION, ConfigError, RunConfig
from raffm_core.task.data import LABEL, TaskInfo
from raffm_core.task.device import auto_budget, measure_memory
from raffm_core.task.keys import BUDGET, NUM_PARTITIONS, PARTITION_ID
from raffm_core.task.models import Preprocessor


@dataclass(frozen=True)
class LocalData:
    """A node's tokenized data: its train partition and its evaluation share.

    For an image model ``tokenizer`` is the model's
    :class:`~raffm_core.task.pixels.PixelProcessor`.
    """

    train: datasets.Dataset
    test: datasets.Dataset
    task: TaskInfo
    tokenizer: Preprocessor


def node_partition(node_config: Mapping[str, Any]) -> tuple[int, int]:
    """``(partition-id, num-partitions)`` from the node config.

    Raises
    ------
    ConfigError
        If either is missing or out of range.
    """
    try:
        pid, total = int(node_config[PARTITION_ID]), int(node_config[NUM_PARTITIONS])
    except (KeyError, TypeError, ValueError):
        raise ConfigError(
            f"node config needs integer {PARTITION_ID!r} and {NUM_PARTITIONS!r} "
            f"(simulation sets them; for a SuperNode pass --node-config), got {dict(node_config)}"
        ) from None
    if not 0 <= pid < total:
        raise ConfigError(f"{PARTITION_ID} = {pid} is outside 0..{total - 1}")
    return pid, total


AUTO_BUDGET = "auto"
"""Node-config budget that asks the node to measure its own memory."""


def node_budget(cfg: RunConfig, node_config: Mapping[str, Any]) -> str:
    """The budget string this node reports; the server parses and checks it.

    ``budget`` in the node config wins; ``budget="auto"`` becomes the
    ``memory-mb`` budget :func:`raffm_core.task.device.auto_budget` derives from
    what :func:`raffm_core.task.device.measure_memory` reads now, and the node
    logs both. Otherwise the node takes a tier of
    ``budget-profile``: tier ``partition-id mod len(profile)`` under
    ``round-robin``, or one drawn with a generator seeded by
    ``(seed, partition-id)`` under ``random``.
    """
    if BUDGET in node_config:
        budget = str(node_config[BUDGET])
        if budget != AUTO_BUDGET:
            return budget
        reading = measure_memory()
        chosen = str(auto_budget(reading))
        log(INFO, "budget auto: measured %s; reporting %s", reading.describe(), chosen)
        return chosen
    pid, _ = node_partition(node_config)
    tiers = cfg.budget_tiers
    if cfg.budget_assignment == "round-robin":
        return tiers[pid % len(tiers)]
    return tiers[int(np.random.default_rng([cfg.seed, pid]).integers(len(tiers)))]


def build_partitioner(cfg: RunConfig, num_partitions: int) -> Partitioner:
    """The flwr-datasets partitioner of the train split named by ``partitioner``."""
    if cfg.partitioner == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    return DirichletPartitioner(
        num_partitions=num_partitions, partition_by=LABEL, alpha=cfg.dirichlet_alpha, seed=cfg.seed
    )


@lru_cache(maxsize=2)
def _task(cfg: RunConfig) -> Task:
    """The run's workload, loaded once per process (a Ray actor serves many nodes)."""
    return load_task(cfg)


@lru_cache(maxsize=4)
def _partitioners(cfg: RunConfig, num_partitions: int) -> tuple[Partitioner, Partitioner]:
    splits = _task(cfg).splits
    if cfg.partitioner == "dirichlet" and splits.task.kind == REGRESSION:
        raise ConfigError(
            "partitioner = 'dirichlet' splits by class label; a regression "
            "task has none, use partitioner = 'iid'"
        )
    train = build_partitioner(cfg, num_partitions)
    train.dataset = splits.train
    # Every node scores federated evaluation on an IID share of the held-out split.
    test = IidPartitioner(num_partitions=num_partitions)
    test.dataset = splits.test
    return train, test


@lru_cache(maxsize=16)
def load_local_data(
    cfg: RunConfig, partition_id: int, num_partitions: int, max_length: int
) -> LocalData:
    """Partition ``partition_id`` of the train split and of the held-out split, tokenized."""
    task = _task(cfg)
    train, test = _partitioners(cfg, num_partitions)
    return LocalData(
        train=task.encode(train.load_partition(partition_id), max_length),
        test=task.encode(test.load_partition(partition_id), max_length),
        task=task.info,
        tokenizer=task.preprocessor,
    )
