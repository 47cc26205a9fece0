"""Grad-CAM against the closed-form CAM of a GAP + linear network and against
gradients taken on a model split by hand at the layer."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.methods import build_method


class TinyNet(nn.Module):
    """conv-ReLU-conv(stride 2)-ReLU features, an optional conv-ReLU, global average pooling, linear head."""

    def __init__(self, mid: bool) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU()
        )
        self.mid = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.ReLU()) if mid else nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 5)

    def head(self, activations: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.mid(activations)).flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def make_model(mid: bool) -> TinyNet:
    torch.manual_seed(0)
    return TinyNet(mid).eval()


def make_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    return torch.randn(3, 3, 32, 32, generator=generator), torch.tensor([0, 2, 4])


def bilinear_numpy(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of ``[..., h, w]`` with half-pixel centres (``align_corners=False``)."""

    def axis(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        source = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
        low = np.floor(source).astype(int)
        high = np.minimum(low + 1, n_in - 1)
        return low, high, source - low

    y0, y1, wy = axis(size[0], maps.shape[-2])
    x0, x1, wx = axis(size[1], maps.shape[-1])
    top = maps[..., y0, :][..., x0] * (1 - wx) + maps[..., y0, :][..., x1] * wx
    bottom = maps[..., y1, :][..., x0] * (1 - wx) + maps[..., y1, :][..., x1] * wx
    return top * (1 - wy)[:, None] + bottom * wy[:, None]


def test_equals_closed_form_cam_of_gap_linear_network() -> None:
    # logit_c = sum_k W[c, k] * mean(A_k) + b_c, so dlogit_c/dA_k = W[c, k] / (h*w) at every
    # position, and Grad-CAM = ReLU(sum_k W[c, k] / (h*w) * A_k), the CAM divided by h*w.
    model = make_model(mid=False)
    images, targets = make_batch()
    with torch.no_grad():
        activations = model.features(images).double().numpy()
    fc_weight = model.fc.weight.detach().double().numpy()
    _, channels, h, w = activations.shape
    expected_small = np.zeros((len(targets), h, w))
    for b, c in enumerate(targets.tolist()):
        for k in range(channels):
            expected_small[b] += fc_weight[c, k] / (h * w) * activations[b, k]
    expected = bilinear_numpy(np.maximum(expected_small, 0.0), (32, 32))
    assert (expected > 0).any()

    maps = build_method("gradcam", model, layer="features.3").explain(images, targets)
    np.testing.assert_allclose(maps.numpy(), expected, rtol=1e-4, atol=1e-7)


def test_equals_gradients_of_a_hand_split_model() -> None:
    model = make_model(mid=True)
    images, targets = make_batch()
    activations = model.features(images).detach().requires_grad_(True)
    logits = model.head(activations)
    (gradients,) = torch.autograd.grad(logits[torch.arange(3), targets].sum(), activations)
    acts = activations.detach().double().numpy()
    grads = gradients.double().numpy()
    expected_small = np.zeros((3, acts.shape[2], acts.shape[3]))
    for b in range(3):
        for k in range(acts.shape[1]):
            expected_small[b] += grads[b, k].mean() * acts[b, k]
    expected = bilinear_numpy(np.maximum(expected_small, 0.0), (32, 32))
    assert (expected > 0).any()

    maps = build_method("gradcam", model, layer="features.3").explain(images, targets)
    np.testing.assert_allclose(maps.numpy(), expected, rtol=1e-4, atol=1e-7)


def test_not_normalized_scales_with_the_logits() -> None:
    model = make_model(mid=False)
    scaled = copy.deepcopy(model)
    with torch.no_grad():
        scaled.fc.weight.mul_(3.0)
        scaled.fc.bias.mul_(3.0)
    images, targets = make_batch()
    maps = build_method("gradcam", model, layer="features.3").explain(images, targets)
    maps_scaled = build_method("gradcam", scaled, layer="features.3").explain(images, targets)
    torch.testing.assert_close(maps_scaled, 3.0 * maps, rtol=1e-5, atol=1e-7)
    assert maps.max() > 0


@pytest.mark.parametrize("layer", ["features.1", "features.3"])
def test_explain_on_full_and_reduced_resolution_layers(layer: str) -> None:
    images, targets = make_batch()
    maps = build_method("gradcam", make_model(mid=True), layer=layer).explain(images, targets)
    assert maps.shape == (3, 32, 32)
    assert (maps >= 0).all()
