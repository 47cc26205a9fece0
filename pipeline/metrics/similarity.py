"""Similarity of saliency maps to ground-truth maps: Pearson correlation and SSIM.

Both functions take ``maps`` and ``gt`` ``[B, H, W]`` torch tensors (``gt`` may have
another size and device), resize ``gt`` to the maps' size (bilinear,
``align_corners=False``, no antialiasing), scale each map to [0, 1] per image
(min-max; a constant map becomes zeros) and compute in float64 on the maps' device.
They return float64 ``[B]``; a map or ground truth with NaN or inf values, or one value
everywhere, gives NaN.
"""
from __future__ import annotations

from typing import Annotated

import torch
from torch import Tensor

from ..methods.base import minmax_normalize, upsample
from ..parameters import Param, validated
from ._filters import filter_2d, gaussian_taps, uniform_taps

__all__ = ["pcc", "ssim", "ssim_window", "prepare_pair", "degenerate"]

#: SSIM constants of Wang et al. (2004), as in scikit-image
_K1 = 0.01
_K2 = 0.03
#: scikit-image's Gaussian window reaches int(3.5 * sigma + 0.5) pixels
_GAUSSIAN_TRUNCATE = 3.5


def degenerate(maps: Tensor) -> Tensor:
    """``[B]`` bool on ``maps``' device: True for a map of ``[B, H, W]`` with NaN or inf values or one value everywhere."""
    flat = maps.flatten(1).to(torch.float64)
    return ~torch.isfinite(flat).all(dim=1) | (flat.amax(dim=1) == flat.amin(dim=1))


def prepare_pair(maps: Tensor, gt: Tensor) -> tuple[Tensor, Tensor]:
    """``maps`` and ``gt`` resized to the maps' size and min-max scaled, float64 on the maps' device."""
    for name, value in (("maps", maps), ("gt", gt)):
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a torch tensor, got {type(value).__name__}")
        if value.dim() != 3:
            raise ValueError(f"{name} must be [B, H, W], got shape {tuple(value.shape)}")
    if gt.shape[0] != maps.shape[0]:
        raise ValueError(f"gt has {gt.shape[0]} maps but maps has {maps.shape[0]}")
    x = maps.to(torch.float64)
    y = upsample(gt.to(device=maps.device, dtype=torch.float64), (maps.shape[-2], maps.shape[-1]))
    return minmax_normalize(x), minmax_normalize(y)


def pcc(maps: Tensor, gt: Tensor) -> Tensor:
    """Pearson correlation ``[B]`` between each map and its ground truth (see the module docstring).

    A constant map (either one) has no correlation: its entry is NaN.
    """
    x, y = prepare_pair(maps, gt)
    x = x.flatten(1)
    y = y.flatten(1)
    x = x - x.mean(dim=1, keepdim=True)
    y = y - y.mean(dim=1, keepdim=True)
    return (x * y).sum(dim=1) / torch.sqrt((x * x).sum(dim=1) * (y * y).sum(dim=1))


def ssim_window(
    size: tuple[int, int], *, gaussian_weights: bool, sigma: float, win_size: int | None, use_sample_covariance: bool
) -> tuple[int, int]:
    """The Gaussian window's radius and ``win_size`` of :func:`ssim` on maps of ``size``.

    Raises ``ValueError`` naming ``win_size`` unless it (given or derived) is odd, no larger
    than the maps, and > 1 with ``use_sample_covariance``.
    """
    radius = int(_GAUSSIAN_TRUNCATE * sigma + 0.5)
    if win_size is None:
        win_size = 2 * radius + 1 if gaussian_weights else 7
    if win_size % 2 == 0:
        raise ValueError(f"win_size must be odd, got {win_size!r}")
    if win_size > min(size):
        raise ValueError(f"win_size {win_size} exceeds the map size {tuple(size)}")
    if use_sample_covariance and win_size == 1:
        raise ValueError("use_sample_covariance needs win_size > 1")
    return radius, win_size


@validated
def ssim(
    maps: Tensor,
    gt: Tensor,
    *,
    gaussian_weights: Annotated[bool, Param("Gaussian window (Wang et al.) instead of a uniform one")] = False,
    sigma: Annotated[float, Param("standard deviation of the Gaussian window", unit="pixels", gt=0)] = 1.5,
    win_size: Annotated[int | None, Param("window side, odd (None: 7 uniform, 2 int(3.5 sigma + 0.5) + 1 "
                                          "Gaussian)", unit="pixels", ge=1)] = None,
    use_sample_covariance: Annotated[bool, Param("sample (n - 1) instead of population covariances")] = True,
) -> Tensor:
    """Mean structural similarity ``[B]`` between each map and its ground truth.

    Equals ``skimage.metrics.structural_similarity(a, b, data_range=1,
    gaussian_weights=..., sigma=..., win_size=..., use_sample_covariance=...)`` on the
    prepared maps ``a, b`` (:func:`prepare_pair`). The defaults are scikit-image's, which
    the users call as ``structural_similarity(a, b, data_range=1)``: a 7 x 7 uniform
    window and sample covariances. Wang et al. (2004) use a Gaussian window
    (``gaussian_weights=True``, sigma 1.5, reaching ``int(3.5 * sigma + 0.5)`` pixels,
    so 11 x 11) and population covariances (``use_sample_covariance=False``). ``win_size`` (odd, default ``2 * radius + 1`` for the
    Gaussian window and 7 for the uniform one) sets the uniform window, the border of
    ``(win_size - 1) // 2`` pixels left out of the mean, and the sample-covariance
    factor; the local statistics use reflecting borders, as scikit-image does.
    """
    x, y = prepare_pair(maps, gt)
    radius, win_size = ssim_window(
        (x.shape[-2], x.shape[-1]),
        gaussian_weights=gaussian_weights,
        sigma=sigma,
        win_size=win_size,
        use_sample_covariance=use_sample_covariance,
    )
    if gaussian_weights:
        taps = gaussian_taps(sigma, radius, device=x.device)
    else:
        taps = uniform_taps(win_size, device=x.device)

    def local_mean(values: Tensor) -> Tensor:
        return filter_2d(values, taps, "symmetric")

    n_window = win_size**2
    cov_norm = n_window / (n_window - 1) if use_sample_covariance else 1.0
    mean_x, mean_y = local_mean(x), local_mean(y)
    var_x = cov_norm * (local_mean(x * x) - mean_x * mean_x)
    var_y = cov_norm * (local_mean(y * y) - mean_y * mean_y)
    cov_xy = cov_norm * (local_mean(x * y) - mean_x * mean_y)
    c1, c2 = _K1**2, _K2**2
    similarity = ((2 * mean_x * mean_y + c1) * (2 * cov_xy + c2)) / (
        (mean_x * mean_x + mean_y * mean_y + c1) * (var_x + var_y + c2)
    )
    border = (win_size - 1) // 2
    height, width = similarity.shape[-2:]
    mean = similarity[:, border : height - border, border : width - border].mean(dim=(1, 2))
    unusable = degenerate(maps).to(mean.device) | degenerate(gt).to(mean.device)
    return torch.where(unusable, torch.full_like(mean, torch.nan), mean)
