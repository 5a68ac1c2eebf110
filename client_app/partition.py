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
from raffm_core.task.config import ConfigError, RunConfig
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


MIN_PARTITION_SIZE = 10
"""flwr-datasets' smallest Dirichlet partition (its default)."""


class SmallDirichletPartitioner(Partitioner):
    """Dirichlet label partitions of which none is empty, for many small partitions.

    flwr-datasets' ``DirichletPartitioner`` redraws until every partition holds
    ``min_partition_size`` examples and gives up after 10 draws, which it
    always does for 100 partitions of a few thousand examples (at most a
    handful of examples is then common). Here each label's examples are split
    by proportions drawn from ``Dirichlet(alpha)`` (seeded), once, and then
    single examples move from the largest partition to the smallest until
    every partition holds at least one.
    """

    def __init__(self, num_partitions: int, partition_by: str, alpha: float, seed: int) -> None:
        super().__init__()
        self._num_partitions = num_partitions
        self._partition_by = partition_by
        self._alpha = alpha
        self._seed = seed
        self._indices: list[list[int]] | None = None

    @property
    def num_partitions(self) -> int:
        return self._num_partitions

    def load_partition(self, partition_id: int) -> datasets.Dataset:
        if self._indices is None:
            labels = np.asarray(self.dataset[self._partition_by])
            self._indices = dirichlet_indices(labels, self._num_partitions, self._alpha, self._seed)
        return self.dataset.select(self._indices[partition_id])


