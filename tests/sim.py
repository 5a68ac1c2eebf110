"""Running the ServerApp and ClientApp in-process under Flower's simulation engine."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.serverapp import ServerApp
from flwr.simulation import run_simulation

from client_app.app import build_client_app
from server_app.app import build_server_app

BACKEND = {
    "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
    "init_args": {"num_cpus": 2},
}
"""Ray on this 2-core machine: one CPU per ClientApp actor."""

TIMEOUTS = {"query-timeout-s": 180.0, "round-timeout-s": 120.0}
"""Run-config overrides: generous timeouts for a simulated federation on a busy machine."""


def every_node(num_nodes: int) -> dict[str, Any]:
    """Run-config overrides: all ``num_nodes`` nodes train and evaluate in every round.

    A round updates the model only if every node's reply is accepted.
    """
    return {
        "min-available-nodes": num_nodes,
        "fraction-train": 1.0,
        "min-replies": num_nodes,
        "fraction-evaluate": 1.0,
        "min-evaluate-nodes": num_nodes,
    }


def simulate(
    overrides: Mapping[str, Any], num_nodes: int, server_app: ServerApp | None = None
) -> None:
    """Run a federation of ``num_nodes`` with run-config ``overrides`` (kebab-case).

    ``server_app`` replaces the app's own ServerApp (built from ``overrides``).
    """
    run_simulation(
        server_app=server_app or build_server_app(overrides),
        client_app=build_client_app(overrides),
        num_supernodes=num_nodes,
        backend_config=BACKEND,
    )


def read_json(run_dir: Path, name: str) -> Any:
    """A JSON output of a run (``summary.json``, ``rounds.json``, ...)."""
    return json.loads((Path(run_dir) / name).read_text())
