"""The ``centre`` baseline: a centred Gaussian blob, the centre-bias baseline of saliency benchmarks.

Fixation benchmarks (Judd, Durand and Torralba, *A Benchmark of Computational Models of
Saliency to Predict Human Fixations*, MIT-CSAIL-TR-2012-001, the MIT300 "center"
baseline; Kümmerer, Wallis and Bethge, PNAS 2015, the Tuebingen centre-bias model)
score every model against a map that ignores the image and only favours its centre.
"""
from __future__ import annotations

from typing import Annotated, Any, Mapping

import torch
from torch import Tensor, nn

from ..cost import Work
from .base import Explainer, check_targets
from ..parameters import Param, validated

__all__ = ["CentreBias", "DEFAULT_CENTRE_SIGMA"]

DEFAULT_CENTRE_SIGMA = 0.25
"""The blob's standard deviation as a fraction of the image's height (rows) and width (columns):
a choice of this package (the benchmarks fit theirs to fixation data), broad enough to reach the
image's corners with exp(-4), about 2 %, of the centre's value."""


class CentreBias(Explainer):
    """``exp(-((y - cy)^2 / (2 (sigma H)^2) + (x - cx)^2 / (2 (sigma W)^2)))`` for every image.

    ``(cy, cx) = ((H - 1) / 2, (W - 1) / 2)`` is the image centre in pixel indices, so the
    blob is stretched to the image's aspect ratio as the MIT300 centre baseline is; its
    peak is 1. The same map for every image: model, images' content and targets are
    ignored. ``sigma`` is a fraction of each side (default :data:`DEFAULT_CENTRE_SIGMA`).
    """

    name = "centre"

    @validated
    def __init__(
        self,
        model: nn.Module,
        sigma: Annotated[float, Param("standard deviation of the blob", unit="fraction of each side",
                                      gt=0)] = DEFAULT_CENTRE_SIGMA,
    ) -> None:
        super().__init__(model)
        self.sigma = sigma

    @classmethod
    def cost(cls, params: Mapping[str, Any], size: tuple[int, int], channels: Mapping[str, int]) -> Work:
        """No forward: the model is not used."""
        return Work()

    def explain(self, images: Tensor, targets: Tensor) -> Tensor:
        check_targets(images, targets)
        height, width = images.shape[-2:]
        rows = torch.arange(height, dtype=torch.float64, device=images.device)
        cols = torch.arange(width, dtype=torch.float64, device=images.device)
        dy = (rows - (height - 1) / 2) / (self.sigma * height)
        dx = (cols - (width - 1) / 2) / (self.sigma * width)
        blob = torch.exp(-0.5 * (dy[:, None] ** 2 + dx[None, :] ** 2)).float()
        return blob.expand(images.shape[0], height, width).clone()
