"""Abs-CAM Final against a loop that masks and scores one image and one channel at a time."""
from __future__ import annotations

import pytest
import torch

from pipeline.methods import build_method
from tests.methods.helpers import (
    TinyCamNet,
    activations_and_gradients,
    make_tiny_cam_net,
    recorded_batch_sizes,
    seeded_batch,
    unit_mask,
)


def make_batch() -> tuple[torch.Tensor, torch.Tensor]:
    return seeded_batch(4, [2, 0, 2])


def reference(model: TinyCamNet, images: torch.Tensor, targets: torch.Tensor, cut: int, score: str) -> torch.Tensor:
    """Abs-CAM Final written plainly: one masked image per forward."""
    activations, gradients = activations_and_gradients(model, images, targets, cut)
    maps = []
    for b in range(len(images)):
        c = int(targets[b])
        total = torch.zeros(32, 32)
        for k in range(activations.shape[1]):
            weight = gradients[b, k].abs().mean()
            mask = unit_mask(weight * activations[b, k])
            if mask is None:
                continue
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
    model = make_tiny_cam_net()
    images, targets = make_batch()
    expected = reference(model, images, targets, cut, score)
    assert expected.abs().sum() > 0

    maps = build_method("abscam-final", model, layer=layer, score=score, batch_size=5).explain(images, targets)
    torch.testing.assert_close(maps, expected, rtol=1e-4, atol=1e-5)


def test_score_options_differ() -> None:
    model = make_tiny_cam_net()
    images, targets = make_batch()
    probability = build_method("abscam-final", model, layer="features.3").explain(images, targets)
    abs_logit = build_method("abscam-final", model, layer="features.3", score="abs_logit").explain(images, targets)
    assert not torch.allclose(probability, abs_logit)


def test_constant_channels_are_skipped_and_chunks_span_images() -> None:
    model = make_tiny_cam_net(dead_channel=True)
    images, targets = make_batch()
    with recorded_batch_sizes(model) as batch_sizes:
        maps = build_method("abscam-final", model, layer="features.3", batch_size=4).explain(images, targets)
    # one forward of the 3 images, then 3 images x 5 varying channels = 15 masked inputs in chunks of 4
    assert batch_sizes == [3, 4, 4, 4, 3]
    torch.testing.assert_close(maps, reference(model, images, targets, 4, "probability"), rtol=1e-4, atol=1e-5)


def test_batch_size_does_not_change_the_result() -> None:
    model = make_tiny_cam_net()
    images, targets = make_batch()
    results = [
        build_method("abscam-final", model, layer="features.3", batch_size=size).explain(images, targets)
        for size in (1, 7, 64)
    ]
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], rtol=1e-5, atol=1e-6)


def test_unknown_score_lists_valid_ones() -> None:
    with pytest.raises(ValueError,  match="score should be 'probability' or 'abs_logit', got 'logit'"):
        build_method("abscam-final", make_tiny_cam_net(), layer="features.3", score="logit")


@pytest.mark.parametrize("batch_size", [0, 2.5])
def test_bad_batch_size(batch_size: object) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        build_method("abscam-final", make_tiny_cam_net(), layer="features.3", batch_size=batch_size)
