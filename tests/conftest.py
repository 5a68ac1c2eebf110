"""Fixtures shared by the test modules.

``flower_task`` is not autouse: some tests must run without a task identity.
A module that builds ``Message`` objects outside a Flower run opts in with
``pytestmark = pytest.mark.usefixtures("flower_task")``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import torch

from tests.fakes import task_identity
from tests.models import tiny_model


@pytest.fixture
def task_node_id() -> int:
    """The node id ``flower_task`` claims; a module playing one node overrides this."""
    return 0


@pytest.fixture
def flower_task(task_node_id: int) -> Iterator[None]:
    """A task identity for the test, so ``Message(...)`` can be built outside a Flower run."""
    with task_identity(node_id=task_node_id):
        yield


@pytest.fixture
def flwr_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Records of Flower's logger (which the apps and the strategies log to)."""
    caplog.set_level(logging.INFO, logger="flwr")
    return caplog


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    """A tiny BERT classifier, one per module; a module needing another model overrides it."""
    return tiny_model("bert")
