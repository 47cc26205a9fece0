"""Abs-CAM Init against the plain formula, with gradients from the closed form of a
GAP + linear network and from a model split by hand at the layer."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.methods import build_method
from tests.methods.helpers import activations_and_gradients, make_tiny_cam_net, seeded_batch, weighted_channel_sum


def make_batch() -> tuple[torch.Tensor, torch.Tensor]:
    return seeded_batch(3, [4, 1, 1])


def expected_maps(acts: np.ndarray, weights: np.ndarray, relu: bool) -> np.ndarray:
    """Plain Abs-CAM Init: sum_k w[b, k] A[b, k], upsampled, optional ReLU, min-max per image."""
    combined = weighted_channel_sum(weights, acts)
    upsampled = F.interpolate(torch.from_numpy(combined)[:, None], size=(32, 32), mode="bilinear", align_corners=False)
    upsampled = upsampled[:, 0].numpy()
    if relu:
        upsampled = np.maximum(upsampled, 0.0)
    out = np.zeros_like(upsampled)
    for b in range(len(out)):
        low, high = upsampled[b].min(), upsampled[b].max()
        if high > low:
            out[b] = (upsampled[b] - low) / (high - low)
    return out


@pytest.mark.parametrize("relu", [False, True])
def test_equals_formula_with_closed_form_gradients(relu: bool) -> None:
    # GAP + linear head on "features.3": dlogit_c/dA_k = W[c, k] / (h*w) everywhere.
    model = make_tiny_cam_net(mid=False)
    images, targets = make_batch()
    with torch.no_grad():
        acts = model.features(images).double().numpy()
    fc_weight = model.fc.weight.detach().double().numpy()
    h, w = acts.shape[-2:]
    weights = np.abs(fc_weight[targets.numpy()]) / (h * w)
    expected = expected_maps(acts, weights, relu)

    maps = build_method("abscam-init", model, layer="features.3", relu=relu).explain(images, targets)
    np.testing.assert_allclose(maps.numpy(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("relu", [False, True])
def test_equals_formula_with_gradients_of_a_hand_split_model(relu: bool) -> None:
    # "features.2" is the pre-ReLU convolution: signed activations and spatially varying gradients.
    model = make_tiny_cam_net(mid=True)
    images, targets = make_batch()
    acts, grads = (t.double().numpy() for t in activations_and_gradients(model, images, targets, cut=3))
    weights = np.abs(grads).mean(axis=(2, 3))
    assert not np.allclose(weights, np.abs(grads.mean(axis=(2, 3))))
    expected = expected_maps(acts, weights, relu)

    maps = build_method("abscam-init", model, layer="features.2", relu=relu).explain(images, targets)
    np.testing.assert_allclose(maps.numpy(), expected, rtol=1e-4, atol=1e-5)
    assert maps.min() == 0 and torch.allclose(maps.flatten(1).amax(1), torch.ones(3))


def test_relu_option_changes_signed_maps() -> None:
    model = make_tiny_cam_net(mid=True)
    images, targets = make_batch()
    plain = build_method("abscam-init", model, layer="features.2").explain(images, targets)
    rectified = build_method("abscam-init", model, layer="features.2", relu=True).explain(images, targets)
    assert not torch.allclose(plain, rectified)


def test_relu_must_be_bool() -> None:
    with pytest.raises(ValueError, match="abscam-init: relu should be a valid boolean"):
        build_method("abscam-init", make_tiny_cam_net(mid=False), layer="features.3", relu="yes")
