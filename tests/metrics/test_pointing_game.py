"""Pointing game on synthetic maps with known hits, misses and boundary distances."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.metrics.pointing_game import pointing_game, pointing_game_accuracy


def peak_and_point(peak: tuple[int, int], point: tuple[int, int], size: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    """A map whose maximum is at ``peak`` and a gt whose region is the single pixel ``point``."""
    maps = torch.zeros(1, size, size)
    maps[0, peak[0], peak[1]] = 1.0
    gt = torch.zeros(1, size, size)
    gt[0, point[0], point[1]] = 1.0
    return maps, gt


@pytest.mark.parametrize(
    ("point", "tolerance", "hit"),
    [
        ((10, 25), 15, 1.0),  # distance 15 == tolerance
        ((10, 26), 15, 0.0),  # distance 16
        ((19, 22), 15, 1.0),  # 9^2 + 12^2 = 15^2
        ((11, 25), 15, 0.0),  # sqrt(226) = 15.03
        ((11, 25), math.sqrt(226), 1.0),
        ((11, 25), math.nextafter(math.sqrt(226), 0), 0.0),
        ((10, 10), 0, 1.0),
        ((10, 11), 0, 0.0),
    ],
)
def test_tolerance_boundary(point: tuple[int, int], tolerance: float, hit: float) -> None:
    maps, gt = peak_and_point((10, 10), point)
    assert pointing_game(maps, gt, tolerance=tolerance).item() == hit


def test_first_maximum_in_row_major_order() -> None:
    maps = torch.zeros(1, 40, 40)
    maps[0, 5, 30] = maps[0, 30, 5] = 1.0  # (5, 30) comes first
    near_second = torch.zeros(1, 40, 40)
    near_second[0, 30, 5] = 1.0
    assert pointing_game(maps, near_second, tolerance=3).item() == 0.0
    assert pointing_game(maps, near_second.transpose(1, 2).contiguous(), tolerance=3).item() == 1.0


def test_relative_and_absolute_threshold() -> None:
    maps, _ = peak_and_point((0, 0), (0, 0), size=30)
    gt = torch.zeros(1, 30, 30)
    gt[0, 0, 20] = 0.4  # 20 px from the peak
    gt[0, 29, 29] = 1.0  # far away
    # relative: region = gt > 0.5 * 1.0, only (29, 29) -> miss; absolute 0.3: (0, 20) is in -> hit
    assert pointing_game(maps, gt, tolerance=20).item() == 0.0
    assert pointing_game(maps, gt, tolerance=20, threshold=0.3, relative=False).item() == 1.0
    assert pointing_game(maps, gt, tolerance=20, threshold=0.3).item() == 1.0  # 0.4 > 0.3 * 1.0


def test_empty_region_is_nan_and_left_out_of_accuracy() -> None:
    maps = torch.rand(3, 20, 20)
    gt = torch.zeros(3, 20, 20)
    gt[0] = 1.0
    gt[0, 0, 0] = 0.9  # (nearly) everything: hit
    gt[2, 0, 0] = 1.0
    maps[2] = 0.0
    maps[2, 19, 19] = 1.0  # far from (0, 0): miss
    hits = pointing_game(maps, gt, tolerance=5)
    assert hits[0].item() == 1.0 and math.isnan(hits[1].item()) and hits[2].item() == 0.0
    assert pointing_game_accuracy(hits) == 0.5
    assert math.isnan(pointing_game(maps[1:2], gt[1:2], relative=False).item())


def test_random_maps_match_a_plain_loop() -> None:
    generator = torch.Generator().manual_seed(0)
    maps = torch.randint(0, 5, (16, 12, 18), generator=generator).float()  # tied maxima
    gt = torch.rand(16, 12, 18, generator=generator) ** 8
    hits = pointing_game(maps, gt, tolerance=3.5, threshold=0.6)
    for b in range(16):
        peak = np.unravel_index(np.argmax(maps[b].numpy()), (12, 18))  # numpy: first maximum
        g = gt[b].numpy()
        region = [(i, j) for i in range(12) for j in range(18) if g[i, j] > 0.6 * g.max()]
        expected = any(math.hypot(i - peak[0], j - peak[1]) <= 3.5 for i, j in region)
        assert hits[b].item() == float(expected)


def test_bad_input_is_rejected() -> None:
    with pytest.raises(ValueError, match="gt"):
        pointing_game(torch.rand(2, 8, 8), torch.rand(2, 8, 9))
    with pytest.raises(ValueError, match="maps"):
        pointing_game(torch.rand(8, 8), torch.rand(8, 8))
    with pytest.raises(ValueError, match="tolerance"):
        pointing_game(torch.rand(1, 8, 8), torch.rand(1, 8, 8), tolerance=-1)


def test_an_unusable_map_or_ground_truth_is_nan() -> None:
    maps, gt = peak_and_point((10, 10), (10, 12))
    maps, gt = maps.repeat(5, 1, 1), gt.repeat(5, 1, 1)
    maps[1] = 0.5  # constant map
    maps[2, 3, 3] = math.nan
    maps[3, 3, 3] = math.inf
    gt[4] = 2.0  # constant ground truth: with an absolute threshold its region is every pixel
    hits = pointing_game(maps, gt, threshold=0.5, relative=False)
    assert hits[0].item() == 1.0 and torch.isnan(hits[1:]).all()
