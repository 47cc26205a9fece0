"""RISE (Petsiuk et al., 2018) and the users' Gaussian-mask variant.

Both explain a class by averaging random smooth masks weighted by the softmax
probability the model gives the class on the masked image. A mask is a coarse
``grid_size x grid_size`` grid, upsampled bilinearly to ``(grid_size + 1) * cell``
pixels (``cell = ceil(H / grid_size)``, likewise for the width), shifted by a random
offset of ``0 .. cell - 1`` pixels and cropped to ``H x W``. Mask ``i`` is a pure
function of ``(seed, i)``: with ``u = uniforms(seed, i, i + 1, grid_size**2 + 2)[0]``
(:func:`~pipeline.methods.draws.uniforms`, counter-based Philox), cell ``(r, c)`` comes
from ``u[r * grid_size + c]`` and the (row, column) shift is
``floor(u[grid_size**2] * cell_h), floor(u[grid_size**2 + 1] * cell_w)``. A shard's grids
and shifts are drawn at once (:meth:`_MaskedSampling.draw`) and copied to the device once;
the upsampling, shift and crop run there, per forward batch. Partials are int64
fixed-point sums (see :class:`_MaskedSampling`): shards cut at multiples of
``samples_per_forward`` merge to bitwise the maps of a single run.

- :class:`Rise`: binary grid cells kept with probability ``p1``; the map is
  ``sum_i P(c | I * M_i) M_i / (N * p1)``.
- :class:`GaussianRise`: grid cells drawn from ``Normal(mean, std)`` clipped to
  ``[0, 1]``; the map is ``sum_i P(c | I * M_i) M_i / (N * mean(M))`` with
  ``mean(M)`` the mean pixel value of all masks used.
"""
from __future__ import annotations

import abc
import math
from typing import Annotated, Any, Callable, ClassVar, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..cost import Work
from .base import BatchSize, MAX_SAMPLES, Partial, SampledExplainer, Seed, batched, from_fixed, to_fixed
from ..parameters import Param, validated
from .draws import to_device, uniforms

__all__ = ["Rise", "GaussianRise", "rise_masks", "gaussian_rise_masks", "mask_draws", "smooth_masks"]

#: maps uniform draws in (0, 1) (float64 ``[n, grid_size**2]``) to grid cell values in [0, 1]
_CellValues = Callable[[np.ndarray], np.ndarray]


def _check_range(seed: int, start: int, stop: int, size: tuple[int, int], grid_size: int) -> None:
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if not 0 <= start <= stop:
        raise ValueError(f"mask range must satisfy 0 <= start <= stop, got start={start}, stop={stop}")
    if grid_size < 1:
        raise ValueError(f"grid_size must be >= 1, got {grid_size}")
    if size[0] < 1 or size[1] < 1:
        raise ValueError(f"size must be positive, got {tuple(size)}")


def _cells(size: tuple[int, int], grid_size: int) -> tuple[int, int]:
    """The cell size in pixels (rows, columns) of a ``grid_size`` grid over ``size``."""
    return math.ceil(size[0] / grid_size), math.ceil(size[1] / grid_size)


def mask_draws(
    seed: int, start: int, stop: int, size: tuple[int, int], grid_size: int, cell_values: _CellValues
) -> tuple[np.ndarray, np.ndarray]:
    """Grids ``[n, grid_size, grid_size]`` (float32) and (row, column) shifts ``[n, 2]`` (int64)
    of masks ``start .. stop-1``, drawn at once."""
    _check_range(seed, start, stop, size, grid_size)
    cells = grid_size * grid_size
    draws = uniforms(seed, start, stop, cells + 2)
    grids = cell_values(draws[:, :cells]).reshape(-1, grid_size, grid_size).astype(np.float32)
    shifts = np.floor(draws[:, cells:] * np.array(_cells(size, grid_size))).astype(np.int64)
    return grids, shifts


def smooth_masks(grids: Tensor, shifts: Tensor, size: tuple[int, int]) -> Tensor:
    """Masks ``[n, H, W]`` (float32, on the grids' device) from grids ``[n, g, g]`` and shifts ``[n, 2]``:
    bilinear upsampling to ``(g + 1) * cell`` pixels, shift and crop."""
    count, grid_size = grids.shape[0], grids.shape[-1]
    height, width = size
    cell_height, cell_width = _cells(size, grid_size)
    device = grids.device
    if count == 0:
        return torch.zeros((0, height, width), dtype=torch.float32, device=device)
    upsampled = F.interpolate(
        grids.unsqueeze(1),
        size=((grid_size + 1) * cell_height, (grid_size + 1) * cell_width),
        mode="bilinear",
        align_corners=False,
    ).squeeze(1)
    rows = shifts[:, :1] + torch.arange(height, device=device)
    cols = shifts[:, 1:] + torch.arange(width, device=device)
    samples = torch.arange(count, device=device)
    return upsampled[samples[:, None, None], rows[:, :, None], cols[:, None, :]]


