"""Local fine-tuning of a received sub-model, and measuring what it cost."""

from __future__ import annotations

import contextlib
import math
import resource
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import psutil
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from raffm_core import InstructionError, width_scaler
from raffm_core.importance import UnitScores, record_taylor
from raffm_core.nested import nested_dropout
from raffm_core.task.config import PRECISIONS
from raffm_core.task.encode import cycle, make_loader
from raffm_core.task.keys import (
    BATCH_SIZE,
    LOCAL_EPOCHS,
    LOCAL_STEPS,
    LR,
    MASKED_LOSS,
    MIXED_PRECISION,
    NESTED_DROPOUT,
    PROXIMAL_MU,
    RECORD_IMPORTANCE,
    SEED,
    SERVER_ROUND,
    WEIGHT_DECAY,
    WIDTH_SCALER,
)


def config_value(config: Mapping[str, Any], key: str, kind: type) -> Any:
    """``config[key]`` as ``kind`` (ints pass for floats), or a clear error."""
    if key not in config:
        raise InstructionError(f"instruction has no {key!r}; it has {sorted(config)}")
    value = config[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) != (kind is bool):
        raise InstructionError(f"instruction {key!r} must be a {kind.__name__}, got {value!r}")
    return value


@dataclass(frozen=True)
class TrainSettings:
    """How to fine-tune, as the server's instruction says.

    ``local_steps > 0`` runs exactly that many optimizer steps (cycling
    through the data), as ``max_steps`` does in HF's Trainer; ``0`` runs
    ``local_epochs`` passes (a fraction is a share of one pass, rounded up to
    whole batches), so a node with more data takes more steps.
    """

    lr: float
    local_steps: int
    local_epochs: float
    batch_size: int
    weight_decay: float
    proximal_mu: float
    seed: int
    bf16: bool = False
    masked_loss: bool = False
    width_scaler: bool = False
    nested_dropout: float = 0.0
    record_importance: bool = False

    @classmethod
    def from_config(cls, config: Mapping[str, Any], partition_id: int) -> TrainSettings:
        """Read an instruction's ConfigRecord; the shuffling seed mixes in round and partition."""
        precision = config.get(MIXED_PRECISION, "no")  # optional: fp32 unless asked
        if precision not in PRECISIONS:
            raise InstructionError(f"{MIXED_PRECISION} must be one of {PRECISIONS}")
        seeds = [
            config_value(config, SEED, int),
            config_value(config, SERVER_ROUND, int),
            partition_id,
        ]
        settings = cls(
            lr=config_value(config, LR, float),
            local_steps=config_value(config, LOCAL_STEPS, int),
            local_epochs=config_value(config, LOCAL_EPOCHS, float),
            batch_size=config_value(config, BATCH_SIZE, int),
            weight_decay=config_value(config, WEIGHT_DECAY, float),
            proximal_mu=config_value(config, PROXIMAL_MU, float),
            seed=int(np.random.SeedSequence(seeds).generate_state(1)[0]),
            bf16=precision == "bf16",
            masked_loss=config_value(config, MASKED_LOSS, bool) if MASKED_LOSS in config else False,
            width_scaler=(
                config_value(config, WIDTH_SCALER, bool) if WIDTH_SCALER in config else False
            ),
            nested_dropout=(
                config_value(config, NESTED_DROPOUT, float) if NESTED_DROPOUT in config else 0.0
            ),
            record_importance=(
                config_value(config, RECORD_IMPORTANCE, bool)
                if RECORD_IMPORTANCE in config
                else False
            ),
        )
        if not 0.0 <= settings.nested_dropout < 1.0:
            raise InstructionError(
                f"{NESTED_DROPOUT} must be in [0, 1), got {settings.nested_dropout!r}"
            )
        if settings.lr <= 0 or settings.batch_size < 1 or settings.proximal_mu < 0:
            raise InstructionError(f"bad training settings {settings}")
        if settings.local_steps < 0 or (settings.local_steps == 0 and settings.local_epochs <= 0):
            raise InstructionError("need local-steps >= 1, or local-steps = 0 and local-epochs > 0")
        return settings


@dataclass(frozen=True)
class TrainResult:
    """What local training did: mean loss, optimizer steps, examples seen, seconds.

    ``labels_held`` (masked loss only): the class ids of the training data.
    ``importance`` (``record_importance`` only): per layer, the per-example
    Taylor importance of the model's head groups and FFN neurons, measured
    on the training steps' own gradients.
    """

    loss: float
    steps: int
    examples_seen: int
    seconds: float
    labels_held: tuple[int, ...] | None = None
    importance: list[UnitScores] | None = None


