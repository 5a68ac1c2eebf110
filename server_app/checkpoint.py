"""Checkpoints after every round, and resuming a run from the last complete one.

After each round (and after the initial evaluation, as round 0) the
ServerApp writes ``checkpoint.pt`` in ``checkpoint-dir`` (default: the
results directory). The file is written to a temporary name in the same
folder, flushed to disk, then renamed over the old one (``os.replace``), so a
kill at any moment leaves either the previous or the new checkpoint, never a
torn one. It holds:

* ``round``: the last complete round (its central evaluation included);
* ``arrays``: the global model after that round, in the order the strategy
  keeps it (prioritized);
* ``optimizer``: :meth:`raffm_core.ServerOptimizer.state_dict` (FedAdam's
  moments and step count);
* ``rng``: the global torch, numpy and Python generator states. The strategy
  itself draws nothing from them: node sampling and ``sample``-mode spec
  draws use generators seeded by ``(seed, round, ...)``, which a resumed run
  rebuilds from the round number alone;
* ``history`` and ``central``: per round, the clients' log and the central
  metrics so far, so ``rounds.json`` and ``summary.json`` of a resumed run
  cover every round;
* ``best``: the best round and score so far, and its weights when they are
  not the current ones;
* ``fingerprint``: the run-config values that shape the trajectory. A
  resumed run must match them (only the keys in :data:`MAY_CHANGE`, such as
  ``num-server-rounds``, may differ).

With ``resume = true`` the ServerApp reads the checkpoint, restores all of
the above and runs rounds ``k+1 .. num-server-rounds`` through Flower's own
loop (:class:`RoundOffset` shifts its round numbers).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from logging import INFO
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from raffm_core import CheckpointError, ServerOptimizer
from raffm_core.task.config import RunConfig

from .records import RoundLog

CHECKPOINT_FILE = "checkpoint.pt"
FORMAT = 1
MAY_CHANGE = frozenset(
    {
        "resume",
        "checkpoint-dir",
        "num-server-rounds",
        "results-dir",
        "round-timeout-s",
        "query-timeout-s",
        "min-available-nodes",
        "save-models",
        "save-round-models",
    }
)
"""Run-config keys a resumed run may set differently from the interrupted one."""


@dataclass
class Checkpoint:
    """Everything a resumed run needs (see the module docstring)."""

    server_round: int
    arrays: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    rng: dict[str, Any]
    fingerprint: dict[str, Any]
    history: dict[int, RoundLog] = field(default_factory=dict)
    central: dict[int, dict[str, Any]] = field(default_factory=dict)
    best_round: int | None = None
    best_score: float = float("-inf")
    best_arrays: dict[str, torch.Tensor] | None = None
    importance: dict[str, torch.Tensor] | None = None  # salience taylor: the tracker's estimates


def checkpoint_path(cfg: RunConfig, results_dir: Path) -> Path:
    """``<checkpoint-dir>/checkpoint.pt``; an empty ``checkpoint-dir`` is the results directory."""
    folder = Path(cfg.checkpoint_dir).expanduser().resolve() if cfg.checkpoint_dir else results_dir
    return folder / CHECKPOINT_FILE


def fingerprint(cfg: RunConfig) -> dict[str, Any]:
    """The run-config values a resumed run must share with the interrupted one."""
    return {k: v for k, v in cfg.to_mapping().items() if k not in MAY_CHANGE}


def check_fingerprint(saved: Mapping[str, Any], cfg: RunConfig, path: Path) -> None:
    """Raise :class:`CheckpointError` naming every key whose value differs."""
    now = fingerprint(cfg)
    differ = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if differ:
        details = ", ".join(f"{k}: {saved.get(k)!r} then, {now.get(k)!r} now" for k in differ)
        raise CheckpointError(
            f"{path} was written by a run with another configuration ({details}); "
            f"only {sorted(MAY_CHANGE)} may change on resume"
        )


def capture_rng() -> dict[str, Any]:
    """The global torch, numpy and Python generator states, as plain values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, state, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
        "python": [version, list(state), gauss_next],
    }


