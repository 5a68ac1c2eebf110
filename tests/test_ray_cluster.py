"""The simulation on a Ray cluster that is already running, not the one Flower starts.

A Ray head is started on loopback (``ray start --head``, its own temp dir
and ports; :mod:`tests.ray_head`), the run's backend config names its
address (``init_args = {"address": ...}``, which Flower's Ray backend hands
to ``ray.init``), two rounds of a tiny BERT run on it, and the head is
stopped by its process group. Independent evidence that the run used the
head: the head's own session logs gain a driver log and worker logs. The
same through ``flwr run`` (``scripts/run_local.sh``), whose federation config
has no address: ``RAY_ADDRESS`` names the head, which ``ray.init`` reads.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from flwr.simulation import run_simulation

from client_app.app import build_client_app
from server_app.app import build_server_app
from tests.assets import tiny_bert_task
from tests.ray_head import ray_head
from tests.sim import TIMEOUTS, every_node, read_json

NUM_NODES = 4
ROUNDS = 2
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ray-cluster")
    overrides = {
        **tiny_bert_task(tmp, 120),
        **every_node(NUM_NODES),
        **TIMEOUTS,
        "fraction-evaluate": 0.0,
        "results-dir": str(tmp / "results"),
        "num-server-rounds": ROUNDS,
        "budget-profile": "params=0.6,params=1.0",
        "partitioner": "iid",
        "max-length": 16,
        "local-steps": 2,
        "batch-size": 8,
        "save-models": False,
    }
    with ray_head(num_cpus=2) as head:
        before = set(head.session_logs().iterdir())
        run_simulation(
            server_app=build_server_app(overrides),
            client_app=build_client_app(overrides),
            num_supernodes=NUM_NODES,
            # no num_cpus in init_args: Ray refuses it when joining a cluster
            backend_config={
                "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                "init_args": {"address": head.address},
            },
        )
        new_logs = {p.name for p in set(head.session_logs().iterdir()) - before}
        alive_after_run = head.process.poll() is None
    return tmp / "results", new_logs, alive_after_run, head


def test_two_rounds_ran_to_completion(run):
    results, *_ = run
    assert read_json(results, "status.json") == {"status": "completed"}
    rounds = read_json(results, "rounds.json")
    assert [r["round"] for r in rounds] == list(range(ROUNDS + 1))
    for row in rounds[1:]:
        assert len(row["clients"]) == NUM_NODES
        assert all(c["status"] == "accepted" for c in row["clients"])


def test_the_run_joined_the_existing_head_and_left_it_running(run):
    _, new_logs, alive_after_run, _ = run
    assert any(name.startswith("python-core-driver-") for name in new_logs), sorted(new_logs)
    assert any(name.startswith("python-core-worker-") for name in new_logs), sorted(new_logs)
    assert alive_after_run  # the simulation disconnects (ray.shutdown); the cluster stays


def test_the_head_is_stopped_by_its_process_group(run):
    *_, head = run
    assert head.process.poll() is not None
    assert not head.temp_dir.exists()


@pytest.fixture(scope="module")
def flwr_run(tmp_path_factory):
    """``flwr run`` (scripts/run_local.sh) with ``RAY_ADDRESS`` naming the head."""
    results = tmp_path_factory.mktemp("ray-address") / "results"
    tiny_vit = (
        'model-name="vit-tiny:image_size=8,patch_size=2,hidden_size=32,num_hidden_layers=2,'
        'intermediate_size=64,num_attention_heads=4"'
    )
    with ray_head(num_cpus=2) as head:
        before = set(head.session_logs().iterdir())
        env = {
            **os.environ,
            "RAY_ADDRESS": head.address,
            "PYTHONPATH": str(ROOT),
            "NUM_SUPERNODES": str(NUM_NODES),
            "RESULTS_DIR": str(results),
        }
        done = subprocess.run(
            [
                "bash",
                "scripts/run_local.sh",
                tiny_vit,
                'dataset="sklearn:digits"',
                f"num-server-rounds={ROUNDS}",
                "local-steps=2",
                "batch-size=16",
                "eval-max-examples=100",
                'partitioner="iid"',
                'budget-profile="params=0.5,params=1.0"',
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        new_logs = {p.name for p in set(head.session_logs().iterdir()) - before}
    return done, results, new_logs


def test_flwr_run_joins_the_cluster_named_by_ray_address(flwr_run):
    done, results, new_logs = flwr_run
    assert done.returncode == 0, done.stderr[-2000:]
    assert read_json(results, "status.json") == {"status": "completed"}
    assert [r["round"] for r in read_json(results, "rounds.json")] == list(range(ROUNDS + 1))
    assert any(name.startswith("python-core-driver-") for name in new_logs), sorted(new_logs)
    assert any(name.startswith("python-core-worker-") for name in new_logs), sorted(new_logs)
