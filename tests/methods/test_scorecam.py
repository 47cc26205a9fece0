"""Score-CAM against a loop that masks and scores one image and one channel at a time."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.methods import build_method


class TinyNet(nn.Module):
    """conv-ReLU-conv(stride 2)-ReLU features, conv-ReLU, global average pooling, linear head.

    With ``dead_channel``, channel 0 of ``features.2`` is pushed far below zero, so
    channel 0 of ``features.3`` is constant (all zeros).
    """

    def __init__(self, dead_channel: bool) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU()
        )
        self.mid = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 5)
        if dead_channel:
            with torch.no_grad():
                self.features[2].weight[0] = 0.0
                self.features[2].bias[0] = -1e3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.mid(self.features(x))).flatten(1))


def make_model(dead_channel: bool = False) -> TinyNet:
    torch.manual_seed(0)
    return TinyNet(dead_channel).eval()


def make_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    return torch.randn(3, 3, 32, 32, generator=generator), torch.tensor([3, 3, 1])


def reference(model: TinyNet, images: torch.Tensor, targets: torch.Tensor, cut: int, weights: str) -> torch.Tensor:
    """Score-CAM written plainly: one masked image per forward, then the weighted sum at layer resolution."""
    with torch.no_grad():
        activations = model.features[:cut](images)
        baseline_logits = model(torch.zeros_like(images))
    maps = []
    for b in range(len(images)):
        c = int(targets[b])
        scores = {}
        for k in range(activations.shape[1]):
            mask = F.interpolate(activations[b, k][None, None], size=(32, 32), mode="bilinear", align_corners=False)
            mask = mask[0, 0]
            if mask.max() == mask.min():
                continue
            mask = (mask - mask.min()) / (mask.max() - mask.min())
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
    model = make_model()
    images, targets = make_batch()
    expected = reference(model, images, targets, cut, weights)
    assert expected.abs().sum() > 0

    maps = build_method("scorecam", model, layer=layer, weights=weights, batch_size=5).explain(images, targets)
    torch.testing.assert_close(maps, expected, rtol=1e-4, atol=1e-5)


def test_weight_options_differ() -> None:
    model = make_model()
    images, targets = make_batch()
    probability = build_method("scorecam", model, layer="features.3").explain(images, targets)
    cic = build_method("scorecam", model, layer="features.3", weights="cic-softmax").explain(images, targets)
    assert not torch.allclose(probability, cic)


@pytest.mark.parametrize(("weights", "extra"), [("probability", []), ("cic-softmax", [3])])
def test_constant_channels_are_not_forwarded_and_chunks_span_images(weights: str, extra: list[int]) -> None:
    model = make_model(dead_channel=True)
    images, targets = make_batch()
    batch_sizes: list[int] = []
    handle = model.register_forward_pre_hook(lambda _module, args: batch_sizes.append(args[0].shape[0]))
    try:
        maps = build_method("scorecam", model, layer="features.3", weights=weights, batch_size=4).explain(
            images, targets
        )
    finally:
        handle.remove()
    # one forward of the 3 images, 3 images x 5 varying channels = 15 masked inputs in
    # chunks of 4, and for "cic-softmax" one forward of the 3 zero baselines
    assert batch_sizes == [3, 4, 4, 4, 3] + extra
    torch.testing.assert_close(maps, reference(model, images, targets, 4, weights), rtol=1e-4, atol=1e-5)


def test_batch_size_does_not_change_the_result() -> None:
    model = make_model()
    images, targets = make_batch()
    results = [
        build_method("scorecam", model, layer="features.3", batch_size=size).explain(images, targets)
        for size in (1, 7, 64)
    ]
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], rtol=1e-5, atol=1e-6)


def test_all_constant_channels_give_zero_maps() -> None:
    model = make_model()
    with torch.no_grad():
        model.features[2].weight.zero_()
        model.features[2].bias.fill_(-1.0)
    images, targets = make_batch()
    for weights in ("probability", "cic-softmax"):
        maps = build_method("scorecam", model, layer="features.3", weights=weights).explain(images, targets)
        assert torch.equal(maps, torch.zeros(3, 32, 32))


def test_unknown_weights_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match="probability, cic-softmax"):
        build_method("scorecam", make_model(), layer="features.3", weights="softmax")


@pytest.mark.parametrize("batch_size", [0, -1, "8"])
def test_bad_batch_size(batch_size: object) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        build_method("scorecam", make_model(), layer="features.3", batch_size=batch_size)
