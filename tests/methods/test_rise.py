"""RISE and Gaussian RISE: mask construction and statistics, a known salient region,
sharding, determinism, forward batching, agreement with a plain per-mask loop, and
the explainer contract."""
from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.methods import build_method
from pipeline.methods.rise import GaussianRise, Rise, gaussian_rise_masks, rise_masks
from tests.methods.helpers import bilinear_numpy, philox_uniform

RISE_METHODS = ["rise", "rise-gaussian"]


class TinyNet(nn.Module):
    """Two convolutions, global average pooling and a linear head over 5 classes."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2), nn.ReLU())
        self.fc = nn.Linear(6, 5)
        with torch.no_grad():
            self.fc.weight.mul_(4.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


class PatchModel(nn.Module):
    """Two classes; the logit of class 0 is ``gain * (mean of a fixed patch of channel 0 - 0.5)``."""

    def __init__(self, rows: slice, cols: slice, gain: float = 20.0) -> None:
        super().__init__()
        self.rows, self.cols, self.gain = rows, cols, gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = self.gain * (x[:, 0, self.rows, self.cols].mean(dim=(1, 2)) - 0.5)
        return torch.stack([score, torch.zeros_like(score)], dim=1)


class CountingModel(nn.Module):
    """Wraps a model and records the batch size of every forward."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.batch_sizes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batch_sizes.append(x.shape[0])
        return self.model(x)


def make_method(name: str, model: nn.Module, **params: object) -> Rise | GaussianRise:
    method = build_method(name, model, **params)
    assert isinstance(method, (Rise, GaussianRise))
    return method


def all_masks(name: str, seed: int, count: int, size: tuple[int, int], grid_size: int) -> torch.Tensor:
    if name == "rise":
        return rise_masks(seed, 0, count, size, grid_size, 0.5)
    return gaussian_rise_masks(seed, 0, count, size, grid_size, 0.5, 0.25)


def test_rise_mask_follows_the_recipe() -> None:
    """Grid cells (draw < p1) then (row, column) shifts floor(draw * cell) from the draws of (seed, i),
    upsampled to (s+1)*cell, shifted, cropped; non-square size exercises both cells."""
    seed, grid_size, p1, size = 7, 4, 0.4, (10, 7)
    cell_h, cell_w = math.ceil(size[0] / grid_size), math.ceil(size[1] / grid_size)
    masks = rise_masks(seed, 3, 6, size, grid_size, p1)
    for row, index in enumerate(range(3, 6)):
        draws = [philox_uniform(seed, index, j) for j in range(grid_size**2 + 2)]
        grid = (np.array(draws[: grid_size**2]) < p1).astype(float).reshape(grid_size, grid_size)
        dy, dx = math.floor(draws[-2] * cell_h), math.floor(draws[-1] * cell_w)
        big = bilinear_numpy(grid, ((grid_size + 1) * cell_h, (grid_size + 1) * cell_w))
        expected = big[dy : dy + size[0], dx : dx + size[1]]
        np.testing.assert_allclose(masks[row].numpy(), expected, atol=1e-6)


def test_gaussian_mask_cells_are_normal_quantiles_of_the_draws() -> None:
    """With one cell and a cell as large as the image, the mask is constant: clip(mean + std * ndtri(draw))."""
    seed, mean, std = 2, 0.5, 0.25
    masks = gaussian_rise_masks(seed, 10, 14, (5, 5), 1, mean, std)
    for row, index in enumerate(range(10, 14)):
        value = min(max(mean + std * statistics.NormalDist().inv_cdf(philox_uniform(seed, index, 0)), 0.0), 1.0)
        np.testing.assert_allclose(masks[row].numpy(), np.full((5, 5), value), atol=1e-6)


