"""Images to a ViT's ``pixel_values``, with plain numpy and torch.

:class:`PixelProcessor` converts the channels, resizes to the model's
``image_size`` (bilinear, antialiased) and normalizes, as HF's
``ViTImageProcessor`` does, without torchvision (unusable here) or an image
processor class.
"""

from __future__ import annotations

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

from ..errors import DataError
from .data import IMAGE, LABEL

PROCESSOR_FILE = "preprocessor_config.json"
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
"""RGB to grey weights (ITU-R 601, as PIL's ``convert("L")``)."""


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
