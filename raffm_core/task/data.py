"""Datasets for the app: where they are, loading, labels and splits.

Any Hugging Face dataset works: a hub name (with an optional config, e.g.
``glue`` / ``sst2``) or a local ``csv``/``tsv``/``json``/``jsonl``/``parquet``
file. The text task shapes of GLUE are covered:

* single sentences (``text-column``);
* sentence pairs (``text-pair-column`` too);
* regression (a float label, STS-B style), scored by Pearson correlation.

Image sources are read by :mod:`raffm_core.task.images`; both modalities share
:class:`DatasetSpec`, the label handling and the split routine
(:func:`build_splits`) here.

Every loaded split is normalized to the columns ``text`` (``text_pair``) or
``image``, and ``label``; classification labels become ``0..K-1`` in the order
of :attr:`TaskInfo.label_names`. Nothing here imports Flower: the ServerApp
uses it for central evaluation and the ClientApp for local training.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from ..errors import DataError
from .checks import count_blank, looks_like_data
from .config import CAUSAL_LM, CLASSIFICATION, REGRESSION, SEQ2SEQ, RunConfig
from .files import LOCAL_FORMATS, read_local_file
from .keys import ACCURACY, PEARSON

TEXT, TEXT_PAIR, IMAGE, LABEL = "text", "text_pair", "image", "label"
"""The normalized column names."""

TEXT_MODALITY, IMAGE_MODALITY = "text", "image"

COLUMN_KEYS = {
    TEXT: "text-column",
    TEXT_PAIR: "text-pair-column",
    IMAGE: "image-column",
    LABEL: "label-column",
}
"""The run-config key that names each normalized column."""

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DatasetSpec:
    """Where the data is and which columns mean what.

    Attributes
    ----------
    source : str
        A hub name, or the path of a local file (see :data:`LOCAL_FORMATS`;
        image sources: :mod:`raffm_core.task.images`).
    config_name : str
        Hub config name (``"sst2"`` of ``glue``); empty for none.
    text_column, text_pair_column, image_column, label_column : str
        Column names; ``text_pair_column`` empty for single sentences. Text
        data uses the text columns, image data ``image_column``.
    task : {"auto", "classification", "regression", "causal-lm"}
        ``auto`` treats float labels as regression and anything else
        (integers, strings, class labels) as classification.
    train_split, test_split : str
        Split names. An empty ``test_split`` carves ``test_fraction`` out of
        the train split, seeded. For a local source, ``test_split`` may be the
        path of a second file.
    test_fraction : float
    validation_fraction : float
        Share of the train split (after the test split is set aside) carved
        out, seeded, as a validation split; 0 for none.
    encoding, encoding_errors : str
        Text encoding of a local csv/tsv/json file, and ``"strict"`` (an
        undecodable byte is an error) or ``"replace"`` (it becomes U+FFFD).
    seed : int
    modality : {"text", "image"}
        Which loader reads it (:func:`raffm_core.task.load_task` decides from the model).
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
    image_column: str = IMAGE
    modality: str = TEXT_MODALITY
    validation_fraction: float = 0.0
    encoding: str = "utf-8"
    encoding_errors: str = "strict"

    @classmethod
    def from_run_config(cls, cfg: RunConfig, modality: str = TEXT_MODALITY) -> DatasetSpec:
        """The data spec of a run; ``modality`` comes from the model (see ``load_task``)."""
        return cls(
            source=cfg.dataset,
            config_name=cfg.dataset_config,
            text_column=cfg.text_column,
            text_pair_column=cfg.text_pair_column,
            label_column=cfg.label_column,
            image_column=cfg.image_column,
            task=cfg.task,
            train_split=cfg.train_split,
            test_split=cfg.test_split,
            test_fraction=cfg.test_fraction,
            seed=cfg.seed,
            modality=modality,
            validation_fraction=cfg.validation_fraction,
            encoding=cfg.dataset_encoding,
            encoding_errors=cfg.dataset_encoding_errors,
        )