def binary_cells(p1: float) -> _CellValues:
    """Cells kept (1) where the draw is below ``p1``, else 0."""
    if not 0.0 < p1 <= 1.0:
        raise ValueError(f"p1 must be in (0, 1], got {p1}")
    return lambda draws: (draws < p1).astype(np.float32)


def gaussian_cells(mean: float, std: float) -> _CellValues:
    """Cells ``Normal(mean, std)`` by inverse CDF of the draw, clipped to [0, 1]."""
    if not 0.0 < mean <= 1.0:
        raise ValueError(f"mean must be in (0, 1], got {mean}")
    if std < 0.0:
        raise ValueError(f"std must be >= 0, got {std}")
    return lambda draws: np.clip(mean + std * torch.special.ndtri(torch.from_numpy(draws)).numpy(), 0.0, 1.0)


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
    grids, shifts = mask_draws(seed, start, stop, size, grid_size, binary_cells(p1))
    return smooth_masks(to_device(grids, device), to_device(shifts, device), size)


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
    grids, shifts = mask_draws(seed, start, stop, size, grid_size, gaussian_cells(mean, std))
    return smooth_masks(to_device(grids, device), to_device(shifts, device), size)


MaskCount = Annotated[int, Param("masks drawn per image", unit="masks", ge=1, le=MAX_SAMPLES)]
GridSize = Annotated[int, Param("cells per side of the mask grid before upsampling", unit="cells", ge=1)]


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
        super().__init__(model, n_masks, seed, batch_size)
        self.grid_size = grid_size

    @classmethod
    def cost(cls, params: Mapping[str, Any], size: tuple[int, int], channels: Mapping[str, int]) -> Work:
        """``n_masks`` forwards per image."""
        return Work(params["n_masks"])

    @abc.abstractmethod
    def cell_values(self) -> _CellValues:
        """How this variant turns draws into grid cell values."""

    def draw(self, start: int, stop: int, images: Tensor, constants: dict[str, Tensor]) -> dict[str, Tensor]:
        """``grids`` and ``shifts`` of masks ``start .. stop-1`` (:func:`mask_draws`), on the images' device."""
        size = (images.shape[-2], images.shape[-1])
        grids, shifts = mask_draws(self.seed, start, stop, size, self.grid_size, self.cell_values())
        return {"grids": to_device(grids, images.device), "shifts": to_device(shifts, images.device)}

    def empty_sums(self, images: Tensor, constants: dict[str, Tensor]) -> dict[str, Tensor]:
        n_images, _, height, width = images.shape
        keys = ("count", "mask_sum") if self.tracks_mask_sum else ("count",)
        sums = {key: images.new_zeros((n_images,), dtype=torch.int64) for key in keys}
        return {"weighted": images.new_zeros((n_images, height, width), dtype=torch.int64), **sums}

    def group_sums(
        self, images: Tensor, targets: Tensor, start: int, stop: int, constants: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        n_images, _, height, width = images.shape
        masks = smooth_masks(constants["grids"], constants["shifts"], (height, width))
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

    @validated
    def __init__(
        self,
        model: nn.Module | None,
        n_masks: MaskCount = 4000,
        grid_size: GridSize = 8,
        p1: Annotated[float, Param("probability that a grid cell is kept", gt=0, le=1)] = 0.5,
        seed: Seed = 0,
        batch_size: BatchSize = 100,
    ) -> None:
        super().__init__(model, n_masks, grid_size, seed, batch_size)
        self.p1 = p1

    def cell_values(self) -> _CellValues:
        return binary_cells(self.p1)

    def normalizer(self, partial: Partial) -> Tensor:
        return partial.sums["count"].double() * self.p1


class GaussianRise(_MaskedSampling):
    """Gaussian RISE: grid cells ``Normal(mean, std)`` clipped to [0, 1], saliency
    ``sum_i P(c | I*M_i) M_i / (N mean(M))`` with ``mean(M)`` the mean pixel value of the masks used.

    Partials carry ``mask_sum`` (the sum of each mask's mean value), so shards merge exactly.
    """

    name = "rise-gaussian"
    tracks_mask_sum = True

    @validated
    def __init__(
        self,
        model: nn.Module | None,
        n_masks: MaskCount = 4000,
        grid_size: GridSize = 8,
        mean: Annotated[float, Param("mean of a grid cell's normal draw", gt=0, le=1)] = 0.5,
        std: Annotated[float, Param("standard deviation of a grid cell's normal draw", ge=0)] = 0.25,
        seed: Seed = 0,
        batch_size: BatchSize = 100,
    ) -> None:
        super().__init__(model, n_masks, grid_size, seed, batch_size)
        self.mean = mean
        self.std = std

    def cell_values(self) -> _CellValues:
        return gaussian_cells(self.mean, self.std)

    def normalizer(self, partial: Partial) -> Tensor:
        return from_fixed(partial.sums["mask_sum"])
