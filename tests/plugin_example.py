"""Plug-ins as a user's package would write them: a CAM method, a sampled method and two metrics."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from pipeline.methods import CamExplainer, Partial, SampledExplainer
from pipeline.methods.base import from_fixed, to_fixed
from pipeline.metrics import MetricSpec, register_metric

__all__ = ["AbsGradCam", "Occlusion", "sparsity", "gt_mass", "TOP_MASS"]


class AbsGradCam(CamExplainer):
    """``sum_k |mean(dy/dA_k)| A_k``, found by ``tests.plugin_example:AbsGradCam``."""

    name = "abs-gradcam"

    def layer_map(self, activations: Tensor, gradients: Tensor | None, images: Tensor, targets: Tensor) -> Tensor:
        assert gradients is not None
        return (gradients.mean(dim=(2, 3), keepdim=True).abs() * activations).sum(dim=1)


class Occlusion(SampledExplainer):
    """Sample ``i`` zeroes row ``i % H`` of a square image; the map is the target probability lost there."""

    name = "row-occlusion"

    def __init__(self, model: nn.Module | None, n_samples: int = 8, seed: int = 0, batch_size: int = 4) -> None:
        super().__init__(model, n_samples, seed, batch_size)

    def empty_sums(self, images: Tensor, constants: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"drop": torch.zeros(images.shape[0], images.shape[-2], dtype=torch.int64, device=images.device)}

    def group_sums(
        self, images: Tensor, targets: Tensor, start: int, stop: int, constants: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        rows = torch.arange(start, stop, device=images.device) % images.shape[-2]
        perturbed = images.unsqueeze(1).repeat(1, stop - start, 1, 1, 1)
        perturbed[:, torch.arange(stop - start), :, rows, :] = 0
        lost = 1 - self.target_probabilities(perturbed, targets).double()
        drop = torch.zeros(images.shape[0], images.shape[-2], dtype=torch.float64, device=images.device)
        drop.index_add_(1, rows, lost.clamp(0, 1))
        return {"drop": to_fixed(drop)}

    def finalize(self, partial: Partial) -> Tensor:
        rows = from_fixed(partial.sums["drop"]).float()
        return rows.unsqueeze(-1).expand(-1, -1, rows.shape[1]).contiguous()


@register_metric("sparsity", title="Sparsity", higher_is_better=True)
def sparsity(maps: Tensor, *, quantile: float = 0.9) -> Tensor:
    """The share of pixels below the map's ``quantile`` times its maximum."""
    peak = maps.flatten(1).amax(dim=1).clamp_min(1e-12)
    return (maps.flatten(1) < quantile * peak[:, None]).double().mean(dim=1)


def gt_mass(
    model: nn.Module, images: Tensor, maps: Tensor, targets: Tensor, gt: Tensor, *, top: float = 0.5
) -> tuple[Tensor, Tensor]:
    """Share of the ground truth under the map's top pixels, and the cumulative curve over 4 thresholds."""
    order = maps.flatten(1).argsort(dim=1, descending=True)
    weights = gt.flatten(1).gather(1, order) / gt.flatten(1).sum(dim=1, keepdim=True).clamp_min(1e-12)
    cumulative = weights.cumsum(dim=1)
    steps = [max(1, int(f * order.shape[1])) - 1 for f in (0.25, 0.5, 0.75, 1.0)]
    return cumulative[:, max(1, int(top * order.shape[1])) - 1], cumulative[:, steps]


TOP_MASS = MetricSpec("top_mass", "Top mass", gt_mass, "groundtruth", True, True, True, ("top",), 0, None, curve=1)
