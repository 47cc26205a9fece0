"""The explain stage: one method entry on one image chunk (a sample range for sampled methods).

Direct methods (CAM, extremal) store maps. The shard's targets follow the config's ``target``
rule; the predicted classes come from one forward of the chunk, or, for a CAM method under
``target: predicted``, from the forward of its own pass
(:meth:`~pipeline.methods.CamExplainer.explain_pass`): the same classes, one forward fewer.

A sampled method (RISE, LIME) walks its sample range and keeps its running sums; they
are saved to the shard's checkpoint every ``checkpoint_every`` seconds and whenever
:meth:`ExplainStage.save_progress` is called (e.g. on a scheduler's signal). A later
attempt continues from there and ends identical to an uninterrupted run. A checkpoint
that is corrupt, or whose ``next_sample`` disagrees with the sample count of its sums,
is moved to ``shards/corrupt/`` and the shard starts afresh.

``batch_size: auto`` is resolved on the chunk's images (:mod:`pipeline.batch_size`) and the
batch used recorded in the shard's attributes (``batch_size``, ``batch_size_auto``).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor

from ..batch_size import MAX_AUTO_BATCH, is_auto, sampled_batch_size, with_batch_size
from ..methods import CamExplainer, Partial, SampledExplainer, build_method, method_class
from ..planning import NO_LAYER, Shard, method_params
from ..store import CorruptShardError, ShardOutput, read_shard, write_shard
from .context import RunContext

__all__ = ["ExplainStage"]

logger = logging.getLogger(__name__)


class ExplainStage:
    """Computes explain shards of one run."""

    def __init__(self, context: RunContext, *, checkpoint_every: float = 300.0) -> None:
        self.context = context
        self.checkpoint_every = checkpoint_every
        #: the sampled shard in progress: (shard, its image table, running total, next sample)
        self._progress: tuple[Shard, ShardOutput, Partial, int] | None = None

    def compute(self, shard: Shard) -> ShardOutput:
        context = self.context
        entry = context.config.method(shard.method)
        chunk = context.load_images(shard)
        loaded, images = chunk.records, chunk.images
        if not loaded:  # every image failed: commit the failures, the other shards go on
            output = context.classify(loaded, None)
            output.failures = chunk.failures
            return output
        params = method_params(context.config, entry)
        attrs: dict[str, Any] = {}
        if is_auto(params):
            params, attrs = self._auto_batch(entry.name, params, images)
        if entry.layers:
            params["layer"] = list(entry.layers)
        explainer = build_method(entry.name, context.model, **params)
        one_pass = (context.config.target == "predicted" and isinstance(explainer, CamExplainer)
                    and explainer.classifies)
        result = explainer.explain_pass(images) if one_pass else None  # its forward gives the predicted classes
        output = context.classify(loaded, context.forward(images) if result is None else result.logits)
        output.failures, output.attrs = chunk.failures, attrs
        targets = torch.from_numpy(output.targets).to(context.device)
        if isinstance(explainer, SampledExplainer):
            constants = explainer.prepare(images, chunk.host) if chunk.host else None
            try:
                return self._accumulate(shard, explainer, images, targets, output, constants)
            except KeyboardInterrupt:  # Ctrl-C, or SIGTERM through the command: keep the samples done
                self.save_progress()
                raise
            finally:
                self._progress = None
        if result is not None:
            maps = result.maps
        elif isinstance(explainer, CamExplainer):
            maps = explainer.explain_layers(images, targets)
        else:
            maps = {NO_LAYER: explainer.explain(images, targets)}
        output.maps = {layer: m.float().cpu().numpy() for layer, m in maps.items()}
        return output

    def _auto_batch(self, name: str, params: dict[str, Any], images: Tensor) -> tuple[dict[str, Any], dict[str, Any]]:
        """``params`` with ``batch_size: auto`` resolved for ``images``, and the shard attributes that record it
        (sampled methods: a whole number of images times a divisor of ``samples_per_shard`` samples)."""
        if issubclass(method_class(name), SampledExplainer):
            unit = self.context.config.sharding.samples_per_shard  # the same for every shard of the chunk
            chosen, how = self.context.auto_batch_size(images, len(images) * unit)
            chosen = sampled_batch_size(chosen, len(images), unit)
            how += f"; {chosen // min(len(images), chosen)} samples per forward, a divisor of {unit}"
        else:
            chosen, how = self.context.auto_batch_size(images, MAX_AUTO_BATCH)
        return with_batch_size(params, chosen), {"batch_size": chosen, "batch_size_auto": how}

    def save_progress(self) -> None:
        """Save the running sums of the sampled shard in progress, if any, from its last whole step."""
        progress = self._progress
        if progress is None:
            return
        shard, output, total, next_sample = progress
        saved = with_partial(output, total)
        saved.attrs["next_sample"] = next_sample
        write_shard(self.context.run_dir.checkpoint(shard.id), saved)

    def _accumulate(
        self, shard: Shard, explainer: SampledExplainer, images: Tensor, targets: Tensor, output: ShardOutput,
        constants: dict[str, Tensor] | None,
    ) -> ShardOutput:
        start, stop = shard.samples  # type: ignore[misc]
        steps = self._steps(shard, explainer, images, targets, output, constants)
        last_save = time.monotonic()
        total: Partial | None = None
        for total, position in steps:
            self._progress = (shard, output, total, position)
            if time.monotonic() - last_save > self.checkpoint_every and position < stop:
                self.save_progress()
                last_save = time.monotonic()
        assert total is not None
        return with_partial(output, total)

    def _steps(
        self, shard: Shard, explainer: SampledExplainer, images: Tensor, targets: Tensor, output: ShardOutput,
        constants: dict[str, Tensor] | None,
    ) -> Iterator[tuple[Partial, int]]:
        """The method's steps over the shard's samples (with ``constants`` from :meth:`~SampledExplainer.prepare`
        when given), continuing from the shard's checkpoint when it holds progress on the same images
        (another checkpoint is removed)."""
        start, stop = shard.samples  # type: ignore[misc]
        path = self.context.run_dir.checkpoint(shard.id)
        if path.is_file():
            try:
                saved = read_progress(path, start)
            except CorruptShardError as error:
                target = self.context.run_dir.quarantine(path, error.reason)
                logger.warning("corrupt checkpoint moved to %s, the shard starts afresh: %s", target, error.reason)
                return explainer.steps(images, targets, start, stop, constants=constants)
            if saved.keys == output.keys:
                device = self.context.device
                partial = Partial(
                    {k: torch.from_numpy(v).to(device) for k, v in saved.sums.items()},
                    {k: torch.from_numpy(v).to(device) for k, v in saved.constants.items()},
                )
                try:
                    return explainer.steps(images, targets, start, stop, resume=partial,
                                           position=int(saved.attrs["next_sample"]), constants=constants)
                except ValueError:  # progress of another method, layout or version: start afresh
                    pass
            path.unlink()
        return explainer.steps(images, targets, start, stop, constants=constants)


def read_progress(path: Path, start: int) -> ShardOutput:
    """A checkpoint whose ``next_sample`` agrees with its sums (their ``count`` of samples, when they
    keep one); raises :class:`CorruptShardError` naming the file otherwise."""
    saved = read_shard(path)
    next_sample = saved.attrs.get("next_sample")
    if not isinstance(next_sample, int):
        raise CorruptShardError(path, f"its next_sample is {next_sample!r}, not a sample index")
    count = saved.sums.get("count")
    if count is not None and (count != next_sample - start).any():
        raise CorruptShardError(path, f"its next_sample {next_sample} disagrees with the sample count of its sums")
    return saved


def with_partial(output: ShardOutput, partial: Partial) -> ShardOutput:
    """A copy of ``output`` holding ``partial`` as NumPy arrays (one device-to-host copy)."""
    return dataclasses.replace(
        output,
        sums={k: v.cpu().numpy() for k, v in partial.sums.items()},
        constants={k: v.cpu().numpy() for k, v in partial.constants.items()},
        attrs=dict(output.attrs),
    )