@dataclass(frozen=True)
class TaskInfo:
    """What the labels are.

    Attributes
    ----------
    kind : {"classification", "regression", "causal-lm", "extractive-qa"}
    label_names : tuple of str
        Class names in label-index order; empty for regression, question
        answering and instruction data.
    settings : object, optional
        The task's own settings: :class:`raffm_core.task.qa.QASettings` for
        ``extractive-qa``, :class:`raffm_core.task.instructions.InstructionSettings`
        for ``causal-lm`` on prompt/response data; ``None`` otherwise.
    """

    kind: str
    label_names: tuple[str, ...] = ()
    settings: Any = None

    @property
    def has_class_labels(self) -> bool:
        """Whether examples carry a class label (what a Dirichlet partitioner splits by)."""
        return bool(self.label_names) and self.kind in (CLASSIFICATION, CAUSAL_LM, SEQ2SEQ)

    @property
    def num_labels(self) -> int:
        return 1 if self.kind == REGRESSION else len(self.label_names)

    @property
    def problem_type(self) -> str:
        """The ``transformers`` config value for this task."""
        return REGRESSION if self.kind == REGRESSION else "single_label_classification"

    @property
    def primary_metric(self) -> str:
        """The summary's metric: Pearson's r, F1 (QA), exact match (instructions) or accuracy."""
        metric = getattr(self.settings, "primary_metric", None)  # QA: F1; instructions: EM
        if metric:
            return metric
        return PEARSON if self.kind == REGRESSION else ACCURACY


@dataclass(frozen=True)
class Splits:
    """A normalized train and test split, the task they define, and an optional validation split.

    ``validation`` is carved out of the train split (``train`` no longer holds
    it), so choosing settings or a round on it never looks at ``test``.
    """

    train: datasets.Dataset
    test: datasets.Dataset
    task: TaskInfo
    validation: datasets.Dataset | None = None


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
        return read_local_file(path, spec.encoding, spec.encoding_errors)
    try:
        return datasets.load_dataset(spec.source, spec.config_name or None, split=split)
    except (FileNotFoundError, ValueError) as err:
        raise DataError(f"cannot load split {split!r} of dataset {spec.source!r}: {err}") from err


def _normalize(ds: datasets.Dataset, spec: DatasetSpec, name: str) -> datasets.Dataset:
    """Keep the text, pair and label columns, under the names ``text``, ``text_pair``, ``label``.

    Empty texts (blank cells) are kept as ``""``, with a warning that counts them.
    """
    wanted = {spec.text_column: TEXT, spec.label_column: LABEL}
    if spec.text_pair_column:
        wanted[spec.text_pair_column] = TEXT_PAIR
    ds = take_columns(ds, wanted, name)
    for column, source in ((TEXT, spec.text_column), (TEXT_PAIR, spec.text_pair_column)):
        if column not in ds.column_names:
            continue
        blank = count_blank(ds[column])
        if blank:
            logger.warning(
                "%s of %s: %d of %d rows have an empty text in %s %r; they are kept as empty texts",
                name,
                spec.source,
                blank,
                len(ds),
                COLUMN_KEYS[column],
                source,
            )
            ds = ds.map(
                lambda batch, c=column: {c: ["" if v is None else v for v in batch[c]]},
                batched=True,
                keep_in_memory=True,
            )
    return ds


def take_columns(ds: datasets.Dataset, wanted: dict[str, str], name: str) -> datasets.Dataset:
    """Keep the columns ``wanted`` names, renamed to its values.

    Raises
    ------
    DataError
        If a column is missing; the message names it and the columns there are.
    """
    missing = [c for c in wanted if c not in ds.column_names]
    if missing:
        keys = ", ".join(COLUMN_KEYS.get(wanted[c], wanted[c]) for c in missing)
        shown = [c if len(c) <= 40 else c[:37] + "..." for c in ds.column_names[:8]]
        more = f" and {len(ds.column_names) - 8} more" if len(ds.column_names) > 8 else ""
        if looks_like_data(ds.column_names):
            raise DataError(
                f"{name}: the file seems to have no header row (the columns found are the "
                f"first row's values: {shown}{more}); add a header row, or set the run-config "
                f"key(s) {keys} to the column names; no column(s) {missing}"
            )
        raise DataError(
            f"{name}: no column(s) {missing}; the columns are {shown}{more} "
            f"(set the run-config key(s) {keys})"
        )
    ds = ds.select_columns(list(wanted))
    # Two steps, so that renaming "question" -> "text" cannot clash with a "text" column.
    ds = ds.rename_columns({c: f"__raffm_{i}" for i, c in enumerate(wanted)})
    return ds.rename_columns({f"__raffm_{i}": new for i, new in enumerate(wanted.values())})


