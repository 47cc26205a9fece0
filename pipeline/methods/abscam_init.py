"""Abs-CAM, first phase ("Init"): CAM weighted by absolute gradients (Zeng et al., 2022)."""
from __future__ import annotations

from typing import Annotated

from torch import Tensor, nn

from ..parameters import Param, validated
from .base import CamExplainer, Layers, ReshapeRule, minmax_normalize, upsample

__all__ = ["AbsCamInit", "abs_gradient_weights"]


def abs_gradient_weights(gradients: Tensor) -> Tensor:
    """Channel weights ``[B, C, 1, 1]``: the spatial mean of ``|dy_c/dA_k|``."""
    return gradients.abs().mean(dim=(2, 3), keepdim=True)


class AbsCamInit(CamExplainer):
    """Abs-CAM initial map of the target-class logit.

    ``w_k = mean(|dy_c/dA_k|)`` over space, ``map = sum_k w_k A_k``, upsampled
    bilinearly to the input size and min-max normalized to [0, 1] per image
    (a constant map becomes zeros).

    Parameters:
        layer: a module name or a list of them.
        relu: apply a ReLU to the upsampled map before normalizing. Off by default,
            as in the users' implementation; the combination can be negative, so
            without it the normalization maps the most negative value to 0.
        reshape: how the layers' outputs become grids (:mod:`pipeline.methods.layers`).
    """

    name = "abscam-init"
    needs_gradients = True

    @validated
    def __init__(
        self,
        model: nn.Module,
        layer: Layers,
        relu: Annotated[bool, Param("clamp the map at zero before min-max normalizing")] = False,
        reshape: ReshapeRule = "auto",
    ) -> None:
        super().__init__(model, layer, reshape)
        self.relu = relu

    def layer_map(self, activations: Tensor, gradients: Tensor | None, images: Tensor, targets: Tensor) -> Tensor:
        assert gradients is not None
        combined = (abs_gradient_weights(gradients) * activations).sum(dim=1).float()
        maps = upsample(combined, (images.shape[-2], images.shape[-1]))
        if self.relu:
            maps = maps.clamp_min(0)
        return minmax_normalize(maps)
