"""Scoring one chunk of maps with the metrics a config lists.

Ground-truth metrics (PCC, SSIM, pointing game) are computed for the images that
have a ground-truth map; the others get NaN. Model metrics never need one.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .config import MetricConfig
from .metrics import average_drop_increase, deletion, insertion, pcc, pointing_game, ssim

__all__ = ["score_maps"]


def _nan(n: int) -> np.ndarray:
    return np.full(n, np.nan, dtype=np.float64)


def score_maps(
    model: nn.Module,
    images: Tensor,
    maps: Tensor,
    targets: Tensor,
    gt: Sequence[Tensor | None],
    metrics: Sequence[MetricConfig],
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per-image values ``{metric: [n]}`` and curves ``{metric: [n, T]}`` for ``maps`` ``[n, H, W]``."""
    n = maps.shape[0]
    values: dict[str, np.ndarray] = {}
    curves: dict[str, np.ndarray] = {}
    with_gt = [i for i, g in enumerate(gt) if g is not None]
    gt_stack = torch.stack([gt[i] for i in with_gt]).to(maps.device) if with_gt else None
    drop_increase: dict[str, tuple[Tensor, Tensor]] = {}  # by parameters: drop and increase share one pass
    for metric in metrics:
        params = dict(metric.params)
        if metric.name in ("insertion", "deletion"):
            function = insertion if metric.name == "insertion" else deletion
            auc, curve = function(model, images, maps, targets, **params)
            values[metric.name] = auc.double().cpu().numpy()
            curves[metric.name] = curve.float().cpu().numpy()
        elif metric.name in ("average_drop", "average_increase"):
            key = repr(sorted(params.items()))
            if key not in drop_increase:
                drop_increase[key] = average_drop_increase(model, images, maps, targets, **params)
            drop, increase = drop_increase[key]
            chosen = drop if metric.name == "average_drop" else increase.double() * 100.0
            values[metric.name] = chosen.double().cpu().numpy()
        else:
            column = _nan(n)
            if gt_stack is not None:
                function = {"pcc": pcc, "ssim": ssim, "pointing_game": pointing_game}[metric.name]
                scores = function(maps[with_gt], gt_stack, **params)
                column[with_gt] = scores.double().cpu().numpy()
            values[metric.name] = column
    return values, curves
