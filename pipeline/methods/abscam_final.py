"""Abs-CAM, second phase ("Final"): absolute-gradient channel maps re-weighted by the
scores of the inputs they mask (Zeng et al., 2022)."""
from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Mapping

import torch
from torch import Tensor, nn

from .abscam_init import abs_gradient_weights
from ..cost import Work
from .base import BatchSize, CamExplainer, Layers, ReshapeRule
from ..parameters import Param, validated
from .scorecam import ScoreFunction, channel_mask_scores, target_logit, target_probability, varying_channels

__all__ = ["AbsCamFinal"]


def _abs_target_logit(logits: Tensor, targets: Tensor) -> Tensor:
    """The absolute value of each row's target logit."""
    return target_logit(logits, targets).abs()


class AbsCamFinal(CamExplainer):
    """Abs-CAM final map of the target class.

    With ``w_k = mean(|dy_c/dA_k|)`` over space (as in :class:`~pipeline.methods.abscam_init.AbsCamInit`), each
    channel map ``w_k A_k`` is upsampled bilinearly to the input size and min-max
    normalized to [0, 1], giving ``M_k`` (a constant channel gives a zero map and is
    not forwarded). ``s_k`` is the model's score for the target class on the input
    multiplied elementwise by ``M_k``, and ``map = ReLU(sum_k s_k M_k)`` at input
    resolution. Masked inputs go through the model ``batch_size`` at a time under
    ``torch.no_grad``.

    Parameters:
        layer: a module name or a list of them.
        score: ``"probability"`` (default), the softmax probability of the target class;
            or ``"abs_logit"``, the absolute value of its logit, which reproduces the
            users' notebook.
        batch_size: masked inputs per forward pass.
        reshape: how the layers' outputs become grids (:mod:`pipeline.methods.layers`).
    """

    name = "abscam-final"
    needs_gradients = True
    SCORES: ClassVar[dict[str, ScoreFunction]] = {"probability": target_probability, "abs_logit": _abs_target_logit}

    @validated
    def __init__(
        self,
        model: nn.Module,
        layer: Layers,
        score: Annotated[Literal["probability", "abs_logit"], Param("score of each masked image")] = "probability",
        batch_size: BatchSize = 64,
        reshape: ReshapeRule = "auto",
    ) -> None:
        super().__init__(model, layer, reshape)
        self.score = score
        self.batch_size = batch_size

    @classmethod
    def cost(cls, params: Mapping[str, Any], size: tuple[int, int], channels: Mapping[str, int]) -> Work:
        """One forward and one backward for all layers, then one forward per channel of each layer
        (at most: constant channels are skipped)."""
        return Work(1 + sum(channels.values()), 1)

    def layer_map(self, activations: Tensor, gradients: Tensor | None, images: Tensor, targets: Tensor) -> Tensor:
        assert gradients is not None
        channel_maps = abs_gradient_weights(gradients) * activations
        varying = varying_channels(channel_maps)
        total = torch.zeros(
            (images.shape[0], images.shape[-2], images.shape[-1]), dtype=torch.float32, device=images.device
        )
        for rows, _channels, masks, scores in channel_mask_scores(
            self.model, images, targets, channel_maps, varying, self.SCORES[self.score], self.batch_size
        ):
            total.index_add_(0, rows, scores[:, None, None] * masks)
        return torch.relu(total)
