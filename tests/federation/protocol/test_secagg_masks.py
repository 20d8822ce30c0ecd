"""SecAgg+ masks from the whole seed (federation/protocol/secagg_masks.py), installed at both ends."""

from __future__ import annotations

import os

import numpy as np
import pytest
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen as flower_masks

from federation.protocol.secagg_masks import harden, strong_masks

SHAPES = [(), (3,), (4, 5)]


def _same_fold(seed: bytes) -> bytes:
    """Another 32-byte seed that Flower folds to the same 32-bit integer (two words XORed with one value)."""
    words = bytearray(seed)
    for i in range(4):
        words[i] ^= 0x5A
        words[4 + i] ^= 0x5A
    assert bytes(words) != seed
    return bytes(words)


def test_flowers_generator_keeps_only_32_bits_of_the_seed() -> None:
    """The weakness: two different keys, the same mask (a mask is one of 2**32 streams)."""
    seed = os.urandom(32)
    for a, b in zip(flower_masks(seed, 2**32, SHAPES), flower_masks(_same_fold(seed), 2**32, SHAPES), strict=True):
        np.testing.assert_array_equal(a, b)


def test_strong_masks_depend_on_every_seed_byte_and_are_deterministic() -> None:
    seed = os.urandom(32)
    first, again = strong_masks(seed, 2**32, SHAPES), strong_masks(seed, 2**32, SHAPES)
    other = strong_masks(_same_fold(seed), 2**32, SHAPES)
    for a, b, shape in zip(first, again, SHAPES, strict=True):
        assert a.shape == shape and a.dtype == np.int64
        np.testing.assert_array_equal(a, b)
    assert not all(np.array_equal(a, c) for a, c in zip(first, other, strict=True))


def test_strong_masks_are_uniform_in_range() -> None:
    (values,) = strong_masks(b"k" * 32, 2**32, [(200_000,)])
    assert values.min() >= 0 and values.max() < 2**32
    # every 2-bit top bucket about a quarter: uniform over [0, 2**32)
    counts = np.bincount(values >> 30, minlength=4) / values.size
    assert np.all(np.abs(counts - 0.25) < 0.01)
    (small,) = strong_masks(b"k" * 32, 10, [(10_000,)])
    assert set(np.unique(small)) == set(range(10))


def test_bad_range_is_refused() -> None:
    with pytest.raises(ValueError):
        strong_masks(b"k" * 32, 2**33, [(1,)])


def test_harden_refuses_a_module_without_the_generator() -> None:
    import types

    with pytest.raises(ImportError, match="pseudo_rand_gen"):
        harden(types.ModuleType("elsewhere"))
