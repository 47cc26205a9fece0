"""RISE (Petsiuk et al., 2018) and the users' Gaussian-mask variant.

Both explain a class by averaging random smooth masks weighted by the softmax
probability the model gives the class on the masked image. A mask is a coarse
``grid_size x grid_size`` grid, upsampled bilinearly to ``(grid_size + 1) * cell``
pixels (``cell = ceil(H / grid_size)``, likewise for the width), shifted by a random
offset of ``0 .. cell - 1`` pixels and cropped to ``H x W``. Mask ``i`` is a pure
function of ``(seed, i)`` (drawn from ``rng = numpy.random.default_rng([seed, i])``:
the grid, then the shifts ``rng.integers(0, (cell_h, cell_w))``), so sample ranges
can be computed anywhere and merged. Partials are int64 fixed-point sums (see
:class:`_MaskedSampling`): shards cut at multiples of ``samples_per_forward`` merge to
bitwise the maps of a single run.

- :class:`Rise`: binary grid cells kept with probability ``p1``; the map is
  ``sum_i P(c | I * M_i) M_i / (N * p1)``.
- :class:`GaussianRise`: grid cells drawn from ``Normal(mean, std)`` clipped to
  ``[0, 1]``; the map is ``sum_i P(c | I * M_i) M_i / (N * mean(M))`` with
  ``mean(M)`` the mean pixel value of all masks used.
"""
from __future__ import annotations

import abc
import math
from typing import Callable, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Partial, SampledExplainer, batched, check_integer, check_real, from_fixed, to_fixed

__all__ = ["Rise", "GaussianRise", "rise_masks", "gaussian_rise_masks"]

#: draws one ``grid_size x grid_size`` grid of values in [0, 1] from a generator
_GridDraw = Callable[[np.random.Generator, int], np.ndarray]


def _smooth_masks(
    seed: int,
    start: int,
    stop: int,
    size: tuple[int, int],
    grid_size: int,
    draw_grid: _GridDraw,
    device: torch.device | str,
) -> Tensor:
    """Masks ``start .. stop-1`` ``[n, H, W]`` (float32, on ``device``) from grids drawn by ``draw_grid``."""
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if not 0 <= start <= stop:
        raise ValueError(f"mask range must satisfy 0 <= start <= stop, got start={start}, stop={stop}")
    if grid_size < 1:
        raise ValueError(f"grid_size must be >= 1, got {grid_size}")
    height, width = size
    if height < 1 or width < 1:
        raise ValueError(f"size must be positive, got {tuple(size)}")
    count = stop - start
    if count == 0:
        return torch.zeros((0, height, width), dtype=torch.float32, device=device)
    cell_height, cell_width = math.ceil(height / grid_size), math.ceil(width / grid_size)
    grids = np.empty((count, grid_size, grid_size), dtype=np.float32)
    shifts = np.empty((count, 2), dtype=np.int64)
    for row, index in enumerate(range(start, stop)):
        rng = np.random.default_rng([seed, index])
        grids[row] = draw_grid(rng, grid_size)
        shifts[row] = rng.integers(0, (cell_height, cell_width))
    grids_device = torch.from_numpy(grids).to(device)
    shifts_device = torch.from_numpy(shifts).to(device)
    upsampled = F.interpolate(
        grids_device.unsqueeze(1),
        size=((grid_size + 1) * cell_height, (grid_size + 1) * cell_width),
        mode="bilinear",
        align_corners=False,
    ).squeeze(1)
    rows = shifts_device[:, :1] + torch.arange(height, device=device)
    cols = shifts_device[:, 1:] + torch.arange(width, device=device)
    samples = torch.arange(count, device=device)
    return upsampled[samples[:, None, None], rows[:, :, None], cols[:, None, :]]


def rise_masks(
    seed: int,
    start: int,
    stop: int,
    size: tuple[int, int],
    grid_size: int = 8,
    p1: float = 0.5,
    *,
    device: torch.device | str = "cpu",
) -> Tensor:
    """RISE masks ``start .. stop-1`` as ``[n, H, W]`` float32: binary grid cells kept with probability ``p1``."""
    if not 0.0 < p1 <= 1.0:
        raise ValueError(f"p1 must be in (0, 1], got {p1}")

    def draw_binary(rng: np.random.Generator, grid_size: int) -> np.ndarray:
        return rng.random((grid_size, grid_size)) < p1

    return _smooth_masks(seed, start, stop, size, grid_size, draw_binary, device)


