"""Merging the explain shards of one image chunk into saliency maps.

Direct methods (CAM, extremal) store maps; sampled methods (RISE, LIME) store
partial sums over a sample range. Partials are added in the order of their sample
ranges and then finalized, so the merged maps do not depend on how the sample range
was split. Merging needs only the method's parameters, never the model.

Sampled shards of one chunk computed on different devices or with different forward batches
(``batch_size: auto`` chooses per device) add up to the single run's sums only up to float
rounding: :attr:`ChunkMaps.computed_with` then names each way they were computed.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import torch

from ..config import ExperimentConfig
from ..methods import Partial, SampledExplainer, build_method
from ..batch_size import with_batch_size
from ..planning import Shard, method_params
from ..run_dir import RunDir
from ..store import ShardOutput, read_shard

__all__ = ["ChunkMaps", "merge_chunk", "merge_outputs", "MissingShardError"]


class MissingShardError(RuntimeError):
    """An explain shard needed for merging is not committed."""


@dataclasses.dataclass
class ChunkMaps:
    """The merged maps of one method entry on one image chunk."""

    images: ShardOutput  # keys, labels, targets, predicted, target_prob, failures (no arrays)
    maps: dict[str, np.ndarray]  # layer -> [n, H, W] float32
    #: for sampled shards computed in more than one way: each device and forward batch, else empty
    computed_with: list[str] = dataclasses.field(default_factory=list)


def _read(run_dir: RunDir, shard: Shard) -> ShardOutput:
    path = run_dir.shard(shard.id)
    if not path.is_file():
        raise MissingShardError(f"shard {shard.describe()} is not committed ({path} is missing)")
    return read_shard(path)


def merge_chunk(run_dir: RunDir, config: ExperimentConfig, shards: Sequence[Shard]) -> ChunkMaps:
    """Merged maps of the explain ``shards`` (one method entry, one image chunk)."""
    ordered = sorted(shards, key=lambda s: s.samples or (0, 0))
    return merge_outputs(config, ordered, [_read(run_dir, s) for s in ordered])


def merge_outputs(config: ExperimentConfig, shards: Sequence[Shard], outputs: Sequence[ShardOutput]) -> ChunkMaps:
    """Merged maps of the explain ``shards`` whose files hold ``outputs``, in sample order."""
    first = outputs[0]
    for shard, output in zip(shards[1:], outputs[1:]):
        if output.keys != first.keys or not np.array_equal(output.targets, first.targets):
            raise ValueError(f"shard {shard.describe()} disagrees with {shards[0].id} on its images or targets")
    images = dataclasses.replace(first, maps={}, sums={}, constants={}, values={}, curves={})
    if first.maps or not first.sums:
        return ChunkMaps(images, {layer: m.astype(np.float32) for layer, m in first.maps.items()})
    entry = config.method(shards[0].method)
    explainer = build_method(entry.name, None, **with_batch_size(method_params(config, entry), 1))
    assert isinstance(explainer, SampledExplainer)
    partials = [
        Partial({k: torch.from_numpy(v) for k, v in o.sums.items()},
                {k: torch.from_numpy(v) for k, v in o.constants.items()})
        for o in outputs
    ]
    merged = explainer.merge(partials) if len(partials) > 1 else partials[0]
    if first.keys:
        maps = explainer.finalize(merged).float().numpy()
    else:
        maps = np.zeros((0, *config.data.image_size), np.float32)
    ways = sorted({_computed_with(o) for o in outputs})
    return ChunkMaps(images, {shards[0].layers[0]: maps}, ways if len(ways) > 1 else [])


def _computed_with(output: ShardOutput) -> str:
    """The device and forward batch a sampled shard was computed with (the configured batch when not recorded)."""
    batch = output.attrs.get("batch_size")
    return f"{output.attrs.get('device', 'unknown device')}" + ("" if batch is None else f" batch {batch}")