def _check_labels(ds: datasets.Dataset, column: str, name: str) -> None:
    """Missing labels are an error: ``task = "auto"`` would see a float column (NaN)."""
    missing = count_blank(ds[LABEL])
    if missing:
        raise DataError(
            f"{name}: {missing} of {len(ds)} rows have no label in label-column {column!r}; "
            "fill them in or remove those rows"
        )


def _task_of(ds: datasets.Dataset, task: str) -> TaskInfo:
    if task == CAUSAL_LM:  # labels become response words (raffm_core.task.prompts)
        return TaskInfo(CAUSAL_LM, _task_of(ds, CLASSIFICATION).label_names)
    feature = ds.features[LABEL]
    is_float = isinstance(feature, datasets.Value) and feature.dtype.startswith("float")
    if task == REGRESSION or (task == "auto" and is_float):
        if isinstance(feature, datasets.ClassLabel) or not (
            isinstance(feature, datasets.Value) and feature.dtype[:3] in ("flo", "int")
        ):
            raise DataError(f"regression needs numeric labels, the label column is {feature}")
        return TaskInfo(REGRESSION)
    if isinstance(feature, datasets.ClassLabel):
        return TaskInfo(CLASSIFICATION, tuple(feature.names))
    values = sorted(set(ds[LABEL]), key=lambda v: (isinstance(v, str), v))
    return TaskInfo(CLASSIFICATION, tuple(str(v) for v in values))


def _encode_labels(ds: datasets.Dataset, task: TaskInfo, name: str) -> datasets.Dataset:
    if task.kind == REGRESSION:
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
    """Load, normalize and split a text dataset; the same ``spec`` gives the same splits.

    Raises
    ------
    DataError
        If the source, a split or a column is missing, or the labels do not
        fit the task; the message names what was expected.
    """
    return build_splits(spec, _load_split, _normalize)


def build_splits(
    spec: DatasetSpec,
    load_split: Callable[[DatasetSpec, str], datasets.Dataset],
    normalize: Callable[[datasets.Dataset, DatasetSpec, str], datasets.Dataset],
    task_of: Callable[[datasets.Dataset], TaskInfo] | None = None,
) -> Splits:
    """The train and held-out splits of ``spec`` for one modality's loader and normalizer.

    An empty ``test_split`` carves ``test_fraction`` out of the
    train split, seeded. ``task_of`` (the normalized train split to its task)
    replaces label inference for tasks without class labels (question
    answering, instruction data); their splits keep their columns as normalized.
    """
    train = normalize(load_split(spec, spec.train_split), spec, f"split {spec.train_split!r}")
    if task_of is not None:
        return _carve(spec, train, task_of(train), load_split, normalize)
    _check_labels(train, spec.label_column, f"split {spec.train_split!r} of {spec.source}")
    task = _task_of(train, spec.task)
    if task.kind != REGRESSION and task.num_labels < 2:
        raise DataError(f"classification needs at least 2 labels, found {task.label_names}")
    splits = _carve(spec, train, task, load_split, normalize)
    validation = splits.validation
    if validation is not None:
        validation = _encode_labels(validation, task, "validation split")
    train = _encode_labels(splits.train, task, f"split {spec.train_split!r}")
    test = _encode_labels(splits.test, task, f"split {spec.test_split or 'test'!r}")
    return Splits(train, test, task, validation)


def _carve(
    spec: DatasetSpec,
    train: datasets.Dataset,
    task: TaskInfo,
    load_split: Callable[[DatasetSpec, str], datasets.Dataset],
    normalize: Callable[[datasets.Dataset, DatasetSpec, str], datasets.Dataset],
) -> Splits:
    """``train`` with the test split (loaded, or carved out) and the validation split set aside."""
    if spec.test_split:
        test = normalize(load_split(spec, spec.test_split), spec, f"split {spec.test_split!r}")
        _check_labels(test, spec.label_column, f"split {spec.test_split!r} of {spec.source}")
    else:
        # keep_in_memory clashes with the index cache files of an on-disk (hub or folder) dataset
        parts = train.train_test_split(
            test_size=spec.test_fraction, seed=spec.seed, keep_in_memory=not train.cache_files
        )
        train, test = parts["train"], parts["test"]
    validation = None
    if spec.validation_fraction > 0:
        parts = train.train_test_split(
            test_size=spec.validation_fraction,
            seed=spec.seed + 1,  # independent of the test carve-out
            keep_in_memory=not train.cache_files,
        )
        train, validation = parts["train"], parts["test"]
    return Splits(train, test, task, validation)
