"""Score-CAM against a loop that masks and scores one image and one channel at a time."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.methods import build_method
from tests.methods.helpers import TinyCamNet, make_tiny_cam_net, recorded_batch_sizes, seeded_batch, unit_mask


def make_batch() -> tuple[torch.Tensor, torch.Tensor]:
    return seeded_batch(5, [3, 3, 1])


def reference(model: TinyCamNet, images: torch.Tensor, targets: torch.Tensor, cut: int, weights: str) -> torch.Tensor:
    """Score-CAM written plainly: one masked image per forward, then the weighted sum at layer resolution."""
    with torch.no_grad():
        activations = model.features[:cut](images)
        baseline_logits = model(torch.zeros_like(images))
    maps = []
    for b in range(len(images)):
        c = int(targets[b])
        scores = {}
        for k in range(activations.shape[1]):
            mask = unit_mask(activations[b, k])
            if mask is None:
                continue
            with torch.no_grad():
                logits = model(images[b : b + 1] * mask)[0]
            if weights == "probability":
                scores[k] = math.exp(logits[c]) / sum(math.exp(v) for v in logits.tolist())
            else:
                scores[k] = float(logits[c] - baseline_logits[b, c])
        if weights == "cic-softmax":
            normalizer = sum(math.exp(s) for s in scores.values())
            scores = {k: math.exp(s) / normalizer for k, s in scores.items()}
        combined = torch.zeros(activations.shape[-2:])
        for k, weight in scores.items():
            combined += weight * activations[b, k]
        maps.append(torch.clamp(combined, min=0.0))
    small = torch.stack(maps)
    return F.interpolate(small[:, None], size=(32, 32), mode="bilinear", align_corners=False)[:, 0]


@pytest.mark.parametrize("weights", ["probability", "cic-softmax"])
@pytest.mark.parametrize(("layer", "cut"), [("features.3", 4), ("features.2", 3)])
def test_equals_one_channel_at_a_time_loop(weights: str, layer: str, cut: int) -> None:
    model = make_tiny_cam_net()
    images, targets = make_batch()
    expected = reference(model, images, targets, cut, weights)
    assert expected.abs().sum() > 0

    maps = build_method("scorecam", model, layer=layer, weights=weights, batch_size=5).explain(images, targets)
    torch.testing.assert_close(maps, expected, rtol=1e-4, atol=1e-5)


def test_weight_options_differ() -> None:
    model = make_tiny_cam_net()
    images, targets = make_batch()
    probability = build_method("scorecam", model, layer="features.3").explain(images, targets)
    cic = build_method("scorecam", model, layer="features.3", weights="cic-softmax").explain(images, targets)
    assert not torch.allclose(probability, cic)


@pytest.mark.parametrize(("weights", "extra"), [("probability", []), ("cic-softmax", [3])])
def test_constant_channels_are_not_forwarded_and_chunks_span_images(weights: str, extra: list[int]) -> None:
    model = make_tiny_cam_net(dead_channel=True)
    images, targets = make_batch()
    with recorded_batch_sizes(model) as batch_sizes:
        maps = build_method("scorecam", model, layer="features.3", weights=weights, batch_size=4).explain(
            images, targets
        )
    # one forward of the 3 images, 3 images x 5 varying channels = 15 masked inputs in
    # chunks of 4, and for "cic-softmax" one forward of the 3 zero baselines
    assert batch_sizes == [3, 4, 4, 4, 3] + extra
    torch.testing.assert_close(maps, reference(model, images, targets, 4, weights), rtol=1e-4, atol=1e-5)


def test_batch_size_does_not_change_the_result() -> None:
    model = make_tiny_cam_net()
    images, targets = make_batch()
    results = [
        build_method("scorecam", model, layer="features.3", batch_size=size).explain(images, targets)
        for size in (1, 7, 64)
    ]
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], rtol=1e-5, atol=1e-6)


def test_all_constant_channels_give_zero_maps() -> None:
    model = make_tiny_cam_net()
    with torch.no_grad():
        model.features[2].weight.zero_()
        model.features[2].bias.fill_(-1.0)
    images, targets = make_batch()
    for weights in ("probability", "cic-softmax"):
        maps = build_method("scorecam", model, layer="features.3", weights=weights).explain(images, targets)
        assert torch.equal(maps, torch.zeros(3, 32, 32))


def test_unknown_weights_lists_valid_ones() -> None:
    with pytest.raises(ValueError,  match="weights should be 'probability' or 'cic-softmax', got 'softmax'"):
        build_method("scorecam", make_tiny_cam_net(), layer="features.3", weights="softmax")


@pytest.mark.parametrize("batch_size", [0, -1, "8"])
def test_bad_batch_size(batch_size: object) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        build_method("scorecam", make_tiny_cam_net(), layer="features.3", batch_size=batch_size)
