"""A mistake stops scripts/run_local.sh, make run and scripts/tls/run.sh before Flower starts.

Each script runs for real; the preflight (``scripts/preflight.py``) must
refuse the run with exactly one ``preflight:`` line and exit 2 before the
SuperLink, Ray or ``flwr run`` start. That they never started shows in what
the scripts leave: ``run_local.sh`` creates the results directory (where
``flwr run``'s log goes) only after the preflight and stops every process it
started with a log line; ``tls/run.sh`` writes ``logs/run.log`` with ``flwr run``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        command,
        cwd=ROOT,
        # PYTHONPATH: the scripts import this checkout's code, not what the venv may have installed
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def preflight_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("preflight: ")]


def test_run_local_with_a_bad_key_fails_in_preflight_and_starts_nothing(tmp_path):
    results = tmp_path / "results"
    done = run(
        ["bash", "scripts/run_local.sh", "learning-rate=0.1"],
        {"RESULTS_DIR": str(results), "NUM_SUPERNODES": "3"},
    )
    assert done.returncode == 2, done.stderr
    lines = preflight_lines(done.stderr)
    assert len(lines) == 1 and "unknown run-config key(s) ['learning-rate']" in lines[0]
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout
    assert not results.exists()  # flwr run's log would be in it
    assert "stopping the processes" not in done.stderr  # no SuperLink, SuperExec or Ray


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_run_passes_string_overrides_as_the_readme_writes_them(tmp_path):
    # make and the shell strip the inner quotes; the strings must still arrive as
    # strings, so the only mistake found is the one made on purpose (rounds = 0)
    args = 'strategy="fedrolex" lora-target-modules="query, value" num-server-rounds=0'
    done = run(
        ["make", "-o", "setup", "run", f"ARGS={args}"],
        {"RESULTS_DIR": str(tmp_path / "results"), "NUM_SUPERNODES": "3"},
    )
    assert done.returncode != 0
    assert preflight_lines(done.stderr) == ["preflight: num-server-rounds = 0, expected >= 1"]
    assert not (tmp_path / "results").exists()


def test_tls_run_with_a_bad_value_fails_in_preflight_before_flwr_run(tmp_path):
    done = run(
        ["bash", "scripts/tls/run.sh", 'strategy="foo" min-available-nodes=3'],
        {"DEPLOY_DIR": str(tmp_path / "deploy")},
    )
    assert done.returncode == 2, done.stderr
    lines = preflight_lines(done.stderr)
    assert len(lines) == 1 and "strategy = 'foo' is not supported" in lines[0]
    assert not (tmp_path / "deploy" / "logs" / "run.log").exists()