def gaussian_rise_masks(
    seed: int,
    start: int,
    stop: int,
    size: tuple[int, int],
    grid_size: int = 8,
    mean: float = 0.5,
    std: float = 0.25,
    *,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Gaussian RISE masks ``start .. stop-1`` as ``[n, H, W]`` float32:
    grid cells ``Normal(mean, std)`` clipped to [0, 1]."""
    if not 0.0 < mean <= 1.0:
        raise ValueError(f"mean must be in (0, 1], got {mean}")
    if std < 0.0:
        raise ValueError(f"std must be >= 0, got {std}")

    def draw_gaussian(rng: np.random.Generator, grid_size: int) -> np.ndarray:
        return np.clip(rng.normal(mean, std, (grid_size, grid_size)), 0.0, 1.0)

    return _smooth_masks(seed, start, stop, size, grid_size, draw_gaussian, device)


class _MaskedSampling(SampledExplainer):
    """Accumulation shared by the RISE variants: probability-weighted sums of masks.

    Partials hold ``weighted`` ``[B, H, W]`` (sum of ``P(c | I * M_i) * M_i``) and, where
    :attr:`tracks_mask_sum`, ``mask_sum`` ``[B]`` (sum of each mask's mean value), both
    int64 fixed point (:func:`~pipeline.methods.base.to_fixed`), and ``count`` ``[B]``
    (the number of masks, int64).
    """

    #: whether partials carry ``mask_sum``
    tracks_mask_sum: ClassVar[bool] = False

    def __init__(self, model: nn.Module | None, n_masks: int, grid_size: int, seed: int, batch_size: int) -> None:
        super().__init__(model, check_integer(self.name, "n_masks", n_masks, 1), seed, batch_size)
        self.grid_size = check_integer(self.name, "grid_size", grid_size, 1)

    @abc.abstractmethod
    def masks(self, start: int, stop: int, size: tuple[int, int], device: torch.device | str) -> Tensor:
        """Masks ``start .. stop-1`` of this explainer, ``[n, H, W]`` float32 on ``device``."""

    def empty_sums(self, images: Tensor, constants: dict[str, Tensor]) -> dict[str, Tensor]:
        n_images, _, height, width = images.shape
        keys = ("count", "mask_sum") if self.tracks_mask_sum else ("count",)
        sums = {key: images.new_zeros((n_images,), dtype=torch.int64) for key in keys}
        return {"weighted": images.new_zeros((n_images, height, width), dtype=torch.int64), **sums}

    def group_sums(
        self, images: Tensor, targets: Tensor, start: int, stop: int, constants: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        n_images, _, height, width = images.shape
        masks = self.masks(start, stop, (height, width), images.device)
        flat_masks = masks.double().flatten(1)
        image_masks = masks.to(images.dtype)[None, :, None]
        weighted = images.new_empty((n_images, height, width), dtype=torch.int64)
        for image_start, image_stop in batched(n_images, self.forward_split(n_images)[0]):
            chunk = slice(image_start, image_stop)
            probabilities = self.target_probabilities(images[chunk].unsqueeze(1) * image_masks, targets[chunk])
            weighted[chunk] = to_fixed((probabilities.double() @ flat_masks).view(-1, height, width))
        sums = {"weighted": weighted, "count": images.new_full((n_images,), stop - start, dtype=torch.int64)}
        if self.tracks_mask_sum:
            sums["mask_sum"] = to_fixed(flat_masks.mean(dim=1).sum()).expand(n_images).clone()
        return sums

    def finalize(self, partial: Partial) -> Tensor:
        normalizer = self.normalizer(partial)
        if not bool((normalizer > 0).all()):
            raise ValueError(f"{self.name}: the partial covers no masks; accumulate a non-empty range first")
        return (from_fixed(partial.sums["weighted"]) / normalizer.view(-1, 1, 1)).float()

    @abc.abstractmethod
    def normalizer(self, partial: Partial) -> Tensor:
        """The per-image divisor ``[B]`` (float64) of the weighted mask sum."""


class Rise(_MaskedSampling):
    """RISE (Petsiuk et al., 2018): binary random masks, saliency ``sum_i P(c | I*M_i) M_i / (N p1)``.

    ``n_masks`` masks of a ``grid_size`` grid whose cells are kept with probability
    ``p1``; ``batch_size`` masked images per model forward (several images share a
    forward, at least one image and one mask each).
    """

    name = "rise"

    def __init__(
        self,
        model: nn.Module | None,
        n_masks: int = 4000,
        grid_size: int = 8,
        p1: float = 0.5,
        seed: int = 0,
        batch_size: int = 100,
    ) -> None:
        super().__init__(model, n_masks, grid_size, seed, batch_size)
        self.p1 = check_real(self.name, "p1", p1)
        if not 0.0 < self.p1 <= 1.0:
            raise ValueError(f"{self.name}: p1 must be in (0, 1], got {p1}")

    def masks(self, start: int, stop: int, size: tuple[int, int], device: torch.device | str) -> Tensor:
        return rise_masks(self.seed, start, stop, size, self.grid_size, self.p1, device=device)

    def normalizer(self, partial: Partial) -> Tensor:
        return partial.sums["count"].double() * self.p1


class GaussianRise(_MaskedSampling):
    """Gaussian RISE: grid cells ``Normal(mean, std)`` clipped to [0, 1], saliency
    ``sum_i P(c | I*M_i) M_i / (N mean(M))`` with ``mean(M)`` the mean pixel value of the masks used.

    Partials carry ``mask_sum`` (the sum of each mask's mean value), so shards merge exactly.
    """

    name = "rise-gaussian"
    tracks_mask_sum = True

    def __init__(
        self,
        model: nn.Module | None,
        n_masks: int = 4000,
        grid_size: int = 8,
        mean: float = 0.5,
        std: float = 0.25,
        seed: int = 0,
        batch_size: int = 100,
    ) -> None:
        super().__init__(model, n_masks, grid_size, seed, batch_size)
        self.mean = check_real(self.name, "mean", mean)
        self.std = check_real(self.name, "std", std)
        if not 0.0 < self.mean <= 1.0:
            raise ValueError(f"{self.name}: mean must be in (0, 1], got {mean}")
        if self.std < 0.0:
            raise ValueError(f"{self.name}: std must be >= 0, got {std}")

    def masks(self, start: int, stop: int, size: tuple[int, int], device: torch.device | str) -> Tensor:
        return gaussian_rise_masks(self.seed, start, stop, size, self.grid_size, self.mean, self.std, device=device)

    def normalizer(self, partial: Partial) -> Tensor:
        return from_fixed(partial.sums["mask_sum"])
