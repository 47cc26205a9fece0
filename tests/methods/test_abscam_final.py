"""Abs-CAM Final against a loop that masks and scores one image and one channel at a time."""
from __future__ import annotations

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
    generator = torch.Generator().manual_seed(4)
    return torch.randn(3, 3, 32, 32, generator=generator), torch.tensor([2, 0, 2])


def reference(model: TinyNet, images: torch.Tensor, targets: torch.Tensor, cut: int, score: str) -> torch.Tensor:
    """Abs-CAM Final written plainly: one masked image per forward."""
    activations = model.features[:cut](images).detach().requires_grad_(True)
    logits = model.fc(model.pool(model.mid(model.features[cut:](activations))).flatten(1))
    (gradients,) = torch.autograd.grad(logits[torch.arange(len(targets)), targets].sum(), activations)
    maps = []
    for b in range(len(images)):
        c = int(targets[b])
        total = torch.zeros(32, 32)
        for k in range(activations.shape[1]):
            weight = gradients[b, k].abs().mean()
            channel = (weight * activations[b, k]).detach()
            mask = F.interpolate(channel[None, None], size=(32, 32), mode="bilinear", align_corners=False)[0, 0]
            if mask.max() == mask.min():
                continue
            mask = (mask - mask.min()) / (mask.max() - mask.min())
            with torch.no_grad():
                masked_logits = model(images[b : b + 1] * mask)[0]
            if score == "probability":
                s = torch.exp(masked_logits[c]) / torch.exp(masked_logits).sum()
            else:
                s = masked_logits[c].abs()
            total += s * mask
        maps.append(torch.clamp(total, min=0.0))
    return torch.stack(maps)


@pytest.mark.parametrize("score", ["probability", "abs_logit"])
@pytest.mark.parametrize(("layer", "cut"), [("features.3", 4), ("features.2", 3)])
def test_equals_one_channel_at_a_time_loop(score: str, layer: str, cut: int) -> None:
    model = make_model()
    images, targets = make_batch()
    expected = reference(model, images, targets, cut, score)
    assert expected.abs().sum() > 0

    maps = build_method("abscam-final", model, layer=layer, score=score, batch_size=5).explain(images, targets)
    torch.testing.assert_close(maps, expected, rtol=1e-4, atol=1e-5)


def test_score_options_differ() -> None:
    model = make_model()
    images, targets = make_batch()
    probability = build_method("abscam-final", model, layer="features.3").explain(images, targets)
    abs_logit = build_method("abscam-final", model, layer="features.3", score="abs_logit").explain(images, targets)
    assert not torch.allclose(probability, abs_logit)


def test_constant_channels_are_skipped_and_chunks_span_images() -> None:
    model = make_model(dead_channel=True)
    images, targets = make_batch()
    batch_sizes: list[int] = []
    handle = model.register_forward_pre_hook(lambda _module, args: batch_sizes.append(args[0].shape[0]))
    try:
        maps = build_method("abscam-final", model, layer="features.3", batch_size=4).explain(images, targets)
    finally:
        handle.remove()
    # one forward of the 3 images, then 3 images x 5 varying channels = 15 masked inputs in chunks of 4
    assert batch_sizes == [3, 4, 4, 4, 3]
    torch.testing.assert_close(maps, reference(model, images, targets, 4, "probability"), rtol=1e-4, atol=1e-5)


def test_batch_size_does_not_change_the_result() -> None:
    model = make_model()
    images, targets = make_batch()
    results = [
        build_method("abscam-final", model, layer="features.3", batch_size=size).explain(images, targets)
        for size in (1, 7, 64)
    ]
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], rtol=1e-5, atol=1e-6)


def test_unknown_score_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match="probability, abs_logit"):
        build_method("abscam-final", make_model(), layer="features.3", score="logit")


@pytest.mark.parametrize("batch_size", [0, 2.5])
def test_bad_batch_size(batch_size: object) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        build_method("abscam-final", make_model(), layer="features.3", batch_size=batch_size)
