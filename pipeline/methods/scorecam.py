"""Score-CAM: class activation maps weighted by the scores of channel-masked inputs
(Wang et al., CVPR Workshops 2020).

The channel-masking machinery here (:func:`channel_mask_scores`) is shared with
Abs-CAM's second phase (:mod:`pipeline.methods.abscam_final`).
"""
from __future__ import annotations

from typing import Annotated, Any, Callable, Iterator, Literal, Mapping

import torch
from torch import Tensor, nn

from ..cost import Work
from .base import BatchSize, CamExplainer, Layers, ReshapeRule, batched, minmax_normalize, upsample
from ..parameters import Param, validated

__all__ = [
    "ScoreCam",
    "ScoreFunction",
    "channel_mask_scores",
    "target_logit",
    "target_probability",
    "varying_channels",
]

#: ``(logits [N, classes], targets [N]) -> scores [N]``
ScoreFunction = Callable[[Tensor, Tensor], Tensor]


def target_logit(logits: Tensor, targets: Tensor) -> Tensor:
    """The logit of each row's target class."""
    return logits.gather(1, targets.view(-1, 1)).squeeze(1)


def target_probability(logits: Tensor, targets: Tensor) -> Tensor:
    """The softmax probability of each row's target class."""
    return target_logit(torch.softmax(logits.float(), dim=1), targets)


def varying_channels(maps: Tensor, eps: float = 1e-12) -> Tensor:
    """Boolean ``[B, C]``: which channels of ``maps`` ``[B, C, h, w]`` are not constant.

    Uses the same threshold as :func:`~pipeline.methods.base.minmax_normalize`, which
    turns a channel with ``max - min <= eps`` into zeros.
    """
    flat = maps.flatten(2)
    return (flat.amax(dim=-1) - flat.amin(dim=-1)) > eps


def channel_mask_scores(
    model: nn.Module,
    images: Tensor,
    targets: Tensor,
    channel_maps: Tensor,
    varying: Tensor,
    score: ScoreFunction,
    batch_size: int,
) -> Iterator[tuple[Tensor, Tensor, Tensor, Tensor]]:
    """Score the images masked by each of their channel maps, ``batch_size`` inputs per forward.

    For every pair ``(b, k)`` with ``varying[b, k]``, the mask is ``channel_maps[b, k]``
    upsampled bilinearly to the image size and min-max normalized to [0, 1]; the model
    sees ``images[b] * mask`` (under ``torch.no_grad``). Pairs of all images are
    packed together into chunks, and masks are built per chunk, so at most
    ``batch_size`` masked inputs exist at a time.

    Yields per chunk: image indices ``[n]``, channel indices ``[n]``, masks ``[n, H, W]``
    and ``score(logits, targets)`` ``[n]``.
    """
    size = (images.shape[-2], images.shape[-1])
    image_index, channel_index = varying.nonzero(as_tuple=True)
    for start, stop in batched(image_index.numel(), batch_size):
        rows = image_index[start:stop]
        channels = channel_index[start:stop]
        masks = minmax_normalize(upsample(channel_maps[rows, channels].float(), size))
        with torch.no_grad():
            logits = model(images[rows] * masks.unsqueeze(1).to(images.dtype))
        yield rows, channels, masks, score(logits, targets[rows]).float()


class ScoreCam(CamExplainer):
    """Score-CAM on one or several layers.

    Each channel ``A_k`` is upsampled bilinearly to the input size and min-max
    normalized to [0, 1]; the input multiplied by it is scored by the model, giving
    the channel weight ``w_k``; ``map = ReLU(sum_k w_k A_k)`` at the layer's
    resolution, then upsampled. Constant channels (no mask) get weight 0 and are not
    forwarded at all. The map is not normalized. (The authors' released code sums the
    upsampled channels, so its ReLU acts at input resolution, and it min-max normalizes
    the final map; normalize downstream where that is wanted.)

    Parameters:
        layer: a module name or a list of them.
        weights: how a masked input's score becomes ``w_k``:

            - ``"probability"`` (default): the softmax probability of the target class
              on the masked input, as in the authors' released code and the paper's
              Sec. 3.2 ("post-softmax" scores).
            - ``"cic-softmax"``: Algorithm 1 of the paper (CVPRW 2020, arXiv:1910.01279v2)
              taken literally. The channel-wise increase of confidence is
              ``S_k = f_c(X * M_k) - f_c(X_b)``, where ``f_c`` is the *logit* of class ``c``
              (Algorithm 1: "f^c as the logit of class c"; not a probability) and the
              baseline ``X_b`` is an all-zero input in the model's (normalized) input
              space, as in the paper's Sec. 4 ("X_b is set to 0"); then
              ``w_k = exp(S_k) / sum_j exp(S_j)``, a softmax over the image's non-constant
              channels (constant channels keep weight 0; if all are constant the map is 0).
        batch_size: masked inputs per forward pass.
        reshape: how the layers' outputs become grids (:mod:`pipeline.methods.layers`).
    """

    name = "scorecam"
    needs_gradients = False

    @validated
    def __init__(
        self,
        model: nn.Module,
        layer: Layers,
        weights: Annotated[Literal["probability", "cic-softmax"], Param("channel weights from the masked images' "
                                                                        "scores")] = "probability",
        batch_size: BatchSize = 64,
        reshape: ReshapeRule = "auto",
    ) -> None:
        super().__init__(model, layer, reshape)
        self.weights = weights
        self.batch_size = batch_size

    @classmethod
    def cost(cls, params: Mapping[str, Any], size: tuple[int, int], channels: Mapping[str, int]) -> Work:
        """One forward for all layers, then one per channel of each layer (at most: constant channels
        are skipped) and, with ``cic-softmax``, one of the zero baseline per layer."""
        baselines = len(channels) if params["weights"] == "cic-softmax" else 0
        return Work(1 + sum(channels.values()) + baselines)

    def layer_map(self, activations: Tensor, gradients: Tensor | None, images: Tensor, targets: Tensor) -> Tensor:
        varying = varying_channels(activations)
        score = target_probability if self.weights == "probability" else target_logit
        scores = torch.zeros(varying.shape, dtype=torch.float32, device=activations.device)
        for rows, channels, _masks, chunk_scores in channel_mask_scores(
            self.model, images, targets, activations, varying, score, self.batch_size
        ):
            scores[rows, channels] = chunk_scores
        if self.weights == "cic-softmax":
            with torch.no_grad():
                baseline = target_logit(self.model(torch.zeros_like(images)), targets).float()
            increase = (scores - baseline.unsqueeze(1)).masked_fill(~varying, float("-inf"))
            scores = torch.where(varying, torch.softmax(increase, dim=1), torch.zeros_like(scores))
        combined = (scores[:, :, None, None] * activations.float()).sum(dim=1)
        return torch.relu(combined)
