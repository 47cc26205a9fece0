"""A saliency map over an image, for any image and any map (no run needed).

:func:`overlay` blends ``alpha * cmap(map) + (1 - alpha) * image`` (the usual CAM overlay, as
:func:`~pipeline.analysis.plots.overlay_grid` draws it) into an RGB array, and draws it on an
axis when one is given.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from PIL import Image

from .plots import SALIENCY_CMAP, normalize_map

__all__ = ["overlay", "as_rgb"]


def _array(value: Any) -> np.ndarray:
    """A numpy array of a numpy array or a tensor (``torch`` is not imported: a tensor is detached and copied)."""
    if hasattr(value, "detach"):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def as_rgb(image: Any) -> np.ndarray:
    """``image`` as float RGB ``[H, W, 3]`` in [0, 1]: a PIL image (any mode), an array ``[H, W]``,
    ``[H, W, 3]`` or ``[H, W, 4]`` (uint8 in 0..255, or floats in [0, 1]), or a tensor ``[C, H, W]``
    (1 or 3 channels, likewise). Floats are clipped to [0, 1]; an alpha channel is dropped."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    channels_first = hasattr(image, "detach")
    pixels = _array(image)
    if channels_first and pixels.ndim == 3:
        pixels = np.moveaxis(pixels, 0, -1)
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pixels.ndim != 3 or pixels.shape[-1] not in (1, 3, 4):
        layout = "[C, H, W] (a tensor)" if channels_first else "[H, W], [H, W, 3] or [H, W, 4]"
        raise ValueError(f"image: expected {layout} with 1, 3 or 4 channels, got shape {tuple(_array(image).shape)}")
    if pixels.dtype == np.uint8:
        scaled = pixels.astype(np.float32) / 255.0
    else:
        scaled = np.clip(pixels.astype(np.float32), 0.0, 1.0)
    return np.repeat(scaled, 3, axis=-1) if scaled.shape[-1] == 1 else scaled[..., :3]


def overlay(
    image: Any,
    saliency_map: Any,
    *,
    alpha: float = 0.5,
    cmap: str = SALIENCY_CMAP,
    normalize: bool = True,
    ax: Axes | None = None,
) -> np.ndarray:
    """``saliency_map`` coloured with ``cmap`` over ``image``: float RGB ``[H, W, 3]`` in [0, 1].

    ``image`` is anything :func:`as_rgb` reads; ``saliency_map`` a 2-D array or tensor of any size
    (``[1, h, w]`` too), resized bilinearly to the image (Pillow: antialiased when shrinking). It is
    min-max normalized first (``normalize``; a constant map gives zeros) or else clipped to [0, 1];
    NaN counts as 0. With ``ax`` the result is also drawn there, without ticks.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    rgb = as_rgb(image)
    values = np.squeeze(_array(saliency_map)).astype(np.float32)
    if values.ndim != 2:
        raise ValueError(f"saliency_map: expected a 2-D map, got shape {tuple(_array(saliency_map).shape)}")
    values = normalize_map(values) if normalize else np.clip(values, 0.0, 1.0)
    values = np.nan_to_num(values, nan=0.0).astype(np.float32)
    height, width = rgb.shape[:2]
    if values.shape != (height, width):
        values = np.asarray(Image.fromarray(values).resize((width, height), Image.BILINEAR))
    coloured = colormaps[cmap](np.clip(values, 0.0, 1.0))[..., :3]
    blended = (1.0 - alpha) * rgb + alpha * coloured
    if ax is not None:
        ax.imshow(blended)
        ax.set_xticks([])
        ax.set_yticks([])
    return blended
