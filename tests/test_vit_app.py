"""ViT image classification: image sources, ``pixel_values``, and the app end to end.

The simulation runs a tiny ViT built from config (``vit-tiny:...``) on
scikit-learn's digits: three virtual nodes with three budgets, two rounds.
The pixel and loading tests check against independent oracles: hand-written
idx bytes, hand-computed normalization, PIL-encoded files read back.
"""

from __future__ import annotations

import gzip
import io
import json
import struct

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageClassification, ViTConfig

from raffm_core.errors import DataError
from raffm_core.task.data import DatasetSpec
from raffm_core.task.images import FASHION_MNIST_DIR, load_image_splits, read_idx
from raffm_core.task.models import (
    is_image_model,
    load_image_model,
    load_pixel_processor,
    tiny_vit_config,
)
from raffm_core.task.pixels import PixelProcessor
from tests.sim import TIMEOUTS, every_node, read_json, simulate
from tests.slices import assert_changed_only_inside_held_slices

TINY = (
    "vit-tiny:image_size=8,patch_size=2,hidden_size=32,num_hidden_layers=2,intermediate_size=64,"
    "initializer_range=0.1"  # escapes the random-init plateau in a few dozen steps
)
NUM_NODES = 3
ROUNDS = 2


# ------------------------------------------------------------------ sources
def idx_bytes(array: np.ndarray) -> bytes:
    """An idx file written by hand: 0, 0, type 0x08, ndim, big-endian dims, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    return header + array.astype(np.uint8).tobytes()


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_read_idx_matches_the_written_array(tmp_path, gz):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / ("x-idx3-ubyte.gz" if gz else "x-idx3-ubyte")
    path.write_bytes(gzip.compress(idx_bytes(array)) if gz else idx_bytes(array))
    np.testing.assert_array_equal(read_idx(path), array)


@pytest.mark.parametrize(
    "data",
    [b"\x00\x00\x0d\x01\x00\x00\x00\x01\x00", b"\x00\x00\x08\x01\x00\x00\x00\x05\x01\x02"],
    ids=["float-type", "short-body"],
)
def test_read_idx_rejects_bad_files(tmp_path, data):
    path = tmp_path / "bad-idx1-ubyte"
    path.write_bytes(data)
    with pytest.raises(DataError, match="bad-idx1-ubyte"):
        read_idx(path)


def test_an_idx_folder_loads_with_train_and_test_splits(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 12), ("t10k", 6)):
        (tmp_path / f"{prefix}-images-idx3-ubyte").write_bytes(
            idx_bytes(rng.integers(0, 256, (n, 5, 5)))
        )
        (tmp_path / f"{prefix}-labels-idx1-ubyte").write_bytes(idx_bytes(np.arange(n) % 3))
    splits = load_image_splits(DatasetSpec(str(tmp_path), test_split="test"))
    assert (len(splits.train), len(splits.test)) == (12, 6)
    assert splits.task.num_labels == 3
    image = np.asarray(splits.test.with_format("numpy")[0]["image"])
    np.testing.assert_array_equal(image[..., 0], read_idx(tmp_path / "t10k-images-idx3-ubyte")[0])


def test_digits_split_is_seeded_and_keeps_pixels():
    from sklearn.datasets import load_digits

    a = load_image_splits(DatasetSpec("sklearn:digits", seed=3))
    b = load_image_splits(DatasetSpec("sklearn:digits", seed=3))
    assert len(a.train) + len(a.test) == 1797 and a.task.num_labels == 10
    assert a.test["label"] == b.test["label"]
    grey = np.asarray(a.train.with_format("numpy")["image"]).astype(np.uint8)[..., 0]
    originals = {np.rint(img * 255 / 16).astype(np.uint8).tobytes() for img in load_digits().images}
    assert all(img.tobytes() in originals for img in grey[:50])


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_npz_parquet_and_imagefolder_sources_agree(tmp_path):
    """One set of images, three on-disk forms; the last goes through load_dataset(name)."""
    import pandas as pd

    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (8, 6, 6), dtype=np.uint8)
    labels = np.array([0, 1] * 4)
    np.savez(tmp_path / "d.npz", pixels=images, y=labels)
    pd.DataFrame(
        {"pixels": [{"bytes": png(x), "path": None} for x in images], "y": labels}
    ).to_parquet(tmp_path / "d.parquet")
    for i, (x, y) in enumerate(zip(images, labels, strict=True)):
        (tmp_path / "folder" / "train" / f"c{y}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(x).save(tmp_path / "folder" / "train" / f"c{y}" / f"{i}.png")
    process = PixelProcessor(image_size=6, num_channels=1)
    expected = process(list(images))
    for source, image_column, label_column in (
        ("d.npz", "pixels", "y"),
        ("d.parquet", "pixels", "y"),
        ("folder", "image", "label"),
    ):
        spec = DatasetSpec(
            str(tmp_path / source),
            image_column=image_column,
            label_column=label_column,
            test_fraction=0.25,
        )
        splits = load_image_splits(spec)
        assert len(splits.train) + len(splits.test) == 8, source
        ds = process.encode_split(splits.train)
        batch = next(iter(process.make_loader(ds, batch_size=len(ds))))
        # every loaded image is one of the originals, pixel for pixel, with its label
        for pixels, label in zip(batch["pixel_values"], batch["labels"], strict=True):
            match = [i for i in range(8) if torch.equal(pixels, expected[i])]
            assert match, source
            if source != "folder":  # imagefolder names classes c0, c1 in sorted order
                assert int(label) == labels[match[0]]


def test_missing_column_is_named(tmp_path):
    np.savez(tmp_path / "d.npz", pixels=np.zeros((4, 2, 2), np.uint8), y=np.arange(4) % 2)
    with pytest.raises(DataError, match="'image'"):
        load_image_splits(DatasetSpec(str(tmp_path / "d.npz"), label_column="y"))


@pytest.mark.skipif(
    not FASHION_MNIST_DIR.is_dir(), reason="apt package dataset-fashion-mnist not installed"
)
def test_debian_fashion_mnist_loads():
    splits = load_image_splits(DatasetSpec("debian:fashion-mnist", test_split="test"))
    assert (len(splits.train), len(splits.test)) == (60000, 10000)
    assert splits.task.label_names[0] == "T-shirt/top"


# ------------------------------------------------------------------- pixels
def test_pixel_values_are_rescaled_and_normalized_per_channel():
    image = np.array([[0, 51], [102, 255]], dtype=np.uint8)
    rgb = np.stack([image, image // 2, 255 - image], axis=-1)
    out = PixelProcessor(2, 3, mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 2.0))([rgb])
    oracle = (rgb.astype(np.float32) / 255 - np.array([0.1, 0.2, 0.3])) / np.array([0.5, 0.25, 2.0])
    np.testing.assert_allclose(out[0].numpy(), oracle.transpose(2, 0, 1), rtol=1e-6, atol=1e-6)


def test_channels_are_converted():
    grey = np.array([[10, 200], [30, 40]], dtype=np.uint8)
    to_rgb = PixelProcessor(2, 3, mean=(0,), std=(1,))([grey])[0]
    assert all(torch.allclose(to_rgb[c], torch.from_numpy(grey / 255).float()) for c in range(3))
    rgb = np.stack([grey, grey // 2, 255 - grey], axis=-1)
    to_grey = PixelProcessor(2, 1, mean=(0,), std=(1,))([Image.fromarray(rgb)])[0, 0]
    luma = (rgb / 255) @ np.array([0.299, 0.587, 0.114])
    np.testing.assert_allclose(to_grey.numpy(), luma, rtol=1e-5, atol=1e-6)


def test_resize_keeps_a_constant_image_constant_and_sizes_right():
    out = PixelProcessor(16, 1, mean=(0,), std=(1,))([np.full((5, 7), 128, np.uint8)])
    assert out.shape == (1, 1, 16, 16)
    torch.testing.assert_close(out, torch.full_like(out, 128 / 255))


@pytest.mark.parametrize(
    "kwargs",
    [{"num_channels": 2}, {"std": (0.0,)}, {"mean": (0.1, 0.2)}],
    ids=["two-channels", "zero-std", "mean-length"],
)
def test_bad_processor_settings_are_rejected(kwargs):
    with pytest.raises(DataError):
        PixelProcessor(**{"image_size": 4, "num_channels": 1, **kwargs})


# ------------------------------------------------------------------- models
def test_tiny_vit_names_parse_and_reject_unknown_keys():
    config = tiny_vit_config(TINY)
    assert (config.image_size, config.patch_size, config.hidden_size) == (8, 2, 32)
    assert is_image_model(TINY)
    with pytest.raises(DataError, match="hidden"):
        tiny_vit_config("vit-tiny:hidden=3")
    with pytest.raises(DataError, match=r"hidden_size='4x' is not an integer"):
        tiny_vit_config("vit-tiny:hidden_size=4x")
    with pytest.raises(DataError, match=r"qkv_bias='maybe' is not a bool"):
        tiny_vit_config("vit-tiny:qkv_bias=maybe")


def test_saved_vit_loads_by_path_with_its_processor(tmp_path):
    """A ViT folder (what a hub name resolves to) is an image model, mean/std included."""
    config = ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=3,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
    )
    AutoModelForImageClassification.from_config(config).save_pretrained(tmp_path)
    PixelProcessor(8, 3, mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.4)).save_pretrained(tmp_path)
    assert is_image_model(str(tmp_path))
    assert load_pixel_processor(str(tmp_path)).mean == (0.4, 0.5, 0.6)
    task = load_image_splits(DatasetSpec("sklearn:digits")).task
    model = load_image_model(str(tmp_path), task, seed=0)
    assert model.config.num_labels == 10 and model.config.id2label[3] == "3"


# --------------------------------------------------------------- simulation
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vit-simulation")
    overrides = {
        **every_node(NUM_NODES),
        **TIMEOUTS,
        "model-name": TINY,
        "dataset": "sklearn:digits",
        "results-dir": str(tmp / "results"),
        "num-server-rounds": ROUNDS,
        "budget-profile": "params=0.5,params=0.65,params=0.8",
        "partitioner": "iid",
        "local-steps": 30,
        "batch-size": 32,
        "lr": 3e-3,
        "save-round-models": True,
        "salience-norm": "l1",  # the slice oracle re-derives an L1 order (tests/slices.py)
    }
    simulate(overrides, NUM_NODES)
    return tmp / "results"


def state_of(path) -> dict[str, torch.Tensor]:
    return dict(AutoModelForImageClassification.from_pretrained(path).state_dict())


def test_vit_clients_trained_different_sub_models(run_dir):
    rounds = read_json(run_dir, "rounds.json")
    assert [r["round"] for r in rounds] == list(range(ROUNDS + 1))
    for row in rounds[1:]:
        clients = row["clients"]
        assert [c["status"] for c in clients] == ["accepted"] * NUM_NODES
        assert len({c["params"] for c in clients}) == NUM_NODES
        for c in clients:
            assert c["params-fraction"] <= float(c["budget"].split("=")[1]) + 1e-9
            assert c["bytes-up"] == c["bytes-down"] > 0
        assert {"accuracy", "loss"} <= set(row["federated-evaluation"])


def test_vit_global_model_changed_only_inside_the_covered_slices(run_dir):
    assert_changed_only_inside_held_slices(run_dir, AutoModelForImageClassification)


def test_vit_learned_and_final_model_is_a_plain_hf_folder(run_dir):
    summary = read_json(run_dir, "summary.json")
    rounds = read_json(run_dir, "rounds.json")
    # 10 classes: chance is 0.1; the untrained model (round 0) is near it
    assert summary["final-accuracy"] > max(0.25, rounds[0]["accuracy"] + 0.1)
    final = run_dir / "final-model"
    assert json.loads((final / "preprocessor_config.json").read_text())["size"]["height"] == 8
    model = AutoModelForImageClassification.from_pretrained(final).eval()
    process = load_pixel_processor(str(final))
    splits = load_image_splits(DatasetSpec("sklearn:digits"))
    batch = splits.test.with_format("numpy")[:64]
    with torch.no_grad():
        predicted = model(pixel_values=process(list(batch["image"]))).logits.argmax(-1)
    assert (predicted.numpy() == batch["label"]).mean() > 0.25
