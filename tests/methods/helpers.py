"""Shared pieces of the method tests: the tiny CAM network, seeded batches and plain
reference computations (bilinear upsampling, weighted channel sums, gradients at a
hand-split layer, masks, the counter-based draws one at a time), and a recorder of forward batch sizes."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "IMAGE_SIZE",
    "TinyCamNet",
    "activations_and_gradients",
    "bilinear_numpy",
    "make_tiny_cam_net",
    "philox_uniform",
    "recorded_batch_sizes",
    "seeded_batch",
    "unit_mask",
    "weighted_channel_sum",
]

IMAGE_SIZE = 32
"""Height and width of the images of :func:`seeded_batch` and of the masks of :func:`unit_mask`."""


class TinyCamNet(nn.Module):
    """conv-ReLU-conv(stride 2)-ReLU features, conv-ReLU (or nothing), global average pooling, linear head.

    With ``mid=False`` the middle block is an identity, so the head is GAP + linear right after
    ``features.3``. With ``dead_channel``, channel 0 of ``features.2`` is pushed far below zero, so
    channel 0 of ``features.3`` is constant (all zeros).
    """

    def __init__(self, mid: bool = True, dead_channel: bool = False) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU()
        )
        self.mid = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.ReLU()) if mid else nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 5)
        if dead_channel:
            with torch.no_grad():
                self.features[2].weight[0] = 0.0
                self.features[2].bias[0] = -1e3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.mid(self.features(x))).flatten(1))


def make_tiny_cam_net(mid: bool = True, dead_channel: bool = False) -> TinyCamNet:
    """A :class:`TinyCamNet` with the weights of seed 0, in eval mode."""
    torch.manual_seed(0)
    return TinyCamNet(mid, dead_channel).eval()


def seeded_batch(seed: int, targets: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Standard-normal ``[len(targets), 3, 32, 32]`` images drawn from a generator of ``seed``, and the targets."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(len(targets), 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator), torch.tensor(targets)


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


def weighted_channel_sum(weights: np.ndarray, acts: np.ndarray) -> np.ndarray:
    """``sum_k weights[b, k] * acts[b, k]`` for ``[B, C]`` weights and ``[B, C, h, w]`` activations,
    one channel at a time."""
    combined = np.zeros((acts.shape[0], acts.shape[2], acts.shape[3]))
    for b in range(acts.shape[0]):
        for k in range(acts.shape[1]):
            combined[b] += weights[b, k] * acts[b, k]
    return combined


def activations_and_gradients(
    model: TinyCamNet, images: torch.Tensor, targets: torch.Tensor, cut: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations after ``model.features[:cut]`` and the gradients of the target logits w.r.t. them,
    from the model split by hand at that point (both detached)."""
    activations = model.features[:cut](images).detach().requires_grad_(True)
    logits = model.fc(model.pool(model.mid(model.features[cut:](activations))).flatten(1))
    (gradients,) = torch.autograd.grad(logits[torch.arange(len(targets)), targets].sum(), activations)
    return activations.detach(), gradients


def unit_mask(channel: torch.Tensor) -> torch.Tensor | None:
    """One ``[h, w]`` channel upsampled bilinearly to the 32x32 images and min-max scaled to [0, 1];
    ``None`` when the upsampled channel is constant."""
    size = (IMAGE_SIZE, IMAGE_SIZE)
    mask = F.interpolate(channel[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    if mask.max() == mask.min():
        return None
    return (mask - mask.min()) / (mask.max() - mask.min())


@contextmanager
def recorded_batch_sizes(model: nn.Module) -> Iterator[list[int]]:
    """Within the block, the batch size of every forward of ``model`` is appended to the yielded list."""
    batch_sizes: list[int] = []
    handle = model.register_forward_pre_hook(lambda _module, args: batch_sizes.append(args[0].shape[0]))
    try:
        yield batch_sizes
    finally:
        handle.remove()


def _philox4x32_10(counter: Sequence[int], key: Sequence[int]) -> list[int]:
    """One Philox4x32-10 block in plain Python integers (Random123's recipe)."""
    x0, x1, x2, x3 = counter
    k0, k1 = key
    for round_index in range(10):
        if round_index:
            k0, k1 = (k0 + 0x9E3779B9) & 0xFFFFFFFF, (k1 + 0xBB67AE85) & 0xFFFFFFFF
        p0, p1 = 0xD2511F53 * x0, 0xCD9E8D57 * x2
        x0, x1, x2, x3 = (p1 >> 32) ^ x1 ^ k0, p1 & 0xFFFFFFFF, (p0 >> 32) ^ x3 ^ k1, p0 & 0xFFFFFFFF
    return [x0, x1, x2, x3]


def philox_uniform(seed: int, sample: int, draw: int) -> float:
    """Draw ``draw`` of sample ``sample`` under ``seed``, computed alone from its definition."""
    words = _philox4x32_10(
        [draw // 2, sample & 0xFFFFFFFF, sample >> 32, 0], [seed & 0xFFFFFFFF, seed >> 32]
    )
    high, low = words[2 * (draw % 2)], words[2 * (draw % 2) + 1]
    return ((((high << 32) | low) >> 12) + 0.5) * 2.0**-52
