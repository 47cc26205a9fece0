"""FEM, the Feature Explanation Method (Ayyar, Benois-Pineau, Zemmari; after Fuad et al., IPTA 2020)."""
from __future__ import annotations

from typing import Annotated

import torch
from torch import Tensor, nn

from ..parameters import Param, validated
from .base import CamExplainer, Layers, ReshapeRule

__all__ = ["Fem"]


class Fem(CamExplainer):
    """FEM map of one or several layers; gradient-free.

    For each channel ``A_k``, ``mu_k`` and ``sigma_k`` are its spatial mean and
    *population* standard deviation (divisor ``h*w``, NumPy's default ``ddof=0``).
    The binary map ``B_k = [A_k >= mu_k + k * sigma_k]`` keeps the channel's unusually
    strong responses; ``map = sum_k mu_k B_k``, divided by its maximum and upsampled
    bilinearly to the input size. A map whose maximum is not positive (zero, or only
    possible with negative activations) is left unscaled, so a zero map stays zero.

    FEM is class-agnostic: ``targets`` are ignored and every class gets the same map.
    The paper's ``k`` is 2.
    """

    name = "fem"
    needs_gradients = False

    @validated
    def __init__(
        self,
        model: nn.Module,
        layer: Layers,
        k: Annotated[float, Param("activations kept above the channel mean plus k standard deviations",
                                  unit="standard deviations")] = 2.0,
        reshape: ReshapeRule = "auto",
    ) -> None:
        super().__init__(model, layer, reshape)
        self.k = k

    def layer_map(self, activations: Tensor, gradients: Tensor | None, images: Tensor, targets: Tensor) -> Tensor:
        acts = activations.float()
        mean = acts.mean(dim=(2, 3), keepdim=True)
        std = acts.std(dim=(2, 3), keepdim=True, correction=0)
        binary = acts >= mean + self.k * std
        maps = (mean * binary).sum(dim=1)
        peak = maps.flatten(1).amax(dim=1).view(-1, 1, 1)
        return torch.where(peak > 0, maps / peak.clamp_min(torch.finfo(maps.dtype).tiny), maps)
