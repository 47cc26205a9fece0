"""FEM against a NumPy implementation of the formula."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.methods import build_method
from tests.methods.helpers import bilinear_numpy, make_tiny_cam_net, seeded_batch


def make_batch() -> tuple[torch.Tensor, torch.Tensor]:
    return seeded_batch(6, [0, 1, 2])


def fem_numpy(acts: np.ndarray, k: float) -> np.ndarray:
    """FEM of ``[B, C, h, w]`` activations, channel by channel, with the population std."""
    out = np.zeros((acts.shape[0], acts.shape[2], acts.shape[3]))
    for b in range(acts.shape[0]):
        for channel in acts[b]:
            mean, std = channel.mean(), channel.std(ddof=0)
            out[b] += mean * (channel >= mean + k * std)
        if out[b].max() > 0:
            out[b] /= out[b].max()
    return out


@pytest.mark.parametrize("k", [2.0, 1.0, 0.5])
@pytest.mark.parametrize(("layer", "cut"), [("features.1", 2), ("features.2", 3), ("features.3", 4)])
def test_equals_numpy_formula(k: float, layer: str, cut: int) -> None:
    model = make_tiny_cam_net()
    images, targets = make_batch()
    with torch.no_grad():
        acts = model.features[:cut](images).double().numpy()
    expected = bilinear_numpy(fem_numpy(acts, k), (32, 32))
    assert (expected > 0).any()

    maps = build_method("fem", model, layer=layer, k=k).explain(images, targets)
    np.testing.assert_allclose(maps.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_threshold_uses_population_std() -> None:
    # One channel [0, 0, 0, 4] (2x2): mean 1, population std sqrt(3) ~ 1.73, sample std 2.
    # With k = 1.6 the threshold is 3.77 (population, 4 kept) or 4.2 (sample, nothing kept).
    model = nn.Sequential(nn.Conv2d(1, 1, 1, bias=False), nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    image = torch.tensor([[[[0.0, 0.0], [0.0, 4.0]]]])
    maps = build_method("fem", model, layer="0", k=1.6).explain(image, torch.tensor([0]))
    torch.testing.assert_close(maps, torch.tensor([[[0.0, 0.0], [0.0, 1.0]]]))


def test_class_agnostic() -> None:
    model = make_tiny_cam_net()
    images, _ = make_batch()
    method = build_method("fem", model, layer="features.3")
    first = method.explain(images, torch.tensor([0, 1, 2]))
    assert torch.equal(first, method.explain(images, torch.tensor([4, 4, 3])))


def test_maximum_is_one_and_zero_map_stays_zero() -> None:
    model = make_tiny_cam_net()
    images, targets = make_batch()
    maps = build_method("fem", model, layer="features.1").explain(images, targets)
    torch.testing.assert_close(maps.flatten(1).amax(1), torch.ones(3))

    with torch.no_grad():
        model.features[2].weight.zero_()
        model.features[2].bias.fill_(-1.0)
    maps = build_method("fem", model, layer="features.3").explain(images, targets)
    assert torch.equal(maps, torch.zeros(3, 32, 32))


def test_k_must_be_a_number() -> None:
    with pytest.raises(ValueError, match="fem: k should be a valid number"):
        build_method("fem", make_tiny_cam_net(), layer="features.3", k="2")