def train_submodel(
    model: PreTrainedModel,
    dataset: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    settings: TrainSettings,
) -> TrainResult:
    """Fine-tune ``model`` in place with AdamW on an :func:`~raffm_core.task.encode.encode`-d split.

    ``bf16`` enables bfloat16 autocast for the forward pass. With
    ``proximal_mu > 0`` the loss gets FedProx's term
    ``mu / 2 * ||w - w_received||^2`` over all parameters. With
    ``masked_loss`` (classification only) the logits of labels that do not
    occur in ``dataset`` are masked out of the cross-entropy (HeteroFL's label
    split), so a client with one class does not just push the others down.
    With ``width_scaler`` a sub-model trains under
    :func:`raffm_core.width_scaler` (HeteroFL's scaler). With
    ``nested_dropout > 0`` that share of the steps trains a random salient
    prefix of the sub-model (:func:`raffm_core.nested.nested_dropout`).
    With ``record_importance`` the unit importance of every step is recorded
    (:func:`raffm_core.importance.record_taylor`).
    """
    if len(dataset) == 0:
        raise InstructionError("cannot train on an empty partition")
    absent = _absent_labels(model, dataset) if settings.masked_loss else None
    torch.manual_seed(settings.seed)  # dropout masks
    loader = make_loader(dataset, tokenizer, settings.batch_size, shuffle=True, seed=settings.seed)
    steps = settings.local_steps or max(1, math.ceil(settings.local_epochs * len(loader)))
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if settings.proximal_mu > 0 else None
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    model.train()
    batches = cycle(loader)
    total_loss, seen = 0.0, 0
    start = time.perf_counter()
    # HeteroFL's scaler, if asked: hooks on this sub-model, removed on exit.
    with (
        width_scaler(model) if settings.width_scaler else contextlib.nullcontext(),
        nested_dropout(model, settings.nested_dropout, settings.seed)
        if settings.nested_dropout
        else contextlib.nullcontext() as nested,
        record_taylor(model) if settings.record_importance else contextlib.nullcontext() as taylor,
    ):
        for _ in range(steps):
            if nested is not None:
                nested.draw()
            batch = next(batches)
            # bf16 autocast runs the matmuls in bfloat16 (about 1.5x faster on CPUs
            # with AVX512-BF16); weights, gradients and optimizer state stay fp32.
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=settings.bf16):
                if absent is None:
                    loss = model(**batch).loss
                else:
                    inputs = {k: v for k, v in batch.items() if k != "labels"}
                    logits = model(**inputs).logits.float().masked_fill(absent, float("-inf"))
                    loss = torch.nn.functional.cross_entropy(logits, batch["labels"])
            n = len(batch["input_ids" if "input_ids" in batch else "pixel_values"])
            total_loss += float(loss.detach()) * n
            seen += n
            if anchor is not None:
                drift = sum((p - a).pow(2).sum() for p, a in zip(params, anchor, strict=True))
                loss = loss + settings.proximal_mu / 2 * drift
            loss.backward()
            if taylor is not None:
                taylor.count(n)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    model.eval()
    return TrainResult(
        total_loss / seen,
        steps,
        seen,
        time.perf_counter() - start,
        labels_held=None
        if absent is None
        else tuple(int(i) for i in (~absent).nonzero().flatten()),
        importance=None if taylor is None else taylor.mean(),
    )


def _absent_labels(model: PreTrainedModel, dataset: datasets.Dataset) -> torch.Tensor:
    """Boolean ``(num_labels,)``: the classes no example of ``dataset`` has.

    Raises
    ------
    InstructionError
        If the task is not single-label classification (one integer label each).
    """
    feature = dataset.features.get("labels")
    if not isinstance(feature, datasets.Value) or not feature.dtype.startswith("int"):
        raise InstructionError(
            f"masked-loss needs one integer class label per example, the labels are {feature}"
        )
    absent = torch.ones(model.config.num_labels, dtype=torch.bool)
    absent[torch.as_tensor(sorted(set(dataset["labels"])))] = False
    return absent


_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def process_age_s() -> float:
    """Seconds since this process started.

    In deployment Flower starts one ClientApp process per message, so at the
    start of a handler this is what the node paid before the app's own code
    ran (Python, imports, the FAB); in simulation it is the Ray actor's age.
    """
    return time.time() - psutil.Process().create_time()


def resident_mb() -> float:
    """The resident memory (RSS) of this process now, in MB."""
    return psutil.Process().memory_info().rss / 2**20


@contextmanager
def peak_memory() -> Iterator[dict[str, float]]:
    """Measure the peak resident memory (MB) of this whole process inside the block.

    On Linux the kernel's high-water mark is reset on entry (``clear_refs``)
    and read on exit (``VmHWM``), so the figure belongs to this block even in
    a long-lived Ray actor; it is the process's RSS, libraries and data
    included, not just what the block allocated. Elsewhere it is the
    process's lifetime peak, an upper bound. The result is in
    ``box["peak-mb"]`` after the block.
    """
    box: dict[str, float] = {}
    exact = False
    try:
        _CLEAR_REFS.write_text("5")
        exact = True
    except OSError:
        pass
    try:
        yield box
    finally:
        peak = None
        if exact:
            for line in _STATUS.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = float(line.split()[1]) / 1024  # kB
        if peak is None:
            maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            peak = maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024
        box["peak-mb"] = peak
