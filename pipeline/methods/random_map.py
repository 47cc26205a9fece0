"""The ``random`` baseline: a seeded uniform-noise map, the chance level every method should beat."""
from __future__ import annotations

import hashlib
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from ..cost import Work
from .base import Explainer, Seed, check_targets
from ..parameters import validated

__all__ = ["RandomMap", "image_seed"]


def image_seed(image: Tensor, seed: int) -> int:
    """A 63-bit generator seed from ``seed`` and the bytes of ``image`` (as float32, C order), by BLAKE2b."""
    digest = hashlib.blake2b(image.detach().to("cpu", torch.float32).contiguous().numpy().tobytes(), digest_size=8)
    digest.update(seed.to_bytes(8, "little"))
    return int.from_bytes(digest.digest(), "little") >> 1


class RandomMap(Explainer):
    """Independent uniform values in [0, 1) at every pixel, one map per image.

    The map of an image is a pure function of ``seed`` and the image's content: a CPU
    :class:`torch.Generator` seeded with :func:`image_seed` draws ``torch.rand(H, W)``.
    So it is the same whichever shard, batch or position the image is in (the explain
    stage passes no image identity); identical images get identical maps. Model and
    targets are ignored. ``seed`` (the experiment's by default) is mixed into every image's generator seed.
    """

    name = "random"

    @validated
    def __init__(self, model: nn.Module, seed: Seed = 0) -> None:
        super().__init__(model)
        self.seed = seed

    @classmethod
    def cost(cls, params: Mapping[str, Any], size: tuple[int, int], channels: Mapping[str, int]) -> Work:
        """No forward: the model is not used."""
        return Work()

    def explain(self, images: Tensor, targets: Tensor) -> Tensor:
        check_targets(images, targets)
        height, width = images.shape[-2:]
        maps = [
            torch.rand(height, width, generator=torch.Generator().manual_seed(image_seed(image, self.seed)))
            for image in images
        ]
        return torch.stack(maps).to(images.device)
