"""A real deployment on loopback, driven by the scripts in scripts/tls/.

A SuperLink with TLS and SuperNode authentication, three SuperNodes whose
keys are registered (budgets ``params=0.5``, ``params=0.75`` and ``auto``),
a tiny BERT and two rounds. Then two nodes that must be refused: one with an
unregistered key, one in plaintext. Last, the README's restart (``stop.sh``,
then the start scripts again) must bring every node back, and a restart after
the SuperLink was stopped before its nodes (they stay "online" there, so
their activation is refused with exit code 305) must fail ``start_supernodes.sh``.

Everything runs in a private folder (certificates, FLWR_HOME, the
SuperLink's database, logs) on a port picked at runtime. Every daemon is
started by the scripts in its own session and stopped by its pid by
``scripts/tls/stop.sh``, also when a test fails; the refused SuperNodes
are started here and stopped by their pid.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.assets import save_tiny_bert, write_polarity_csv

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "scripts" / "tls"
BUDGETS = ("params=0.5", "params=0.75", "auto")
ROUNDS = 2

pytestmark = pytest.mark.skipif(
    not all(shutil.which(tool) for tool in ("openssl", "ssh-keygen", "setsid")),
    reason="needs openssl, ssh-keygen and setsid",
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Deployment:
    """The scripts' environment and helpers to call them."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.env = {
            **os.environ,
            "DEPLOY_DIR": str(folder),
            "SUPERLINK_PORT": str(free_port()),
            "PATH": f"{ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}",
            "PYTHONPATH": str(ROOT),  # run.sh's preflight imports this checkout's code
        }
        self.env.pop("FLWR_HOME", None)  # the scripts' default: a folder of the deployment

    def script(self, name: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        result = subprocess.run(
            ["bash", str(DEPLOY / name), *args],
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert result.returncode == 0, f"{name} failed:\n{result.stdout}\n{result.stderr}"
        return result

    def flwr_json(self, *args: str) -> dict:
        result = subprocess.run(
            ["flwr", *args, "--format", "json"],
            env={**self.env, "FLWR_HOME": str(self.folder / "flwr-home")},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        return json.loads(result.stdout)

    def supernode(self, *args: str, timeout: float = 90) -> tuple[int, str]:
        """Run a SuperNode in the foreground until it gives up; stop it by pid on timeout."""
        command = [
            "flower-supernode",
            "--superlink",
            f"127.0.0.1:{self.env['SUPERLINK_PORT']}",
            "--port",
            str(free_port()),
            "--node-config",
            'budget="params=0.5" partition-id=0 num-partitions=3',
            "--max-retries",
            "2",
            *args,
        ]
        env = {**self.env, "FLWR_HOME": str(self.folder / "refused-node")}
        log = self.folder / "logs" / f"refused-{free_port()}.log"
        # Output to a file, not a pipe: the SuperExec the SuperNode spawns can
        # outlive it for a while and would hold a pipe open.
        with log.open("w") as out:
            process = subprocess.Popen(
                command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            try:  # the SuperNode's session, SuperExec included
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait(timeout=30)
        output = log.read_text()
        if code is None:
            pytest.fail(f"the SuperNode was not refused within {timeout} s:\n{output}")
        return code, output

    def node_ids(self) -> set[int]:
        return {
            int(node["node-id"]) for node in self.flwr_json("supernode", "ls", "raffm-tls")["nodes"]
        }


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    folder = tmp_path_factory.mktemp("deployment")
    deploy = Deployment(folder)
    try:
        # node-0..2 are registered below; node-3 is made but never registered
        deploy.script("make_certs.sh", str(len(BUDGETS) + 1))
        deploy.script("start_superlink.sh")
        deploy.script("configure_cli.sh")
        deploy.script("register_nodes.sh", str(len(BUDGETS)))
        yield deploy
    finally:
        subprocess.run(["bash", str(DEPLOY / "stop.sh")], env=deploy.env, timeout=60, check=False)


@pytest.fixture(scope="module")
def finished_run(deployment):
    """Three SuperNodes and a two-round run of a tiny model."""
    folder = deployment.folder
    model = save_tiny_bert(folder / "model")
    dataset = write_polarity_csv(folder / "polarity.csv", 150)
    results = folder / "results"
    deployment.script("start_supernodes.sh", *BUDGETS)
    run_config = " ".join(
        [
            f'model-name="{model}"',
            f'dataset="{dataset}"',
            f'results-dir="{results}"',
            f"min-available-nodes={len(BUDGETS)}",
            f"min-replies={len(BUDGETS)}",
            f"num-server-rounds={ROUNDS}",
            'partitioner="iid"',
            "max-length=16",
            "local-steps=2",
            "batch-size=8",
            "save-models=false",
            "query-timeout-s=120.0",
            "round-timeout-s=240.0",
        ]
    )
    # run.sh exits non-zero unless `flwr ls` reports the run finished:completed
    result = deployment.script("run.sh", run_config, timeout=600)
    return result, results


def test_superlink_serves_tls_only_to_clients_that_trust_our_ca(deployment):
    import ssl

    port = int(deployment.env["SUPERLINK_PORT"])
    trusted = ssl.create_default_context(cafile=str(deployment.folder / "certs" / "ca.crt"))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        with trusted.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        with pytest.raises(ssl.SSLCertVerificationError):
            ssl.create_default_context().wrap_socket(sock, server_hostname="127.0.0.1")


def test_unregistered_key_is_refused_and_gets_no_work(deployment):
    registered = deployment.node_ids()
    assert len(registered) == len(BUDGETS)
    code, output = deployment.supernode(
        "--root-certificates",
        str(deployment.folder / "certs" / "ca.crt"),
        "--auth-supernode-private-key",
        str(deployment.folder / "certs" / f"node-{len(BUDGETS)}"),
    )
    assert code != 0
    assert "Failed to activate SuperNode" in output, output
    assert deployment.node_ids() == registered  # it never became a node to send work to


def test_plaintext_supernode_is_refused(deployment):
    registered = deployment.node_ids()
    # no key either: Flower itself refuses to send a key over plaintext, so
    # this node really dials the TLS port in plaintext and the SuperLink refuses it
    code, output = deployment.supernode("--insecure")
    assert code != 0
    assert "Starting insecure channel" in output, output
    assert "could not establish a connection to the SuperLink" in output, output
    assert deployment.node_ids() == registered


def test_run_completes_and_nodes_get_specs_that_differ_by_budget(deployment, finished_run):
    result, results = finished_run
    assert "status finished:completed" in result.stderr
    registered = deployment.node_ids()
    rounds = json.loads((results / "rounds.json").read_text())
    assert [row["round"] for row in rounds] == list(range(ROUNDS + 1))
    for row in rounds[1:]:
        clients = {c["budget"]: c for c in row["clients"]}
        assert {c["node"] for c in clients.values()} == registered
        assert all(c["status"] == "accepted" for c in clients.values())
        (auto,) = [b for b in clients if b.startswith("memory-mb=")]
        assert sorted(clients) == sorted(["params=0.5", "params=0.75", auto])
        share = {budget: c["params-fraction"] for budget, c in clients.items()}
        assert share["params=0.5"] <= 0.5 + 1e-9 < share["params=0.75"] <= 0.75 + 1e-9
        # GBs free on a test machine: the auto node fits a larger sub-network
        assert share[auto] > share["params=0.75"]


def test_auto_node_logged_what_it_measured(deployment, finished_run):
    log = (deployment.folder / "logs" / "supernode-2.log").read_text()
    assert "budget auto: measured" in log and "reporting memory-mb=" in log, log[-3000:]


def test_restart_after_stop_connects_every_node(deployment, finished_run):
    # the README's restart: stop.sh, then start_superlink.sh and start_supernodes.sh again;
    # stop.sh stops the nodes first, so each deactivates itself and may come back at once
    deployment.script("stop.sh")
    deployment.script("start_superlink.sh")
    result = deployment.script("start_supernodes.sh", *BUDGETS)
    for i in range(len(BUDGETS)):
        assert f"supernode-{i} is connected" in result.stderr, result.stderr


def test_a_supernode_that_exits_fails_the_start(deployment, finished_run):
    # the SuperLink stopped before its nodes: they stay online in its database for two
    # heartbeats, and their restart is refused with exit code 305
    pid_file = deployment.folder / "pids" / "superlink.pid"
    pid = int(pid_file.read_text())
    os.killpg(pid, signal.SIGTERM)
    for _ in range(150):
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    pid_file.unlink()
    deployment.script("stop.sh")
    deployment.script("start_superlink.sh")
    result = subprocess.run(
        ["bash", str(DEPLOY / "start_supernodes.sh"), *BUDGETS],
        env=deployment.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 1, result.stderr
    assert "exited (Exit Code: 305): [code: 2004] Failed to activate SuperNode." in result.stderr
    assert "not every SuperNode is up" in result.stderr
