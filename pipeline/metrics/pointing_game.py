"""Pointing game (Zhang et al. 2016): does the map's maximum fall on the object?

The point is the map's maximum; when several pixels share it, the first in row-major
order (lowest ``i * W + j``). The ground-truth region is ``gt > threshold * max(gt)``
per image (``relative=True``) or ``gt > threshold`` (``relative=False``). A hit is a
point within ``tolerance`` pixels (Euclidean distance between pixel coordinates,
inclusive: distance == tolerance is a hit) of some pixel of the region. A map or ground
truth with NaN or inf values, or one value everywhere, scores NaN.
"""
from __future__ import annotations

import math
from typing import Annotated

import torch
from torch import Tensor

from ..parameters import Param, validated
from ._checks import number_in
from .similarity import degenerate

__all__ = ["pointing_game", "check_pointing_parameters", "pointing_game_accuracy"]


def check_pointing_parameters(size: tuple[int, int], *, tolerance: float, threshold: float, relative: bool) -> None:
    """Raise ``ValueError`` naming the parameter unless the pointing game can score ``size`` maps so.

    ``tolerance`` is shorter than the maps' diagonal (from there on every point is a hit),
    and ``threshold`` is in [0, 1) when relative (1 or more leaves every region empty, a
    negative one takes every pixel).
    """
    diagonal = math.hypot(size[0] - 1, size[1] - 1)
    number_in("tolerance", tolerance, 0, diagonal, low_closed=True, high_closed=False)
    if relative:
        number_in("threshold", threshold, 0, 1, low_closed=True, high_closed=False)


@validated
def pointing_game(
    maps: Tensor,
    gt: Tensor,
    *,
    tolerance: Annotated[float, Param("distance from the region still counted as a hit", unit="pixels", ge=0)] = 15.0,
    threshold: Annotated[float, Param("the region is gt > threshold (times max(gt) when relative)")] = 0.5,
    relative: Annotated[bool, Param("threshold relative to each ground truth's maximum")] = True,
) -> Tensor:
    """Hits ``[B]`` (float32 on the maps' device): 1.0 hit, 0.0 miss, NaN when the gt region is empty
    or a map or ground truth is unusable (NaN, inf or constant).

    ``maps`` and ``gt`` are ``[B, H, W]`` of the same size (``gt`` may be on another
    device or boolean). See the module docstring for the point, region and tolerance.
    """
    for name, value in (("maps", maps), ("gt", gt)):
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a torch tensor, got {type(value).__name__}")
        if value.dim() != 3:
            raise ValueError(f"{name} must be [B, H, W], got shape {tuple(value.shape)}")
    if gt.shape != maps.shape:
        raise ValueError(f"gt must have the maps' shape {tuple(maps.shape)}, got {tuple(gt.shape)}")
    height, width = maps.shape[-2:]
    check_pointing_parameters((height, width), tolerance=tolerance, threshold=threshold, relative=relative)
    gt = gt.to(device=maps.device, dtype=torch.float64)

    if relative:
        region = gt > threshold * gt.flatten(1).max(dim=1).values.view(-1, 1, 1)
    else:
        region = gt > threshold
    peak = maps.flatten(1).argmax(dim=1)
    rows = torch.arange(height, device=maps.device, dtype=torch.float64).view(1, -1, 1)
    cols = torch.arange(width, device=maps.device, dtype=torch.float64).view(1, 1, -1)
    squared = (rows - (peak // width).view(-1, 1, 1)) ** 2 + (cols - (peak % width).view(-1, 1, 1)) ** 2
    nearest = torch.where(region, squared, torch.full_like(squared, torch.inf)).flatten(1).min(dim=1).values
    hits = (torch.sqrt(nearest) <= tolerance).float()
    scored = region.flatten(1).any(dim=1) & ~degenerate(maps) & ~degenerate(gt)
    return torch.where(scored, hits, torch.full_like(hits, torch.nan))


def pointing_game_accuracy(hits: Tensor) -> float:
    """Fraction of hits in [0, 1] over the images with a non-empty region (NaN entries left out)."""
    return float(torch.nanmean(hits.float()))
