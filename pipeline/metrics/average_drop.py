"""Average Drop and Increase in Confidence (Grad-CAM++, Chattopadhyay et al. 2018).

For each image, ``Y`` is the softmax probability of the target class on the image and
``O`` the probability on the image multiplied by its explanation map (min-max scaled
to [0, 1] per image). The product is taken on the model input as given (normalized
space), broadcast over channels.

- Average Drop = mean over images of ``max(0, Y - O) / Y * 100`` (lower is better);
- Increase in Confidence = percentage of images with ``O > Y`` (higher is better).
"""
from __future__ import annotations

import math
from typing import Annotated

import torch
from torch import Tensor, nn

from ..cost import Work
from ..methods.base import batched, check_targets, minmax_normalize
from ..parameters import Param, validated
from .insertion_deletion import model_device, pixel_rank

__all__ = ["average_drop_increase", "drop_cost", "explanation_masks", "summarize_drop_increase"]

TopPercent = Annotated[float | None, Param("share of the most salient pixels kept in the mask (None: the whole map)",
                                           unit="%", gt=0, le=100)]


def drop_cost(size: tuple[int, int], *, top_percent: float | None, batch_size: int) -> Work:
    """The forwards per image: the image and the image times its explanation mask."""
    return Work(2)


@validated
def explanation_masks(maps: Tensor, top_percent: TopPercent = None) -> Tensor:
    """Maps ``[B, H, W]`` min-max scaled to [0, 1] (a constant map becomes zeros).

    With ``top_percent``, only the ``k = ceil(top_percent / 100 * H * W)`` most salient
    pixels keep their scaled value and all others are set to 0; ties are broken as in
    :func:`~pipeline.metrics.insertion_deletion.pixel_rank` (lower row-major index first).
    """
    masks = minmax_normalize(maps.float())
    if top_percent is None:
        return masks
    n_pixels = maps.shape[-2] * maps.shape[-1]
    kept = math.ceil(top_percent * n_pixels / 100)
    inside = (pixel_rank(maps) < kept).view_as(masks)
    return torch.where(inside, masks, torch.zeros_like(masks))


@validated
def average_drop_increase(
    model: nn.Module,
    images: Tensor,
    maps: Tensor,
    targets: Tensor,
    *,
    top_percent: TopPercent = None,
    batch_size: Annotated[int, Param("images per model forward", unit="images", ge=1)] = 256,
) -> tuple[Tensor, Tensor]:
    """Per-image drop ``[B]`` (float32, percent) and increase ``[B]`` (bool), on the model's device.

    ``drop = max(0, Y - O) / Y * 100`` and ``increase = O > Y`` with ``Y`` the target's
    softmax probability on ``images`` ``[B, C, H, W]`` and ``O`` on
    ``images * explanation_masks(maps, top_percent)``. The model runs under ``no_grad``
    in its current mode, ``batch_size`` images per forward. Average them with
    :func:`summarize_drop_increase`.
    """
    check_targets(images, targets)
    n_images, _, height, width = images.shape
    if maps.shape != (n_images, height, width):
        raise ValueError(f"maps must be [B, H, W]={[n_images, height, width]}, got shape {tuple(maps.shape)}")
    device = model_device(model, images.device)
    images, maps, targets = images.to(device), maps.to(device), targets.to(device)
    masks = explanation_masks(maps, top_percent).to(images.dtype).unsqueeze(1)

    original = torch.empty(n_images, dtype=torch.float32, device=device)
    explained = torch.empty(n_images, dtype=torch.float32, device=device)
    with torch.no_grad():
        for first, stop in batched(n_images, batch_size):
            chosen = targets[first:stop].unsqueeze(1)
            original[first:stop] = model(images[first:stop]).float().softmax(dim=1).gather(1, chosen).squeeze(1)
            masked = images[first:stop] * masks[first:stop]
            explained[first:stop] = model(masked).float().softmax(dim=1).gather(1, chosen).squeeze(1)
    drop = (original - explained).clamp_min(0) / original * 100
    return drop, explained > original


def summarize_drop_increase(drop: Tensor, increase: Tensor) -> tuple[float, float]:
    """``(average_drop, increase_in_confidence)``, both in percent, from the per-image values."""
    if drop.numel() == 0 or drop.shape != increase.shape:
        raise ValueError(
            "drop and increase must be non-empty and of the same shape, "
            f"got {tuple(drop.shape)} and {tuple(increase.shape)}"
        )
    return float(drop.float().mean()), float(increase.float().mean() * 100)