@pytest.mark.parametrize("name, expected_mean", [("rise", 0.5), ("rise-gaussian", 0.5)])
def test_mask_statistics(name: str, expected_mean: float) -> None:
    count, size = 1000, (32, 24)
    masks = all_masks(name, 0, count, size, 8)
    assert masks.shape == (count, *size) and masks.dtype == torch.float32
    assert float(masks.min()) >= 0.0 and float(masks.max()) <= 1.0
    # Every pixel is a convex combination of grid cells of mean 0.5 (p1, or a normal
    # centred on 0.5 clipped symmetrically to [0, 1]), so each mask's mean has
    # expectation 0.5; masks are independent, so the mean of their means lies within
    # 5 standard errors except with probability < 1e-6.
    per_mask = masks.double().mean(dim=(1, 2))
    tolerance = 5 * float(per_mask.std()) / math.sqrt(count)
    assert 0 < tolerance < 0.02
    assert abs(float(per_mask.mean()) - expected_mean) < tolerance
    assert float(masks.std()) > 0.1


def test_binary_masks_keep_probability() -> None:
    masks = rise_masks(1, 0, 500, (16, 16), 4, p1=0.2)
    per_mask = masks.double().mean(dim=(1, 2))
    tolerance = 5 * float(per_mask.std()) / math.sqrt(len(per_mask))
    assert abs(float(per_mask.mean()) - 0.2) < tolerance < 0.03
    torch.testing.assert_close(rise_masks(1, 0, 5, (16, 16), 4, p1=1.0), torch.ones(5, 16, 16))


@pytest.mark.parametrize("name", RISE_METHODS)
def test_mask_depends_only_on_seed_and_index(name: str) -> None:
    """Masks of a range equal the masks drawn one at a time and on any split of the range."""
    masks = rise_masks if name == "rise" else gaussian_rise_masks
    together = masks(4, 0, 30, (20, 20), 8)
    for index in range(30):
        assert torch.equal(masks(4, index, index + 1, (20, 20), 8)[0], together[index])
    assert torch.equal(torch.cat([masks(4, 0, 7, (20, 20), 8), masks(4, 7, 30, (20, 20), 8)]), together)
    assert not torch.equal(masks(5, 0, 30, (20, 20), 8), together)


@pytest.mark.parametrize("name", RISE_METHODS)
def test_highest_saliency_inside_the_region_the_model_reads(name: str) -> None:
    rows, cols = slice(8, 16), slice(20, 28)
    images = torch.ones(1, 3, 32, 32)
    saliency = make_method(name, PatchModel(rows, cols), n_masks=500, seed=1).explain(images, torch.tensor([0]))[0]
    peak_row, peak_col = divmod(int(saliency.argmax()), 32)
    assert rows.start <= peak_row < rows.stop and cols.start <= peak_col < cols.stop
    inside = torch.zeros(32, 32, dtype=torch.bool)
    inside[rows, cols] = True
    assert float(saliency[inside].mean()) > float(saliency[~inside].mean()) + 0.02


