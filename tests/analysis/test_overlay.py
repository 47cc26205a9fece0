"""pipeline.analysis.overlay: any map over any image, checked against a blend computed by hand."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from pipeline.analysis import as_rgb, overlay

PIXELS = np.random.default_rng(0).integers(0, 256, size=(17, 23, 3)).astype(np.uint8)


def _expected(rgb: np.ndarray, unit_map: np.ndarray, alpha: float, cmap: str = "turbo") -> np.ndarray:
    return (1 - alpha) * rgb + alpha * colormaps[cmap](unit_map)[..., :3]


def test_every_image_form_gives_the_same_rgb() -> None:
    expected = PIXELS / 255.0
    forms = [PIXELS, PIXELS / 255.0, Image.fromarray(PIXELS), torch.from_numpy(PIXELS).permute(2, 0, 1),
             torch.from_numpy(PIXELS / 255.0).permute(2, 0, 1).float(), Image.fromarray(PIXELS).convert("RGBA")]
    for form in forms:
        np.testing.assert_allclose(as_rgb(form), expected, atol=1e-6)
    gray = PIXELS[..., 0]
    np.testing.assert_allclose(as_rgb(Image.fromarray(gray)), np.repeat(gray[..., None] / 255.0, 3, axis=2), atol=1e-6)
    np.testing.assert_allclose(as_rgb(torch.from_numpy(gray)[None]), as_rgb(gray), atol=0)
    np.testing.assert_allclose(as_rgb(np.full((2, 2, 3), 1.5)), np.ones((2, 2, 3)))  # floats are clipped


def test_a_map_of_another_size_is_resized_normalized_and_blended() -> None:
    small = np.random.default_rng(1).random((4, 5)).astype(np.float32) * 7 - 2
    # upsampling: Pillow's bilinear filter equals F.interpolate's (half-pixel centres) up to rounding
    resized = F.interpolate(torch.from_numpy(small)[None, None], size=(17, 23), mode="bilinear",
                            align_corners=False)[0, 0].numpy()
    unit = (resized - small.min()) / (small.max() - small.min())
    result = overlay(Image.fromarray(PIXELS), torch.from_numpy(small)[None], alpha=0.4)
    assert result.shape == (17, 23, 3)
    np.testing.assert_allclose(result, _expected(PIXELS / 255.0, unit, 0.4), atol=1e-4)
    same_size = np.random.default_rng(2).random((17, 23))
    np.testing.assert_allclose(overlay(PIXELS, same_size, normalize=False, alpha=1.0, cmap="viridis"),
                               colormaps["viridis"](same_size)[..., :3], atol=1e-6)
    np.testing.assert_allclose(overlay(PIXELS, np.zeros((3, 3)), alpha=0.0), PIXELS / 255.0, atol=1e-6)


def test_an_axis_is_drawn_on_when_given() -> None:
    figure = Figure()
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    result = overlay(PIXELS, np.eye(4), ax=ax)
    assert len(ax.images) == 1
    np.testing.assert_array_equal(ax.images[0].get_array(), result)


def test_unusable_inputs_are_named() -> None:
    with pytest.raises(ValueError, match=r"saliency_map: expected a 2-D map, got shape \(2, 3, 4\)"):
        overlay(PIXELS, np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match=r"image: expected \[C, H, W\] \(a tensor\) with 1, 3 or 4 channels, "
                                         r"got shape \(2, 5, 5\)"):
        overlay(torch.zeros(2, 5, 5), np.zeros((5, 5)))
    with pytest.raises(ValueError, match="alpha must be in"):
        overlay(PIXELS, np.zeros((5, 5)), alpha=2.0)
