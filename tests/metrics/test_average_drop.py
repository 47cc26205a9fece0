"""Average Drop / Increase in Confidence with a model whose probabilities are known in closed form."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pipeline.metrics.average_drop import average_drop_increase, explanation_masks, summarize_drop_increase


def sigmoid(value: float) -> float:
    return 1.0 / (1.0 + math.exp(-value))


class SumModel(nn.Module):
    """Logits [sum(x), 0]: p(class 0) = sigmoid(sum(x)), p(class 1) = sigmoid(-sum(x))."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = self.scale * x.flatten(1).sum(dim=1)
        return torch.stack([total, torch.zeros_like(total)], dim=1)


def pixels(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(1, 1, 2, 2)


def test_drop_and_increase_by_hand() -> None:
    images = torch.cat([pixels(1, 1, 1, 1), pixels(-1, -1, -1, -1), pixels(1, 1, 1, -3)])
    maps = torch.tensor([[[0.0, 1], [1, 1]], [[2.0, 4], [4, 4]], [[5.0, 5], [5, 1]]])
    targets = torch.tensor([0, 1, 0])
    drop, increase = average_drop_increase(SumModel(), images, maps, targets)
    # scaled maps: [0,1,1,1], [0,1,1,1], [1,1,1,0]; masked sums 3, -3, 3
    y = [sigmoid(4), sigmoid(4), sigmoid(0)]
    o = [sigmoid(3), sigmoid(3), sigmoid(3)]
    expected_drop = [max(0.0, yi - oi) / yi * 100 for yi, oi in zip(y, o)]
    assert drop.tolist() == pytest.approx(expected_drop, abs=1e-4)
    assert increase.tolist() == [False, False, True]
    average_drop, increase_in_confidence = summarize_drop_increase(drop, increase)
    assert average_drop == pytest.approx(sum(expected_drop) / 3, abs=1e-4)
    assert increase_in_confidence == pytest.approx(100 / 3)


def test_top_percent_keeps_the_most_salient_pixels() -> None:
    model = SumModel()
    images = pixels(1, 1, 1, 1)
    # scaled [1, 1/3, 2/3, 0]; the top 50 % (2 pixels) are pixels 0 and 2: masked sum 5/3
    drop, _ = average_drop_increase(model, images, pixels(3, 1, 2, 0)[:, 0], torch.tensor([0]), top_percent=50)
    assert drop.item() == pytest.approx((sigmoid(4) - sigmoid(5 / 3)) / sigmoid(4) * 100, abs=1e-4)
    # ties: with [1, 1, 1, 0] the top 25 % (1 pixel) is the first, pixel 0
    masks = explanation_masks(pixels(1, 1, 1, 0)[:, 0], top_percent=25)
    assert masks.flatten().tolist() == [1.0, 0.0, 0.0, 0.0]
    # ceil(10 % of 4 pixels) = 1 pixel
    assert explanation_masks(pixels(0, 2, 1, 3)[:, 0], top_percent=10).flatten().tolist() == [0, 0, 0, 1.0]


def test_batches_and_mode() -> None:
    torch.manual_seed(0)
    model = SumModel().train()
    images = torch.randn(5, 1, 2, 2) * 0.3
    maps = torch.rand(5, 2, 2)
    targets = torch.tensor([0, 1, 0, 1, 1])
    seen: list[int] = []
    handle = model.register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0].shape[0]))
    try:
        small = average_drop_increase(model, images, maps, targets, batch_size=2)
    finally:
        handle.remove()
    assert max(seen) <= 2 and sum(seen) == 10
    large = average_drop_increase(model, images, maps, targets, batch_size=64)
    torch.testing.assert_close(small, large)
    assert model.training and model.scale.grad is None and not small[0].requires_grad
    for b in range(5):  # one image at a time, written plainly
        y = sigmoid(images[b].sum().item()) if targets[b] == 0 else sigmoid(-images[b].sum().item())
        low, high = maps[b].min(), maps[b].max()
        masked = (images[b, 0] * (maps[b] - low) / (high - low)).sum().item()
        o = sigmoid(masked) if targets[b] == 0 else sigmoid(-masked)
        assert small[0][b].item() == pytest.approx(max(0.0, y - o) / y * 100, abs=1e-4)
        assert bool(small[1][b]) == (o > y)


def test_bad_input_is_rejected() -> None:
    model = SumModel()
    images = pixels(1, 1, 1, 1)
    with pytest.raises(ValueError, match="top_percent"):
        average_drop_increase(model, images, torch.rand(1, 2, 2), torch.tensor([0]), top_percent=0)
    with pytest.raises(ValueError, match="maps"):
        average_drop_increase(model, images, torch.rand(1, 3, 3), torch.tensor([0]))
    with pytest.raises(ValueError, match="batch_size"):
        average_drop_increase(model, images, torch.rand(1, 2, 2), torch.tensor([0]), batch_size=0)
    with pytest.raises(ValueError, match="shape"):
        summarize_drop_increase(torch.zeros(2), torch.zeros(3, dtype=torch.bool))