def restore_rng(rng: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    torch.set_rng_state(rng["torch"])
    kind, keys, pos, has_gauss, gauss = rng["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, state, gauss_next = rng["python"]
    random.setstate((version, tuple(state), gauss_next))


def save_checkpoint(path: Path, checkpoint: Checkpoint) -> None:
    """Write ``checkpoint`` to ``path`` atomically: a temporary file, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "format": FORMAT,
        "round": checkpoint.server_round,
        "arrays": checkpoint.arrays,
        "optimizer": checkpoint.optimizer,
        "rng": checkpoint.rng,
        "best-arrays": checkpoint.best_arrays,
        "importance": checkpoint.importance,
        # the rest is plain data: JSON keeps it readable and loadable with weights_only
        "meta": json.dumps(
            {
                "fingerprint": checkpoint.fingerprint,
                "history": {str(r): e.to_dict() for r, e in checkpoint.history.items()},
                "central": {str(r): m for r, m in checkpoint.central.items()},
                "best-round": checkpoint.best_round,
                "best-score": checkpoint.best_score,
            }
        ),
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises
    ------
    CheckpointError
        If the file is missing, unreadable or of another format.
    """
    if not path.is_file():
        raise CheckpointError(
            f"resume = true but there is no checkpoint at {path}; set checkpoint-dir "
            "(or results-dir) to the folder of the interrupted run"
        )
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        meta = json.loads(data["meta"])
        if data["format"] != FORMAT:
            raise CheckpointError(f"{path} has format {data['format']}, expected {FORMAT}")
        return Checkpoint(
            server_round=int(data["round"]),
            arrays=data["arrays"],
            optimizer=data["optimizer"],
            rng=data["rng"],
            fingerprint=meta["fingerprint"],
            history={int(r): RoundLog.from_dict(e) for r, e in meta["history"].items()},
            central={int(r): m for r, m in meta["central"].items()},
            best_round=meta["best-round"],
            best_score=meta["best-score"],
            best_arrays=data["best-arrays"],
            importance=data.get("importance"),
        )
    except CheckpointError:
        raise
    except Exception as err:  # a torn or foreign file: say which and why
        raise CheckpointError(f"cannot read checkpoint {path}: {err!r}") from err


class Checkpointer:
    """Saves a checkpoint after every round; on resume, restores what it saved.

    Call it as ``on_round_end(server_round, arrays, metrics)`` of
    :meth:`server_app.strategy.RaFFM.start`.

    Parameters
    ----------
    cfg : RunConfig
    path : Path
        The checkpoint file (:func:`checkpoint_path`).
    strategy : RaFFM
        Its ``server_optimizer`` and ``history`` are saved and restored.
    evaluator : CentralEvaluator
        Its best round, score and weights are saved and restored.
    """

    def __init__(self, cfg: RunConfig, path: Path, strategy: Any, evaluator: Any) -> None:
        self.cfg = cfg
        self.path = path
        self.strategy = strategy
        self.evaluator = evaluator
        self.central: dict[int, dict[str, Any]] = {}

    def restore(self) -> tuple[int, ArrayRecord]:
        """Load and check the checkpoint, restore the state; ``(last round, global arrays)``.

        Raises
        ------
        CheckpointError
            If there is no usable checkpoint, or it belongs to another configuration.
        """
        saved = load_checkpoint(self.path)
        check_fingerprint(saved.fingerprint, self.cfg, self.path)
        self.strategy.server_optimizer = ServerOptimizer.from_state_dict(saved.optimizer)
        self.strategy.history = saved.history
        tracker = getattr(self.strategy, "importance", None)
        if tracker is not None and saved.importance is not None:
            tracker.load_state_dict(saved.importance)
        self.central = dict(saved.central)
        best = saved.best_arrays
        if best is None and saved.best_round == saved.server_round:
            best = {k: v.clone() for k, v in saved.arrays.items()}
        self.evaluator.best_round, self.evaluator.best_score = saved.best_round, saved.best_score
        self.evaluator.best_state = best
        restore_rng(saved.rng)
        log(
            INFO,
            "resuming from %s: round %d complete, continuing with round %d of %d",
            self.path,
            saved.server_round,
            saved.server_round + 1,
            self.cfg.num_server_rounds,
        )
        return saved.server_round, ArrayRecord(saved.arrays)

    def __call__(
        self, server_round: int, arrays: ArrayRecord, metrics: MetricRecord | None
    ) -> None:
        """Save the checkpoint of the round that just completed."""
        if metrics is not None:
            self.central[server_round] = dict(metrics)
        ev = self.evaluator
        save_checkpoint(
            self.path,
            Checkpoint(
                server_round=server_round,
                arrays=arrays.to_torch_state_dict(),
                optimizer=self.strategy.server_optimizer.state_dict(),
                rng=capture_rng(),
                fingerprint=fingerprint(self.cfg),
                history=self.strategy.history,
                central=self.central,
                best_round=ev.best_round,
                best_score=ev.best_score,
                best_arrays=None if ev.best_round == server_round else ev.best_state,
                importance=(
                    None
                    if getattr(self.strategy, "importance", None) is None
                    else self.strategy.importance.state_dict()
                ),
            ),
        )


class RoundOffset(Strategy):
    """Resumes ``inner`` after round ``offset``: Flower's loop with shifted round numbers.

    ``Strategy.start`` always counts rounds from 1. :meth:`start` runs it on
    this wrapper for ``num_rounds - offset`` rounds, so rounds
    ``offset+1 .. num_rounds`` of ``inner`` run, and ``inner`` sees the true
    round numbers (they seed node sampling). ``inner`` is a
    :class:`server_app.strategy.RaFFM` (its ``prepare`` and ``reporting``
    hooks are used as its own ``start`` uses them).
    """

    def __init__(self, inner: Strategy, offset: int) -> None:
        if offset < 1:
            raise ValueError(f"offset must be >= 1 (a completed round), got {offset}")
        self.inner = inner
        self.offset = offset

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
        *,
        on_round_end: Callable[[int, ArrayRecord, MetricRecord | None], None] | None = None,
    ) -> Result:
        """Run rounds ``offset+1 .. num_rounds`` from ``initial_arrays`` (round ``offset``'s model).

        The initial evaluation is skipped (it was done before the
        interruption); the result's histories carry the true round numbers.
        """
        if self.offset >= num_rounds:
            log(INFO, "all %d rounds were complete already", num_rounds)
            return Result(arrays=initial_arrays)
        self.inner.prepare(grid, num_rounds)
        report = self.inner.reporting(evaluate_fn, on_round_end)

        def evaluate(flower_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            return None if flower_round == 0 else report(flower_round + self.offset, arrays)

        result = Strategy.start(
            self,
            self.inner.progress_grid(grid),
            initial_arrays,
            num_rounds - self.offset,
            timeout,
            train_config,
            evaluate_config,
            evaluate,
        )
        for history in (
            result.train_metrics_clientapp,
            result.evaluate_metrics_clientapp,
            result.evaluate_metrics_serverapp,
        ):
            shifted = {r + self.offset: m for r, m in history.items()}
            history.clear()
            history.update(shifted)
        return result

    def summary(self) -> None:
        """Log the inner strategy's summary."""
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """As the inner strategy, for round ``server_round + offset``."""
        return self.inner.configure_train(server_round + self.offset, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """As the inner strategy, for round ``server_round + offset``."""
        return self.inner.aggregate_train(server_round + self.offset, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """As the inner strategy, for round ``server_round + offset``."""
        return self.inner.configure_evaluate(server_round + self.offset, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """As the inner strategy, for round ``server_round + offset``."""
        return self.inner.aggregate_evaluate(server_round + self.offset, replies)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
