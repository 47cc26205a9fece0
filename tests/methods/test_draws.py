"""The counter-based draws: Random123's known answers, each sample's draws alone equal the
vectorized range, on any split, with prefixes independent of the count."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.methods.draws import philox4x32, to_device, uniforms
from tests.methods.helpers import philox_uniform

#: Random123 tests/kat_vectors, the three "philox4x32 10" lines: counter, key, result
KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("counter, key, expected", KNOWN_ANSWERS)
def test_philox_known_answers(counter: tuple[int, ...], key: tuple[int, int], expected: tuple[int, ...]) -> None:
    counters = np.array([counter, (1, 2, 3, 4), counter], dtype=np.uint64)
    blocks = philox4x32(counters, key)
    assert blocks[0].tolist() == list(expected) and blocks[2].tolist() == list(expected)


@pytest.mark.parametrize("seed", [0, 7, 2**40 + 3, 2**64 - 1])
def test_draws_follow_the_definition(seed: int) -> None:
    draws = uniforms(seed, 5, 9, 5)
    expected = [[philox_uniform(seed, sample, draw) for draw in range(5)] for sample in range(5, 9)]
    assert draws.tolist() == expected


def test_a_range_equals_its_samples_drawn_alone_and_any_split() -> None:
    together = uniforms(3, 0, 50, 66)
    assert together.shape == (50, 66) and together.dtype == np.float64
    for index in (0, 1, 17, 49):
        assert np.array_equal(uniforms(3, index, index + 1, 66)[0], together[index])
    assert np.array_equal(np.concatenate([uniforms(3, 0, 13, 66), uniforms(3, 13, 50, 66)]), together)
    assert np.array_equal(uniforms(3, 0, 50, 9), together[:, :9])  # fewer draws: a prefix
    assert not np.array_equal(uniforms(4, 0, 50, 66), together)
    assert 0.0 < together.min() and together.max() < 1.0
    assert abs(together.mean() - 0.5) < 5 * np.sqrt(1 / 12 / together.size)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="seed"):
        uniforms(2**64, 0, 1, 1)
    with pytest.raises(ValueError, match="sample range"):
        uniforms(0, 3, 2, 1)
    assert uniforms(0, 4, 4, 3).shape == (0, 3)


def test_to_device_copies_once() -> None:
    array = np.arange(6, dtype=np.int64).reshape(2, 3)
    tensor = to_device(array, "cpu")
    assert torch.equal(tensor, torch.arange(6).view(2, 3))
