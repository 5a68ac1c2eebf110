"""Many virtual nodes: batched budget queries, early partition errors, 100 nodes at 10%.

The simulation runs 100 virtual nodes (a tiny BERT on a 600-row polarity
corpus, Dirichlet partitions) for two rounds with ``fraction-train`` 0.1.
Its oracle for who trains is the documented sampling rule recomputed with
numpy: nodes ordered by partition id, ``rng = default_rng([seed, round, 1])``
and ``rng.choice(100, 10, replace=False)``.
"""

from __future__ import annotations

import platform
import sys

import datasets
import numpy as np
import pytest
from flwr.app import Message

from client_app import partition
from client_app.partition import check_partition, draw_partitions, load_local_data
from raffm_core.task.config import ConfigError, RunConfig
from server_app.nodes import QUERY_BATCH, VERBOSE_NODES, query_budgets
from tests.assets import polarity_rows, tiny_bert_task
from tests.fakes import FakeGrid, respond_with
from tests.models import tiny_model
from tests.sim import TIMEOUTS, read_json, simulate

NUM_NODES = 100
ROUNDS = 2
SEED = 5


class BatchGrid(FakeGrid):
    """A FakeGrid that records how many messages each ``send_and_receive`` carried."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.batches: list[int] = []

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        messages = list(messages)
        self.batches.append(len(messages))
        return super().send_and_receive(messages, timeout=timeout)


@pytest.mark.usefixtures("flower_task")
def test_budget_queries_go_out_in_batches_and_log_a_summary(flwr_logs):
    from raffm_core import TrainingProfile, describe

    layout = describe(tiny_model("bert"))
    nodes = {1000 + i: ("params=1.0" if i % 2 else "params=0.01", i) for i in range(150)}
    respond = respond_with(budgets=nodes)
    grid = BatchGrid(nodes, lambda m: None if m.metadata.dst_node_id == 1007 else respond(m))
    usable, skipped = query_budgets(grid, nodes, layout, TrainingProfile(), timeout=5.0)
    assert grid.batches == [QUERY_BATCH, QUERY_BATCH, 150 - 2 * QUERY_BATCH]
    assert set(usable) == {n for n, (b, _) in nodes.items() if b == "params=1.0"} - {1007}
    assert set(skipped) == set(nodes) - set(usable)
    assert "no reply to the budget query" in skipped[1007]
    lines = [r.getMessage() for r in flwr_logs.records]
    assert not any(line.startswith("node ") for line in lines)  # 150 > VERBOSE_NODES
    assert "budgets of 74 nodes: 74 x params=1; 76 skipped" in lines
    assert any(
        line.startswith("75 nodes skipped: budget params=0.01 is below the smallest sub-network")
        for line in lines
    )
    assert len(nodes) > VERBOSE_NODES


@pytest.mark.filterwarnings("ignore:The specified min_partition_size:UserWarning")
def test_a_dirichlet_draw_that_cannot_be_met_fails_once_per_process(tmp_path):
    """flwr-datasets gives up after 11 draws; every later node gets the error at once."""
    path = tmp_path / "d.csv"
    rows = [{"label": y, "text": t} for y, t in polarity_rows(2000)]
    datasets.Dataset.from_list(rows).to_csv(path, index=False)
    cfg = RunConfig.from_mapping(
        {"dataset": str(path), "model-name": "embedded:minilm", "dirichlet-alpha": 0.01}
    )
    # 1600 train examples: 40 partitions take flwr-datasets' partitioner (min 10 each)
    with pytest.raises(ConfigError, match="cannot draw 40 Dirichlet partitions"):
        check_partition(cfg, 0, 40)
    misses = partition._drawn.cache_info().misses
    for pid in (1, 39):
        with pytest.raises(ConfigError, match="cannot draw 40 Dirichlet partitions"):
            load_local_data(cfg, pid, 40, 16)
    assert partition._drawn.cache_info().misses == misses  # remembered, not drawn again
    iid = RunConfig.from_mapping({**cfg.to_mapping(), "partitioner": "iid"})
    train, _ = draw_partitions(iid, 40)  # another config is another draw
    assert sum(len(train.load_partition(i)) for i in range(40)) == 1600


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scale")
    overrides = {
        **tiny_bert_task(tmp, 600),
        **TIMEOUTS,
        "results-dir": str(tmp / "results"),
        "num-server-rounds": ROUNDS,
        "seed": SEED,
        "min-available-nodes": NUM_NODES,
        "fraction-train": 0.1,
        "min-train-nodes": 2,
        "min-replies": 10,
        "fraction-evaluate": 0.0,
        "budget-profile": "params=0.5,params=0.7,params=1.0",
        "partitioner": "dirichlet",
        "max-length": 16,
        "local-steps": 2,
        "batch-size": 8,
        "lr": 1e-3,
        "save-models": False,
    }
    simulate(overrides, NUM_NODES)
    return tmp / "results"


def test_ten_of_a_hundred_nodes_train_per_round_as_the_seeded_draw_says(run_dir):
    rounds = read_json(run_dir, "rounds.json")
    assert [r["round"] for r in rounds] == list(range(ROUNDS + 1))
    for row in rounds[1:]:
        clients = row["clients"]
        assert all(c["status"] == "accepted" for c in clients)
        expected = np.random.default_rng([SEED, row["round"], 1]).choice(100, 10, replace=False)
        assert sorted(c["partition-id"] for c in clients) == sorted(expected.tolist())
        tiers = ["params=0.5", "params=0.7", "params=1"]
        assert all(c["budget"] == tiers[c["partition-id"] % 3] for c in clients)
        assert all(c["train-time-s"] > 0 for c in clients)


def test_the_server_keeps_per_round_records_of_the_sampled_nodes_only(run_dir):
    summary = read_json(run_dir, "summary.json")
    assert summary["rounds"] == ROUNDS and summary["client-rounds"] == ROUNDS * 10
    assert summary["replies-rejected"] == 0
    # rounds.json grows with the clients sampled, not with the federation
    per_client = (run_dir / "rounds.json").stat().st_size / summary["client-rounds"]
    assert per_client < 2_000, per_client


def test_release_memory_trims_unless_turned_off(monkeypatch):
    from raffm_core.task import memory

    monkeypatch.setenv(memory.TRIM_ENV, "0")
    assert memory.release_memory() is False
    monkeypatch.delenv(memory.TRIM_ENV)
    assert memory.release_memory() is (memory._malloc_trim() is not None)
    if sys.platform == "linux" and platform.libc_ver()[0] == "glibc":
        assert memory._malloc_trim() is not None


def test_release_memory_freezes_survivors_and_still_collects_new_cycles():
    """After the first call the survivors are frozen; cycles made later are still freed."""
    import gc
    import weakref

    from raffm_core.task import memory

    class Node:
        pass

    memory.release_memory()
    assert gc.get_freeze_count() > 0
    frozen = gc.get_freeze_count()
    a, b = Node(), Node()
    a.other, b.other = b, a  # a cycle: refcounting alone never frees it
    gone = weakref.ref(a)
    del a, b
    memory.release_memory()
    assert gone() is None
    assert gc.get_freeze_count() == frozen  # frozen once, not at every call


def test_mmap_threshold_is_pinned_only_when_asked(monkeypatch):
    from raffm_core.task import memory

    def pin(**env):
        for key in (memory.THRESHOLD_ENV, "MALLOC_MMAP_THRESHOLD_"):
            monkeypatch.delenv(key, raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        memory.pin_mmap_threshold.cache_clear()
        return memory.pin_mmap_threshold()

    glibc = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"
    assert pin() is False  # the default: glibc's own, moving threshold
    assert pin(RAFFM_MMAP_THRESHOLD="0") is False
    assert pin(RAFFM_MMAP_THRESHOLD="1048576") is glibc
    assert pin(RAFFM_MMAP_THRESHOLD="1048576", MALLOC_MMAP_THRESHOLD_="131072") is False
    with pytest.raises(ValueError, match="RAFFM_MMAP_THRESHOLD='1MB': expected a number"):
        pin(RAFFM_MMAP_THRESHOLD="1MB")
    memory.pin_mmap_threshold.cache_clear()