@pytest.mark.parametrize("name, batch_size", [("rise", 7), ("rise-gaussian", 7), ("rise", 2)])
def test_equals_plain_per_mask_loop(name: str, batch_size: int) -> None:
    """batch_size 7 with 3 images: 2 masks x 3 images per forward; 2: two image chunks, 1 mask each."""
    model = TinyNet()
    torch.manual_seed(1)
    images, targets = torch.randn(3, 3, 16, 16), torch.tensor([0, 4, 2])
    count, grid_size = 24, 5
    method = make_method(name, model, n_masks=count, grid_size=grid_size, seed=2, batch_size=batch_size)
    saliency = method.explain(images, targets)
    masks = all_masks(name, 2, count, (16, 16), grid_size).double().numpy()
    divisor = count * (0.5 if name == "rise" else masks.mean())
    for index in range(3):
        total = np.zeros((16, 16))
        for mask in masks:
            masked = images[index : index + 1] * torch.from_numpy(mask).float()
            with torch.no_grad():
                probability = torch.softmax(model(masked), dim=1)[0, int(targets[index])].item()
            total += probability * mask
        np.testing.assert_allclose(saliency[index].numpy(), total / divisor, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", RISE_METHODS)
def test_shards_merge_to_the_single_run(name: str) -> None:
    model = TinyNet()
    torch.manual_seed(2)
    images, targets = torch.randn(3, 3, 16, 16), torch.tensor([1, 1, 3])
    method = make_method(name, model, n_masks=60, seed=3, batch_size=7)
    single = method.accumulate(images, targets, 0, 60)
    bounds = [0, 2, 10, 44, 60]  # multiples of the 2 masks per forward of 3 images
    method.check_alignment(0, 60, len(images))
    merged = method.merge([method.accumulate(images, targets, a, b) for a, b in zip(bounds, bounds[1:])])
    for key, value in single.sums.items():
        assert torch.equal(merged.sums[key], value)
    assert torch.equal(method.finalize(merged), method.explain(images, targets))


@pytest.mark.parametrize("name", RISE_METHODS)
def test_seed_determines_the_result(name: str) -> None:
    model = TinyNet()
    images, targets = torch.randn(2, 3, 16, 16), torch.tensor([0, 1])
    first = make_method(name, model, n_masks=20, seed=9).explain(images, targets)
    again = make_method(name, model, n_masks=20, seed=9).explain(images, targets)
    other = make_method(name, model, n_masks=20, seed=10).explain(images, targets)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


@pytest.mark.parametrize(
    "n_images, batch_size, expected_sizes", [(3, 10, [9, 9, 9, 3]), (12, 5, [5, 5, 2] * 10), (2, 1, [1] * 20)]
)
def test_forward_batches(n_images: int, batch_size: int, expected_sizes: list[int]) -> None:
    model = CountingModel(TinyNet())
    images, targets = torch.randn(n_images, 3, 8, 8), torch.zeros(n_images, dtype=torch.long)
    make_method("rise", model, n_masks=10, batch_size=batch_size).explain(images, targets)
    assert model.batch_sizes == expected_sizes
    assert sum(model.batch_sizes) == n_images * 10


@pytest.mark.parametrize("name", RISE_METHODS)
@pytest.mark.parametrize("training", [True, False])
def test_explainer_contract(name: str, training: bool) -> None:
    model = TinyNet().train(training)
    images, targets = torch.randn(2, 3, 16, 16), torch.tensor([0, 3])
    saliency = make_method(name, model, n_masks=10).explain(images, targets)
    assert saliency.shape == (2, 16, 16) and saliency.dtype == torch.float32
    assert bool(torch.isfinite(saliency).all())
    assert all(module.training == training for module in model.modules())
    assert all(parameter.grad is None for parameter in model.parameters())


@pytest.mark.parametrize("name", RISE_METHODS)
def test_unknown_parameter_lists_valid_ones(name: str) -> None:
    with pytest.raises(TypeError, match="valid parameters: .*n_masks.*grid_size"):
        build_method(name, TinyNet(), n_mask=10)


@pytest.mark.parametrize(
    "name, params, match",
    [
        ("rise", {"p1": 0.0}, "p1"),
        ("rise", {"grid_size": 0}, "grid_size"),
        ("rise", {"n_masks": 0}, "n_masks"),
        ("rise-gaussian", {"std": -0.1}, "std"),
        ("rise-gaussian", {"mean": 0.0}, "mean"),
        ("rise-gaussian", {"seed": -1}, "seed"),
        ("rise", {"p1": "half"}, "p1 should be a valid number, got 'half'"),
        ("rise", {"n_masks": 64.0}, "n_masks should be a valid integer, got 64.0"),
        ("rise", {"grid_size": 2.5}, "grid_size should be a valid integer, got 2.5"),
        ("rise", {"batch_size": 0}, "batch_size should be greater than or equal to 1, got 0"),
        ("rise-gaussian", {"std": float("nan")}, "std should be a finite number, got nan"),
        ("rise-gaussian", {"mean": "x"}, "mean should be a valid number, got 'x'"),
    ],
)
def test_bad_parameters(name: str, params: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_method(name, TinyNet(), **params)


def test_bad_ranges() -> None:
    method = make_method("rise", TinyNet(), n_masks=10)
    images, targets = torch.randn(1, 3, 8, 8), torch.tensor([0])
    with pytest.raises(ValueError, match="sample range"):
        method.accumulate(images, targets, 5, 11)
    with pytest.raises(ValueError, match="covers no masks"):
        method.finalize(method.accumulate(images, targets, 4, 4))
