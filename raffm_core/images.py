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
labels as in :mod:`raffm_core.data`. Images stay as they come (uint8 arrays or
PIL images) until a batch is made: :class:`PixelProcessor` then converts the
channels, resizes to the model's ``image_size`` (bilinear, antialiased) and
normalizes, with plain numpy and torch (no torchvision, no image processor).
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .data import LABEL, LOCAL_FORMATS, DataError, Splits, build_splits, take_columns
from .wire import RunConfig

IMAGE = "image"
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

PROCESSOR_FILE = "preprocessor_config.json"
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
"""RGB to grey weights (ITU-R 601, as PIL's ``convert("L")``)."""


@dataclass(frozen=True)
class ImageDatasetSpec:
    """Where the images are and which columns mean what.

    Attributes
    ----------
    source : str
        See the module docstring.
    config_name : str
        Hub config name; empty for none.
    image_column, label_column : str
    task : {"auto", "classification", "regression"}
    train_split, test_split : str
        An empty ``test_split`` carves ``test_fraction`` out of the train
        split, seeded. For a single-file source, ``test_split`` may be the
        path of a second file.
    test_fraction : float
    seed : int
    """

    source: str
    config_name: str = ""
    image_column: str = IMAGE
    label_column: str = LABEL
    task: str = "auto"
    train_split: str = "train"
    test_split: str = ""
    test_fraction: float = 0.2
    seed: int = 0

    @classmethod
    def from_run_config(cls, cfg: RunConfig) -> ImageDatasetSpec:
        return cls(
            source=cfg.dataset,
            config_name=cfg.dataset_config,
            image_column=cfg.image_column,
            label_column=cfg.label_column,
            task=cfg.task,
            train_split=cfg.train_split,
            test_split=cfg.test_split,
            test_fraction=cfg.test_fraction,
            seed=cfg.seed,
        )


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


def _load_file(path: Path, spec: ImageDatasetSpec) -> datasets.Dataset:
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


def _load_split(spec: ImageDatasetSpec, split: str) -> datasets.Dataset:
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


def _normalize(ds: datasets.Dataset, spec: ImageDatasetSpec, name: str) -> datasets.Dataset:
    return take_columns(ds, {spec.image_column: IMAGE, spec.label_column: LABEL}, name)


def load_image_splits(spec: ImageDatasetSpec) -> Splits:
    """Load, normalize and split an image dataset; the same ``spec`` gives the same splits.

    Raises
    ------
    DataError
        If the source, a split or a column is missing, or the labels do not
        fit the task; the message names what was expected.
    """
    return build_splits(spec, _load_split, _normalize)


# ---------------------------------------------------------------------- pixels
def to_float_image(image: Any) -> np.ndarray:
    """One image as a float32 ``(H, W, C)`` array in ``[0, 1]``.

    Accepts PIL images and arrays ``(H, W)`` or ``(H, W, C)``: integers
    (``0..255``) are divided by 255, floats are taken as already in ``[0, 1]``.
    """
    if hasattr(image, "mode") and hasattr(image, "convert"):  # PIL, without importing it
        if image.mode not in ("L", "RGB", "RGBA"):
            image = image.convert("RGB")
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3:
        raise DataError(f"an image must be (H, W) or (H, W, C), got shape {array.shape}")
    if np.issubdtype(array.dtype, np.integer):
        if array.dtype != np.uint8 and array.size and (array.min() < 0 or array.max() > 255):
            raise DataError(f"integer pixels must be in 0..255, got {array.min()}..{array.max()}")
        return array.astype(np.float32) / 255.0
    if np.issubdtype(array.dtype, np.floating):
        return array.astype(np.float32)
    raise DataError(f"images must be integer (0..255) or float (0..1), got {array.dtype}")


