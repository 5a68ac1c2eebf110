"""Image-classification data for the app: loading, ``pixel_values``, batching.

Sources (``dataset`` in the run config):

======================================  =============================================
``sklearn:digits``                      scikit-learn's 1797 digits (8x8, 10 classes),
                                        bundled in its wheel; one split
``debian:fashion-mnist``                Fashion-MNIST from Debian's
                                        ``dataset-fashion-mnist`` package (idx files in
                                        :data:`FASHION_MNIST_DIR`); splits ``train`` and
                                        ``test`` (alias ``t10k``)
a folder of ``*-idx3-ubyte[.gz]``       any MNIST-style idx folder, same splits
a folder of class sub-folders           ``datasets``' ``imagefolder`` builder
a ``.npz`` file                         arrays named by ``image-column`` and
                                        ``label-column``, images ``(N, H, W[, C])``
a ``.parquet``/``.json(l)``/``.csv``    an image column of encoded bytes, file paths or
file                                    ``{"bytes", "path"}`` records
anything else                           a Hugging Face hub dataset name (or a local
                                        dataset folder ``load_dataset`` reads)
======================================  =============================================

Every loaded split is normalized to the columns ``image`` and ``label``, with
labels as in :mod:`raffm_core.task.data`. Images stay as they come (uint8
arrays or PIL images) until a batch is made by
:class:`~raffm_core.task.pixels.PixelProcessor`.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Sequence
from pathlib import Path

import datasets
import numpy as np

from ..errors import DataError
from .data import IMAGE, LABEL, LOCAL_FORMATS, DatasetSpec, Splits, build_splits, take_columns

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where ``apt-get install dataset-fashion-mnist`` puts the idx files."""

FASHION_MNIST_LABELS = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
IDX_SPLITS = {"train": "train", "test": "t10k", "t10k": "t10k"}
"""Split name to the prefix of its idx files."""


# --------------------------------------------------------------------- sources
def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An idx file (MNIST format, optionally gzipped) as a numpy array.

    The header is two zero bytes, a type code (``0x08`` for uint8) and the
    number of dimensions, then one big-endian int32 per dimension.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path} is not an idx file of uint8 (header {data[:4].hex()})")
    ndim = data[3]
    shape = tuple(int(n) for n in np.frombuffer(data, ">i4", count=ndim, offset=4))
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise DataError(f"{path}: header says {shape}, found {body.size} values")
    return body.reshape(shape)


def _idx_file(folder: Path, prefix: str, kind: str) -> Path:
    for name in (f"{prefix}-{kind}-ubyte.gz", f"{prefix}-{kind}-ubyte"):
        if (folder / name).is_file():
            return folder / name
    raise DataError(f"{folder}: no {prefix}-{kind}-ubyte[.gz]")


def _is_idx_folder(folder: Path) -> bool:
    return folder.is_dir() and any(folder.glob("*-idx3-ubyte*"))


def _from_arrays(
    images: np.ndarray,
    labels: np.ndarray,
    names: Sequence[str] | None = None,
    columns: tuple[str, str] = (IMAGE, LABEL),
) -> datasets.Dataset:
    """A dataset of uint8 ``(H, W, C)`` images and labels (class names if given),
    in the columns ``columns`` (image, label)."""
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or len(images) != len(labels):
        raise DataError(
            f"expected images (N, H, W[, C]) and N labels, got {images.shape} and {labels.shape}"
        )
    label = datasets.ClassLabel(names=list(names)) if names else datasets.Value("int64")
    image_col, label_col = columns
    features = datasets.Features(
        {image_col: datasets.Array3D(images.shape[1:], "uint8"), label_col: label}
    )
    return datasets.Dataset.from_dict(
        {image_col: images.astype(np.uint8), label_col: labels.astype(np.int64)}, features=features
    )


def _load_digits() -> datasets.Dataset:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # 4-bit grey levels 0..16 to the full uint8 range
    images = np.rint(digits.images * (255 / 16)).astype(np.uint8)
    return _from_arrays(images, digits.target, [str(i) for i in range(10)])


def _load_idx(folder: Path, split: str) -> datasets.Dataset:
    if split not in IDX_SPLITS:
        raise DataError(f"{folder}: split {split!r} is not one of {sorted(IDX_SPLITS)}")
    prefix = IDX_SPLITS[split]
    images = read_idx(_idx_file(folder, prefix, "images-idx3"))
    labels = read_idx(_idx_file(folder, prefix, "labels-idx1"))
    names = FASHION_MNIST_LABELS if folder == FASHION_MNIST_DIR else None
    return _from_arrays(images, labels, names)


def _load_file(path: Path, spec: DatasetSpec) -> datasets.Dataset:
    if not path.is_file():
        raise DataError(f"dataset file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as arrays:
            missing = [c for c in (spec.image_column, spec.label_column) if c not in arrays]
            if missing:
                raise DataError(f"{path}: no array(s) {missing}; it has {sorted(arrays.files)}")
            columns = (spec.image_column, spec.label_column)
            return _from_arrays(*(arrays[c] for c in columns), columns=columns)
    kwargs = {"delimiter": "\t"} if suffix == ".tsv" else {}
    ds = datasets.load_dataset(
        LOCAL_FORMATS[suffix], data_files=str(path), split="train", keep_in_memory=True, **kwargs
    )
    column = spec.image_column
    if column in ds.column_names and not isinstance(
        ds.features[column], datasets.Image | datasets.Array3D
    ):
        ds = ds.cast_column(column, datasets.Image())  # bytes, paths or {"bytes", "path"}
    return ds


def _load_split(spec: DatasetSpec, split: str) -> datasets.Dataset:
    source = spec.source
    if source == "sklearn:digits":
        if split != spec.train_split:
            raise DataError("sklearn:digits has a single split; leave test-split empty")
        return _load_digits()
    if source == "debian:fashion-mnist":
        if not _is_idx_folder(FASHION_MNIST_DIR):
            raise DataError(
                f"Fashion-MNIST is not in {FASHION_MNIST_DIR}; install it with "
                "`apt-get install dataset-fashion-mnist`"
            )
        return _load_idx(FASHION_MNIST_DIR, split)
    if ":" in source.split("/")[0] and not Path(source).exists():
        raise DataError(
            f"unknown image dataset {source!r}; built-in ones are 'sklearn:digits' and "
            "'debian:fashion-mnist'"
        )
    path = Path(source)
    if _is_idx_folder(path):
        return _load_idx(path, split)
    if path.suffix.lower() in {*LOCAL_FORMATS, ".npz"}:
        second = Path(split)
        if split != spec.train_split and second.suffix.lower() not in {*LOCAL_FORMATS, ".npz"}:
            raise DataError(
                f"a local dataset file has a single split; test-split must be empty or the "
                f"path of a second file, got {split!r}"
            )
        return _load_file(path if split == spec.train_split else second, spec)
    try:
        # A hub name, or a local folder (class sub-folders of images load as imagefolder).
        return datasets.load_dataset(source, spec.config_name or None, split=split)
    except (FileNotFoundError, ValueError) as err:
        raise DataError(f"cannot load split {split!r} of dataset {source!r}: {err}") from err


def _normalize(ds: datasets.Dataset, spec: DatasetSpec, name: str) -> datasets.Dataset:
    return take_columns(ds, {spec.image_column: IMAGE, spec.label_column: LABEL}, name)


def load_image_splits(spec: DatasetSpec) -> Splits:
    """:func:`raffm_core.task.data.load_splits` for images (same errors, same seeding)."""
    return build_splits(spec, _load_split, _normalize)
