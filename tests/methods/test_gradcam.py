"""Grad-CAM against the closed-form CAM of a GAP + linear network and against
gradients taken on a model split by hand at the layer."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from pipeline.methods import build_method
from tests.methods.helpers import (
    activations_and_gradients,
    bilinear_numpy,
    make_tiny_cam_net,
    seeded_batch,
    weighted_channel_sum,
)


def make_batch() -> tuple[torch.Tensor, torch.Tensor]:
    return seeded_batch(2, [0, 2, 4])


def plain_gradcam(weights: np.ndarray, acts: np.ndarray) -> np.ndarray:
    """ReLU of the channel sum weighted by ``[B, C]`` weights, upsampled to the 32x32 images."""
    return bilinear_numpy(np.maximum(weighted_channel_sum(weights, acts), 0.0), (32, 32))


def test_equals_closed_form_cam_of_gap_linear_network() -> None:
    # logit_c = sum_k W[c, k] * mean(A_k) + b_c, so dlogit_c/dA_k = W[c, k] / (h*w) at every
    # position, and Grad-CAM = ReLU(sum_k W[c, k] / (h*w) * A_k), the CAM divided by h*w.
    model = make_tiny_cam_net(mid=False)
    images, targets = make_batch()
    with torch.no_grad():
        activations = model.features(images).double().numpy()
    fc_weight = model.fc.weight.detach().double().numpy()
    h, w = activations.shape[-2:]
    expected = plain_gradcam(fc_weight[targets.numpy()] / (h * w), activations)
    assert (expected > 0).any()

    maps = build_method("gradcam", model, layer="features.3").explain(images, targets)
    np.testing.assert_allclose(maps.numpy(), expected, rtol=1e-4, atol=1e-7)


def test_equals_gradients_of_a_hand_split_model() -> None:
    model = make_tiny_cam_net(mid=True)
    images, targets = make_batch()
    activations, gradients = activations_and_gradients(model, images, targets, cut=4)
    expected = plain_gradcam(gradients.double().numpy().mean(axis=(2, 3)), activations.double().numpy())
    assert (expected > 0).any()

    maps = build_method("gradcam", model, layer="features.3").explain(images, targets)
    np.testing.assert_allclose(maps.numpy(), expected, rtol=1e-4, atol=1e-7)


def test_not_normalized_scales_with_the_logits() -> None:
    model = make_tiny_cam_net(mid=False)
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
    maps = build_method("gradcam", make_tiny_cam_net(mid=True), layer=layer).explain(images, targets)
    assert maps.shape == (3, 32, 32)
    assert (maps >= 0).all()
