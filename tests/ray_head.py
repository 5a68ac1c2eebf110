"""A private Ray head on loopback, started and stopped by process id (tests and scripts).

``ray start --head`` alone would write its address to
``/tmp/ray/ray_current_cluster``, and every later ``ray.init()`` on the
machine (another simulation, another test) would then join this cluster.
So the head gets its own ``--temp-dir`` and its own ports (the defaults,
such as the dashboard agent's 52365 and the Ray Client server's 10001, may
be taken by another Ray on the machine), runs with ``--block`` in a new
session, and is stopped by signalling that session's process group. ``ray
stop`` is not used: it kills every Ray process on the machine by name.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

RAY = Path(sys.executable).with_name("ray")
"""The venv's ``ray`` command: the head must run the driver's Ray and Python."""


@dataclass(frozen=True)
class RayHead:
    """A running head: its address (``host:port``), process and temp dir."""

    address: str
    process: subprocess.Popen
    temp_dir: Path

    def session_logs(self) -> Path:
        """The head's session log folder (a driver that joins leaves its log here)."""
        return self.temp_dir / "session_latest" / "logs"


def free_ports(count: int) -> list[int]:
    """``count`` distinct free TCP ports on loopback (the kernel picks them)."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@contextlib.contextmanager
def ray_head(num_cpus: int = 2, startup_s: float = 90.0) -> Iterator[RayHead]:
    """Start a Ray head on 127.0.0.1, yield it, and stop it by process group.

    Raises
    ------
    RuntimeError
        If the head exits or does not come up within ``startup_s`` seconds
        (the message carries the end of its output).
    """
    # short: Ray's unix socket paths under it must stay below 108 characters
    temp_dir = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))
    port, client, agent, agent_grpc, metrics, env_agent = free_ports(6)
    log = temp_dir / "head.log"
    env = {
        **os.environ,
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    }
    env.pop("RAY_ADDRESS", None)
    command = [
        str(RAY),
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={port}",
        f"--num-cpus={num_cpus}",
        f"--temp-dir={temp_dir}",
        "--include-dashboard=false",
        "--disable-usage-stats",
        f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={env_agent}",
    ]
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    head = RayHead(f"127.0.0.1:{port}", process, temp_dir)
    try:
        _wait_until_up(head, log, startup_s)
        yield head
    finally:
        stop_head(head)


def _wait_until_up(head: RayHead, log: Path, startup_s: float) -> None:
    deadline = time.monotonic() + startup_s
    address_file = head.temp_dir / "ray_current_cluster"
    while time.monotonic() < deadline:
        if head.process.poll() is not None:
            raise RuntimeError(f"ray start exited ({head.process.returncode}): {_tail(log)}")
        if address_file.exists() and b"Ray runtime started" in log.read_bytes():
            return
        time.sleep(0.5)
    raise RuntimeError(f"the Ray head was not up within {startup_s:.0f} s: {_tail(log)}")


def stop_head(head: RayHead, grace_s: float = 20.0) -> None:
    """SIGTERM the head's process group (``ray start`` and all it started), then SIGKILL."""
    pgid = head.process.pid  # start_new_session: the group is led by `ray start`
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and _group_alive(pgid):
            time.sleep(0.2)
        if not _group_alive(pgid):
            break
    with contextlib.suppress(subprocess.TimeoutExpired):
        head.process.wait(timeout=5)
    shutil.rmtree(head.temp_dir, ignore_errors=True)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    # zombies still count for killpg; a group of zombies only is gone
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _tail(log: Path, chars: int = 1500) -> str:
    try:
        return log.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no output)"
