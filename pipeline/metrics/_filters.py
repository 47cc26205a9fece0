"""Separable 1-D filters written as banded matrices, shared by the blur substrate and SSIM.

Filtering the last two dimensions of ``x`` ``[..., H, W]`` is ``Mh @ x @ Mw.T``, where
each matrix holds the filter taps and the boundary rule. Writing the boundary into the
matrix gives exact zero padding and exact half-sample symmetric padding (SciPy's
``mode="reflect"``: ``d c b a | a b c d | d c b a``) for any filter length, with no
TF32 convolution on the GPU.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = ["gaussian_taps", "uniform_taps", "filter_matrix", "filter_2d"]

Padding = Literal["zeros", "symmetric"]


def gaussian_taps(
    sigma: float, radius: int, *, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
) -> Tensor:
    """The ``2 * radius + 1`` sampled Gaussian weights ``exp(-x^2 / (2 sigma^2))``, normalized to sum 1."""
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
    taps = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return (taps / taps.sum()).to(dtype)


def uniform_taps(
    size: int, *, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
) -> Tensor:
    """``size`` equal weights summing to 1 (``size`` odd, so the window is centred)."""
    return torch.full((size,), 1.0 / size, dtype=dtype, device=device)


def filter_matrix(length: int, taps: Tensor, padding: Padding) -> Tensor:
    """The ``[length, length]`` matrix ``M`` with ``(M @ v)[i] = sum_d taps[d + r] * v_ext[i + d]``.

    ``r = (len(taps) - 1) // 2``; ``v_ext`` extends ``v`` by zeros (``"zeros"``) or by
    half-sample symmetric reflection, repeated as far as the taps reach (``"symmetric"``).
    """
    radius = (taps.numel() - 1) // 2
    rows = torch.arange(length, device=taps.device).unsqueeze(1)
    offsets = torch.arange(-radius, radius + 1, device=taps.device).unsqueeze(0)
    sources = rows + offsets
    weights = taps.unsqueeze(0).expand(length, -1)
    if padding == "symmetric":
        period = sources.remainder(2 * length)
        sources = torch.where(period < length, period, 2 * length - 1 - period)
    elif padding == "zeros":
        inside = (sources >= 0) & (sources < length)
        weights = torch.where(inside, weights, torch.zeros_like(weights))
        sources = sources.clamp(0, length - 1)
    else:
        raise ValueError(f"padding must be 'zeros' or 'symmetric', got {padding!r}")
    matrix = torch.zeros(length, length, dtype=taps.dtype, device=taps.device)
    return matrix.scatter_add_(1, sources, weights)


def filter_2d(x: Tensor, taps: Tensor, padding: Padding) -> Tensor:
    """Filter the last two dimensions of ``x`` with ``taps`` along each (a separable 2-D filter)."""
    taps = taps.to(dtype=x.dtype, device=x.device)
    rows = filter_matrix(x.shape[-2], taps, padding)
    cols = filter_matrix(x.shape[-1], taps, padding)
    return rows @ x @ cols.T