def dirichlet_indices(
    labels: np.ndarray, num_partitions: int, alpha: float, seed: int
) -> list[list[int]]:
    """Per partition, sorted example indices: a seeded Dirichlet split of each label, none empty."""
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(num_partitions)]
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        rng.shuffle(members)
        shares = rng.dirichlet(np.full(num_partitions, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
        for part, chunk in zip(parts, np.split(members, cuts), strict=True):
            part.extend(chunk.tolist())
    while min(map(len, parts)) < 1:
        donor = max(range(num_partitions), key=lambda k: len(parts[k]))
        taker = min(range(num_partitions), key=lambda k: len(parts[k]))
        parts[taker].append(parts[donor].pop(int(rng.integers(len(parts[donor])))))
    return [sorted(part) for part in parts]


def evaluation_share(held_out: datasets.Dataset, partition_id: int, total: int) -> datasets.Dataset:
    """The node's contiguous share of the held-out split for federated evaluation.

    The same shares as ``datasets.Dataset.shard(total, partition_id,
    contiguous=True)`` (flwr-datasets' IID partitioner), but a share may be
    empty when there are more nodes than held-out examples: such a node
    cannot score (its evaluation reply is an error) and still trains.
    """
    positions = np.array_split(np.arange(len(held_out)), total)[partition_id]
    return held_out.select(positions.tolist())


def build_partitioner(cfg: RunConfig, num_partitions: int, num_examples: int) -> Partitioner:
    """The flwr-datasets partitioner of the train split named by ``partitioner``.

    Dirichlet: flwr-datasets' own partitioner (every partition at least
    :data:`MIN_PARTITION_SIZE` examples) where the train split has at least
    4 x 10 examples per partition, else :class:`SmallDirichletPartitioner`
    (at least 1 each); the choice is logged.

    Raises
    ------
    ConfigError
        If there are fewer examples than partitions.
    """
    if num_examples < num_partitions:
        raise ConfigError(
            f"the train split has {num_examples} examples for {num_partitions} partitions "
            "(num-supernodes); every node needs at least one: use fewer nodes or more data"
        )
    if cfg.partitioner == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    if num_examples >= 4 * MIN_PARTITION_SIZE * num_partitions:
        return DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by=LABEL,
            alpha=cfg.dirichlet_alpha,
            seed=cfg.seed,
        )
    log(
        INFO,
        "%d examples for %d Dirichlet partitions: fewer than %d each, so partitions of "
        "at least 1 example (SmallDirichletPartitioner)",
        num_examples,
        num_partitions,
        4 * MIN_PARTITION_SIZE,
    )
    return SmallDirichletPartitioner(num_partitions, LABEL, cfg.dirichlet_alpha, cfg.seed)


@lru_cache(maxsize=2)
def process_task(cfg: RunConfig) -> Task:
    """The run's workload, loaded once per process (a Ray actor serves many nodes)."""
    return load_task(cfg)


@lru_cache(maxsize=4)
def _drawn(cfg: RunConfig, num_partitions: int) -> tuple[Partitioner, datasets.Dataset]:
    """The train split's partitioner with its draw done, and the held-out split.

    The draw happens here, once per process, rather than in the first
    ``load_partition`` of each node: a draw that fails fails here.
    """
    task = process_task(cfg)
    splits = task.splits
    if cfg.partitioner == "dirichlet" and not splits.task.has_class_labels:
        raise ConfigError(
            f"partitioner = 'dirichlet' splits by class label; a {splits.task.kind} "
            "task has none, use partitioner = 'iid'"
        )
    train = build_partitioner(cfg, num_partitions, len(splits.train))
    train.dataset = splits.train
    try:
        train.load_partition(0)  # draws every partition's indices
    except ValueError as err:  # flwr-datasets gives up on a Dirichlet draw it cannot meet
        raise ConfigError(
            f"cannot draw {num_partitions} Dirichlet partitions (dirichlet-alpha = "
            f"{cfg.dirichlet_alpha}) of at least {MIN_PARTITION_SIZE} examples from the "
            f"{len(splits.train)} train examples of {cfg.dataset!r} ({err}); use a larger "
            "dirichlet-alpha, fewer nodes, more data or partitioner = 'iid'"
        ) from None
    # Every node scores federated evaluation on an IID share of the held-out split.
    return train, splits.test


_FAILED_DRAWS: dict[tuple[RunConfig, int], str] = {}
"""Draws that failed in this process, by (config, partitions): the reason.

A Ray actor serves hundreds of virtual nodes; without this each of them
would redo the failing draw (flwr-datasets tries 11 times) before replying
with the same error, and a 1,000-node query would look hung.
"""


def draw_partitions(cfg: RunConfig, num_partitions: int) -> tuple[Partitioner, datasets.Dataset]:
    """The train split's partitioner (drawn) and the held-out split, once per process.

    A failed draw is remembered too (``lru_cache`` forgets exceptions).

    Raises
    ------
    ConfigError
        If the partitions cannot be drawn: fewer examples than partitions,
        a Dirichlet draw flwr-datasets cannot meet, or a ``dirichlet``
        partitioner on a task without class labels.
    """
    failed = _FAILED_DRAWS.get((cfg, num_partitions))
    if failed is not None:
        raise ConfigError(failed)
    try:
        return _drawn(cfg, num_partitions)
    except ConfigError as err:
        _FAILED_DRAWS[(cfg, num_partitions)] = str(err)
        raise


def check_partition(cfg: RunConfig, partition_id: int, num_partitions: int) -> int:
    """The number of train examples of partition ``partition_id``; draws the partitions once.

    Raises
    ------
    ConfigError
        If the partitions cannot be drawn (too many nodes for the data, or a
        Dirichlet draw flwr-datasets cannot meet), or this one is empty.
    """
    train, _ = draw_partitions(cfg, num_partitions)
    size = len(train.load_partition(partition_id))
    if size < 1:
        raise ConfigError(
            f"partition {partition_id} of {num_partitions} of {cfg.dataset!r} is empty; "
            "use fewer nodes, more data or partitioner = 'iid'"
        )
    return size


def token_ids(data: LocalData) -> tuple[int, ...] | None:
    """Every token id of the node's data (train and evaluation share), sorted.

    With the tokenizer's special tokens, which the model may see whatever
    the data. ``None`` for data that is not token ids (images). Not cached:
    ``LocalData`` hashes by identity, and a new one is built for every message.
    """
    splits = [s for s in (data.train, data.test) if "input_ids" in s.column_names]
    if not splits:
        return None
    seen: set[int] = set(getattr(data.tokenizer, "all_special_ids", ()) or ())
    for split in splits:
        for row in split["input_ids"]:
            seen.update(row)
    return tuple(sorted(seen))


def load_local_data(
    cfg: RunConfig, partition_id: int, num_partitions: int, max_length: int
) -> LocalData:
    """Partition ``partition_id`` of the train split and of the held-out split, tokenized."""
    task = process_task(cfg)
    train, test = draw_partitions(cfg, num_partitions)
    local = train.load_partition(partition_id)
    return LocalData(
        train=task.encode(local, max_length),
        test=task.encode(evaluation_share(test, partition_id, num_partitions), max_length),
        task=task.info,
        tokenizer=task.preprocessor,
    )
