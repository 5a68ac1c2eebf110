"""Zero-copy reply decoding and the cheap finiteness check, against numpy."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from raffm_core.aggregate import all_finite
from server_app.replies import decode_array, decode_arrays


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64, np.int64, np.bool_])
@pytest.mark.parametrize("shape", [(3, 5), (7,), (), (0, 4)])
def test_decode_array_equals_np_load(dtype, shape):
    values = np.random.default_rng(0).normal(size=shape).astype(dtype)
    array = Array(values)
    decoded = decode_array(array)
    expected = array.numpy()
    assert decoded.shape == expected.shape
    assert decoded.dtype == torch.from_numpy(expected).dtype
    np.testing.assert_array_equal(decoded.numpy(), expected)


def test_decode_array_shares_the_payload_and_handles_fortran_order():
    values = np.arange(12, dtype=np.float32).reshape(3, 4)
    array = Array(values)
    decoded = decode_array(array)
    payload = np.frombuffer(array.data, dtype=np.uint8)
    assert np.shares_memory(decoded.numpy(), payload)  # a view of the message, not a copy
    fortran = Array(np.asfortranarray(values))
    np.testing.assert_array_equal(decode_array(fortran).numpy(), values)


def test_decode_array_rejects_truncated_payload():
    array = Array(np.ones((4, 4), dtype=np.float32))
    array.data = array.data[:-8]
    with pytest.raises(ValueError):
        decode_array(array)


def test_decode_arrays_keeps_keys_in_order():
    record = ArrayRecord({"b": Array(np.ones(2)), "a": Array(np.zeros(3))})
    assert list(decode_arrays(record)) == ["b", "a"]


def test_all_finite_matches_isfinite_including_overflowing_sums():
    big = torch.full((10,), 3e38)  # finite, but its sum overflows to inf
    assert all_finite(big)
    for bad in (float("nan"), float("inf"), float("-inf")):
        t = torch.randn(100)
        t[17] = bad
        assert not all_finite(t)
    mixed = torch.tensor([float("inf"), float("-inf")])  # sum is NaN
    assert not all_finite(mixed)
    assert all_finite(torch.randn(4, 4).to(torch.bfloat16))