@dataclass(frozen=True)
class PixelProcessor:
    """Images to a ViT's ``pixel_values``: channels, size, normalization.

    ``pixel_values = (resize(x) - mean) / std`` per channel, with ``x`` in
    ``[0, 1]``, as HF's ``ViTImageProcessor`` does (bilinear resize, rescale
    by 1/255, normalize). Grey images are repeated to 3 channels; colour ones
    are turned grey (ITU-R 601 weights) for a 1-channel model; alpha is dropped.

    Attributes
    ----------
    image_size : int
        Height and width the model expects (``config.image_size``).
    num_channels : int
        1 or 3 (``config.num_channels``).
    mean, std : tuple of float
        One value per channel (ViT's default 0.5 and 0.5 map ``[0, 1]`` to
        ``[-1, 1]``).
    """

    image_size: int
    num_channels: int
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)

    def __post_init__(self) -> None:
        if self.image_size < 1 or self.num_channels not in (1, 3):
            raise DataError(
                f"need image_size >= 1 and num_channels 1 or 3, got {self.image_size} "
                f"and {self.num_channels}"
            )
        for name in ("mean", "std"):
            values = tuple(float(v) for v in getattr(self, name))
            if len(values) == 1:
                values = values * self.num_channels
            if len(values) != self.num_channels:
                raise DataError(f"{name} has {len(values)} values for {self.num_channels} channels")
            object.__setattr__(self, name, values)
        if min(self.std) <= 0:
            raise DataError(f"std must be positive, got {self.std}")

    def _channels(self, array: np.ndarray) -> np.ndarray:
        c = array.shape[2]
        if c == 4:
            array, c = array[..., :3], 3
        if c == self.num_channels:
            return array
        if c == 1 and self.num_channels == 3:
            return np.repeat(array, 3, axis=2)
        if c == 3 and self.num_channels == 1:
            return (array @ LUMA)[..., None]
        raise DataError(f"cannot turn a {c}-channel image into {self.num_channels} channels")

    def __call__(self, images: Sequence[Any]) -> torch.Tensor:
        """``pixel_values`` of ``images``: float32 ``(B, num_channels, image_size, image_size)``."""
        size = (self.image_size, self.image_size)
        out = torch.empty(len(images), self.num_channels, *size)
        for i, image in enumerate(images):
            x = torch.from_numpy(np.ascontiguousarray(self._channels(to_float_image(image))))
            x = x.permute(2, 0, 1)
            if tuple(x.shape[1:]) != size:
                x = F.interpolate(
                    x[None], size=size, mode="bilinear", antialias=True, align_corners=False
                )[0]
            out[i] = x
        mean = torch.tensor(self.mean)[:, None, None]
        std = torch.tensor(self.std)[:, None, None]
        return (out - mean) / std

    # The two methods raffm_core.data.encode / make_loader dispatch to.
    def encode_split(self, ds: datasets.Dataset) -> datasets.Dataset:
        """A normalized split as ``image`` and ``labels`` (images convert per batch)."""
        return ds.rename_column(LABEL, "labels")

    def make_loader(
        self, ds: datasets.Dataset, batch_size: int, shuffle: bool = False, seed: int = 0
    ) -> DataLoader:
        """Batches ``{"pixel_values", "labels"}`` of an :meth:`encode_split`-ed split."""
        regression = ds.features["labels"].dtype.startswith("float")
        rows = ds.with_format("numpy") if isinstance(ds.features[IMAGE], datasets.Array3D) else ds

        def collate(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
            labels = np.array([row["labels"] for row in batch])
            return {
                "pixel_values": self([row[IMAGE] for row in batch]),
                "labels": torch.tensor(labels, dtype=torch.float32 if regression else torch.long),
            }

        generator = torch.Generator().manual_seed(seed) if shuffle else None
        return DataLoader(
            rows, batch_size=batch_size, shuffle=shuffle, generator=generator, collate_fn=collate
        )

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write ``preprocessor_config.json`` in the format of HF's ``ViTImageProcessor``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = {
            "image_processor_type": "ViTImageProcessor",
            "do_resize": True,
            "size": {"height": self.image_size, "width": self.image_size},
            "resample": 2,  # PIL bilinear
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": list(self.mean),
            "image_std": list(self.std),
            "num_channels": self.num_channels,
        }
        (path / PROCESSOR_FILE).write_text(json.dumps(config, indent=2) + "\n")


def processor_for(config: Any, saved: dict[str, Any] | None = None) -> PixelProcessor:
    """The :class:`PixelProcessor` of a ViT ``config``, with ``image_mean``/``image_std``
    from a saved ``preprocessor_config.json`` (``saved``) when there is one."""
    saved = saved or {}
    return PixelProcessor(
        image_size=int(config.image_size),
        num_channels=int(config.num_channels),
        mean=tuple(saved.get("image_mean", (0.5,))),
        std=tuple(saved.get("image_std", (0.5,))),
    )
