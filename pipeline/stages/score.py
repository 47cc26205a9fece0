"""The score stage: one method entry and layer on one image chunk, for one metric group.

It merges the chunk's explain shards (listed in the shard's ``after``), reloads the
images and scores the maps. Ground-truth metrics (PCC, SSIM, pointing game) are
computed for the images that have a ground-truth map; the others get NaN, and an
unusable ground-truth map (unreadable, NaN or constant) is named in the shard's
``reasons`` without failing the other images. Model metrics never need one.

A saliency map with NaN or inf values, or one value everywhere, is not scored: every
metric of that image is NaN (its curves too) with the reason in ``reasons``, and the
other images of the chunk are scored as usual.

``batch_size: auto`` of the metrics is resolved on the chunk's images (:mod:`pipeline.batch_size`)
and recorded in the shard's attributes (``batch_size``, ``batch_size_auto``).

A metric that runs the scored method again (the randomization test) gets it built as the
explain stage builds it: the entry's parameters and seed, and the shard's layer.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..batch_size import MAX_AUTO_BATCH, is_auto, with_batch_size
from ..config import ExperimentConfig, MetricConfig
from ..data import DataError, load_data_gt
from ..methods import build_method
from ..metrics import METRICS, MethodMaps, metric_spec
from ..planning import NO_LAYER, Shard, method_params
from ..store import ShardOutput
from .context import RunContext
from .merge import merge_chunk

__all__ = ["ScoreStage", "score_maps", "unusable_maps", "entry_method"]


class ScoreStage:
    """Computes score shards of one run."""

    def __init__(self, context: RunContext) -> None:
        self.context = context

    def compute(self, shard: Shard) -> ShardOutput:
        context = self.context
        explain = [context.plan.shard(i) for i in shard.after]
        merged = merge_chunk(context.run_dir, context.config, explain)
        output = merged.images
        if not output.keys:
            return output
        layer = shard.layers[0]
        chunk = context.load_images(shard)
        lost = [chunk.failures[key] for key in output.keys if key in chunk.failures]
        if lost:
            raise DataError(f"images that were explained can no longer be read: {'; '.join(lost)}")
        row_of = {record.key: row for row, record in enumerate(chunk.records)}
        loaded = [chunk.records[row_of[key]] for key in output.keys]
        images = chunk.images[torch.tensor([row_of[key] for key in output.keys], device=chunk.images.device)]
        metrics = [m for m in context.config.metrics if m.name in shard.metrics]
        if any(is_auto(m.params) for m in metrics):
            chosen, how = context.auto_batch_size(images, MAX_AUTO_BATCH)
            metrics = [m.model_copy(update={"params": with_batch_size(m.params, chosen)}) for m in metrics]
            output.attrs.update(batch_size=chosen, batch_size_auto=how)
        needs_gt = any(METRICS[m.name].needs_ground_truth for m in metrics)
        gt: list[Tensor | None] = []
        gt_reasons: list[str] = []
        for record in loaded:
            try:
                gt.append(load_data_gt(record.gt_path, context.config.data) if needs_gt and record.gt_path else None)
                gt_reasons.append("")
            except DataError as error:  # that image's ground-truth metrics are NaN; the others go on
                gt.append(None)
                gt_reasons.append(str(error))
        maps = merged.maps[layer]
        map_reasons = unusable_maps(maps)
        scored = [i for i, reason in enumerate(map_reasons) if not reason]
        output.reasons = {
            m.name: [map_reason or (gt_reason if METRICS[m.name].needs_ground_truth else "")
                     for map_reason, gt_reason in zip(map_reasons, gt_reasons)]
            for m in metrics
        }
        if not scored:  # every map is unusable: NaN values, no curves
            output.values = {m.name: np.full(len(loaded), np.nan) for m in metrics}
            return output
        rows = torch.tensor(scored, dtype=torch.long)
        method = entry_method(context.config, shard.method, layer,
                              lambda: context.auto_batch_size(images, MAX_AUTO_BATCH)[0])
        values, curves = score_maps(
            context.model,
            images[rows].to(context.device),
            torch.from_numpy(maps[scored]).to(context.device),
            torch.from_numpy(output.targets[scored]).to(context.device),
            [gt[i] for i in scored],
            metrics,
            method,
        )
        output.values = {name: _spread(array, scored, len(loaded)) for name, array in values.items()}
        output.curves = {name: _spread(array, scored, len(loaded)) for name, array in curves.items()}
        return output


def entry_method(config: ExperimentConfig, label: str, layer: str,
                 auto_batch: Callable[[], int] | None = None) -> MethodMaps:
    """``method(model, images, targets)``: the maps of method entry ``label`` (its parameters, the
    experiment's seed) on ``layer`` (:data:`~pipeline.planning.NO_LAYER` for a method without layers);
    ``auto_batch()`` gives the batch for ``batch_size: auto`` (required then)."""
    entry = config.method(label)
    params = method_params(config, entry)
    if layer != NO_LAYER:
        params["layer"] = [layer]

    def method(model: nn.Module, images: Tensor, targets: Tensor) -> Tensor:
        resolved = params
        if is_auto(params):
            if auto_batch is None:
                raise ValueError(f"method entry {label!r} has batch_size: auto and no batch was chosen")
            resolved = with_batch_size(params, auto_batch())
        return build_method(entry.name, model, **resolved).explain(images, targets)

    return method


def unusable_maps(maps: np.ndarray) -> list[str]:
    """Why each map of ``maps`` ``[n, H, W]`` cannot be scored (NaN or inf values, one value
    everywhere), empty for a usable one."""
    flat = maps.reshape(len(maps), -1)
    finite = np.isfinite(flat).all(axis=1)
    reasons = []
    for row, ok in zip(flat, finite):
        if not ok:
            reasons.append("saliency map has NaN or inf values")
        elif row.min() == row.max():
            reasons.append(f"saliency map is constant ({row[0]:g} everywhere)")
        else:
            reasons.append("")
    return reasons


def _spread(scored: np.ndarray, rows: list[int], n: int) -> np.ndarray:
    """``scored`` (one row per image of ``rows``) as ``n`` rows, NaN for the other images."""
    full = np.full((n, *scored.shape[1:]), np.nan, dtype=scored.dtype)
    full[rows] = scored
    return full


def score_maps(
    model: nn.Module,
    images: Tensor,
    maps: Tensor,
    targets: Tensor,
    gt: Sequence[Tensor | None],
    metrics: Sequence[MetricConfig],
    method: MethodMaps | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per-image values ``{metric: [n]}`` and curves ``{metric: [n, T]}`` for ``maps`` ``[n, H, W]``.

    Every metric is called as its specification says (:meth:`~pipeline.metrics.MetricSpec.call`;
    ``method`` made the maps, for a metric that runs it again);
    one that needs ground truth sees the images that have one, the others get NaN. Metrics of the
    same function and parameters (Average Drop and Increase) share one call.
    """
    n = maps.shape[0]
    values: dict[str, np.ndarray] = {}
    curves: dict[str, np.ndarray] = {}
    with_gt = [i for i, g in enumerate(gt) if g is not None]
    gt_stack = torch.stack([gt[i] for i in with_gt]).to(maps.device) if with_gt else None
    results: dict[tuple[object, str], object] = {}
    for metric in metrics:
        spec = metric_spec(metric.name)
        column = np.full(n, np.nan, dtype=np.float64)
        values[metric.name] = column
        if spec.needs_ground_truth and gt_stack is None:
            continue
        rows: slice | list[int] = with_gt if spec.needs_ground_truth else slice(None)
        key = (spec.function, repr(sorted(metric.params.items())))
        if key not in results:
            results[key] = spec.call(model, images[rows], maps[rows], targets[rows], gt_stack, metric.params, method)
        column[rows] = spec.values(results[key]).double().cpu().numpy()
        curve = spec.curves(results[key])
        if curve is not None:
            curves[metric.name] = np.full((n, curve.shape[1]), np.nan, dtype=np.float32)
            curves[metric.name][rows] = curve.float().cpu().numpy()
    return values, curves
