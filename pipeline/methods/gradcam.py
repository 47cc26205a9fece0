"""Grad-CAM: gradient-weighted class activation maps (Selvaraju et al., ICCV 2017)."""
from __future__ import annotations

import torch
from torch import Tensor

from .base import CamExplainer

__all__ = ["GradCam"]


class GradCam(CamExplainer):
    """Grad-CAM of the target-class logit on one or several layers.

    Channel ``k`` is weighted by the spatial mean of the gradient of the target
    logit ``y_c`` with respect to the activation map ``A_k``:
    ``map = ReLU(sum_k mean(dy_c/dA_k) * A_k)``, upsampled bilinearly to the input
    size. The map is not normalized.
    """

    name = "gradcam"
    needs_gradients = True

    def layer_map(self, activations: Tensor, gradients: Tensor | None, images: Tensor, targets: Tensor) -> Tensor:
        assert gradients is not None
        weights = gradients.mean(dim=(2, 3), keepdim=True)
        return torch.relu((weights * activations).sum(dim=1))
