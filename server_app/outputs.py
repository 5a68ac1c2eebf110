"""What a run leaves behind: summary.json, rounds.json, run-config.json, models, plots.

Byte counts are those of the ArrayRecords that travel (``count_bytes()``):
``bytes-down`` is what a node was sent, ``bytes-up`` what it sent back.
Full-model FL would move ``full-model-bytes`` each way, per client and round.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers or in Ray workers
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from transformers import PreTrainedModel, PreTrainedTokenizerBase  # noqa: E402

from raffm_core.task.config import RunConfig  # noqa: E402
from raffm_core.task.keys import NUM_EXAMPLES  # noqa: E402

from .memory import PLOT as MEMORY_PLOT  # noqa: E402
from .memory import memory_rows, plot_memory_budget  # noqa: E402
from .records import RoundLog  # noqa: E402

SUMMARY = "summary.json"
STATUS = "status.json"
ROUNDS = "rounds.json"
RUN_CONFIG = "run-config.json"
VALIDATION_PREFIX = "val-"
"""Prefix of the central metrics scored on the validation split."""


def prepare_results_dir(path: str) -> Path:
    """The results directory, absolute and created."""
    out = Path(path).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_status(out: Path, error: BaseException | None) -> None:
    """``status.json``: ``{"status": "completed"}``, or ``"failed"`` with the error's one line."""
    status: dict[str, Any] = {"status": "completed" if error is None else "failed"}
    if error is not None:
        status["error"] = " ".join(f"{type(error).__name__}: {error}".split())
    write_json(out / STATUS, status)


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: Path) -> None:
    """An HF folder that ``from_pretrained`` loads: weights, config and tokenizer."""
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def write_json(path: Path, data: Any) -> None:
    """Strict JSON: non-finite floats become ``null``."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_finite(data), indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


def _finite(data: Any) -> Any:
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, Mapping):
        return {str(k): _finite(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [_finite(v) for v in data]
    return data


def round_rows(
    history: Mapping[int, RoundLog], central: Mapping[int, Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """One row per round (round 0 is the initial model): central metrics, then clients."""
    rows = []
    for server_round in sorted(set(central) | set(history)):
        row: dict[str, Any] = {"round": server_round}
        row.update({k: v for k, v in central.get(server_round, {}).items() if k != NUM_EXAMPLES})
        if server_round in history:
            row.update(history[server_round].to_dict())
        rows.append(row)
    return rows


def summarize(
    history: Mapping[int, RoundLog],
    central: Mapping[int, Mapping[str, Any]],
    primary: str,
    full_model_bytes: int,
    wall_time_s: float,
) -> dict[str, Any]:
    """The headline figures of a run (``summary.json``).

    ``final-accuracy`` and ``best-accuracy`` hold the task's primary metric
    (named in ``primary-metric``: accuracy, or Pearson's r for regression) on
    the test split. With a validation split, ``best-round`` is chosen on it
    (``val-best-accuracy``), and ``best-accuracy`` is the test score of that
    round; without one, ``best-round`` is the best test round.
    """
    clients = [c for entry in history.values() for c in entry.clients]
    scored = {r: m[primary] for r, m in central.items() if primary in m}
    val_key = VALIDATION_PREFIX + primary
    chosen = {r: m[val_key] for r, m in central.items() if val_key in m} or scored
    final_round = max(scored) if scored else None
    best_round = max(chosen, key=lambda r: (chosen[r], -r)) if chosen else None
    final = central.get(final_round, {}) if final_round is not None else {}
    mean_bytes = _mean([c.bytes_down + c.bytes_up for c in clients])
    return {
        "final-accuracy": scored.get(final_round),
        "best-accuracy": scored.get(best_round),
        "best-round": best_round,
        "best-round-chosen-on": "validation" if chosen is not scored else "test",
        "val-best-accuracy": chosen.get(best_round) if chosen is not scored else None,
        "primary-metric": primary,
        "final-metrics": {k: v for k, v in final.items() if k != NUM_EXAMPLES},
        "rounds": len(history),
        "rounds-kept-previous-model": sum(e.kept_previous for e in history.values()),
        "client-rounds": len(clients),
        "replies-rejected": sum(c.status != "accepted" for c in clients),
        "clients-excluded": len({n for e in history.values() for n in e.excluded}),
        "client-rounds-excluded": sum(len(e.excluded) for e in history.values()),
        "mean-client-params-fraction": _mean([c.params_fraction for c in clients]),
        "client-rounds-over-memory-budget": sum(r.over_budget for r in memory_rows(history)),
        "mean-bytes-per-client-round": mean_bytes,
        "full-model-bytes": full_model_bytes,
        "full-model-bytes-per-client-round": 2 * full_model_bytes,
        "communication-ratio": (
            mean_bytes / (2 * full_model_bytes) if mean_bytes is not None else None
        ),
        "wall-time-s": wall_time_s,
    }


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def write_outputs(
    out: Path,
    cfg: RunConfig,
    history: Mapping[int, RoundLog],
    central: Mapping[int, Mapping[str, Any]],
    primary: str,
    full_model_bytes: int,
    wall_time_s: float,
) -> dict[str, Any]:
    """Write the JSON files and plots; return the summary."""
    summary = summarize(history, central, primary, full_model_bytes, wall_time_s)
    write_json(out / RUN_CONFIG, cfg.to_mapping())
    write_json(out / ROUNDS, round_rows(history, central))
    write_json(out / SUMMARY, summary)
    plot_metric(central, primary, out / "accuracy.png")
    plot_bytes(history, full_model_bytes, out / "bytes-per-client.png")
    plot_submodel_sizes(history, out / "submodel-sizes.png")
    memory = memory_rows(history)
    if memory:
        plot_memory_budget(memory, out / MEMORY_PLOT)
    return summary


def plot_metric(central: Mapping[int, Mapping[str, Any]], primary: str, path: Path) -> None:
    """The global model's held-out score per round (round 0: before training)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    rounds = sorted(central)
    for key in dict.fromkeys([primary, "f1"]):
        points = [(r, central[r][key]) for r in rounds if key in central[r]]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=key)
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("held-out score")
    ax.set_title("Global model, central evaluation")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_bytes(history: Mapping[int, RoundLog], full_model_bytes: int, path: Path) -> None:
    """Bytes each client moved (down + up) per round, against full-model FL."""
    fig, ax = plt.subplots(figsize=(6, 4))
    mb = 2**20
    for server_round, entry in sorted(history.items()):
        values = [(c.bytes_down + c.bytes_up) / mb for c in entry.clients]
        ax.scatter(
            [server_round] * len(values),
            values,
            color="tab:blue",
            alpha=0.7,
            label="RaFFM client" if server_round == min(history) else None,
        )
    ax.axhline(
        2 * full_model_bytes / mb,
        color="tab:red",
        linestyle="--",
        label="full-model FL (down + up)",
    )
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("MB per client (down + up)")
    ax.set_ylim(bottom=0)
    ax.set_title("Communication per client and round")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_submodel_sizes(history: Mapping[int, RoundLog], path: Path) -> None:
    """Distribution of the sub-model sizes sent, as fractions of the full model."""
    fractions = [c.params_fraction for e in history.values() for c in e.clients]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(fractions, bins=20, range=(0, 1.0), color="tab:green", edgecolor="black")
    ax.set_xlabel("sub-model parameters / full model")
    ax.set_ylabel("client-rounds")
    ax.set_title("Sub-model sizes sent")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
