"""What every shard of a run needs, loaded once per process: config, plan, model, device.

The config's ``compute`` section applies here: the model's forward runs under
:func:`torch.autocast` at ``precision`` (only the forward: sums, maps and metrics stay
float32/float64), ``channels_last`` puts the model and the loaded images in that memory
layout, and images are decoded by ``loader_workers`` processes ahead of their use
(:mod:`pipeline.stages.prefetch`: the shards given to :meth:`RunContext.schedule`), pinned
and copied to a CUDA device without blocking. ``batch_size: auto`` is chosen here, once per
input shape (:meth:`RunContext.auto_batch_size`).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..batch_size import choose_batch_size
from ..config import ExperimentConfig, load_config
from ..data import DataError, ImageRecord, loader_workers
from ..models import apply_compute, build_model, select_device
from ..planning import Plan, Shard, method_params
from ..run_dir import RunDir
from ..store import ShardOutput
from .prefetch import ImagePrefetcher, LoadedImages

__all__ = ["RunContext"]


@dataclasses.dataclass
class RunContext:
    """A run folder's config, plan and model, on one device."""

    run_dir: RunDir
    config: ExperimentConfig
    plan: Plan
    model: nn.Module
    device: torch.device
    prefetcher: ImagePrefetcher
    #: ``batch_size: auto`` choices of this process, by input shape and cap
    batch_choices: dict[tuple[tuple[int, ...], int], tuple[int, str]] = dataclasses.field(default_factory=dict)

    @classmethod
    def load(cls, run_dir: str | Path | RunDir, device: str | None = None) -> "RunContext":
        folder = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
        config = load_config(folder.config)
        chosen = select_device(device or config.device)
        model = apply_compute(build_model(config.model), config.compute, chosen)
        prefetcher = ImagePrefetcher(config.data, loader_workers(config.compute.loader_workers),
                                     pin=chosen.type == "cuda")
        return cls(folder, config, Plan.read(folder.plan), model, chosen, prefetcher)

    def records(self, shard: Shard) -> list[ImageRecord]:
        return list(self.plan.records[shard.images[0] : shard.images[1]])

    def schedule(self, shards: Sequence[Shard]) -> None:
        """Decode the images of ``shards`` ahead, in this order: the order they will be computed in (with
        the host constants of sampled methods' shards, see :mod:`pipeline.stages.prefetch`)."""
        methods = {}
        for shard in shards:
            if shard.stage == "explain" and shard.samples is not None:
                entry = self.config.method(shard.method)
                methods[shard.id] = (entry.name, method_params(self.config, entry))
        self.prefetcher.schedule([(shard.id, self.records(shard)) for shard in shards], methods=methods)

    def load_images(self, shard: Shard) -> LoadedImages:
        """The images of ``shard``'s chunk that load, on the device, with the failures (as
        :func:`~pipeline.data.load_batch`) and the host constants computed ahead (on the host)."""
        chunk = self.prefetcher.take(shard.id, self.records(shard))
        memory_format = torch.channels_last if self.config.compute.channels_last else torch.contiguous_format
        images = chunk.images.to(self.device, non_blocking=True, memory_format=memory_format)
        return dataclasses.replace(chunk, images=images)

    def auto_batch_size(self, images: Tensor, cap: int) -> tuple[int, str]:
        """The forward batch for ``batch_size: auto`` on ``images`` (at most ``cap``), and how it was chosen:
        searched once per input shape and cap in this process (:mod:`pipeline.batch_size`)."""
        key = (tuple(images.shape[1:]), cap)
        if key not in self.batch_choices:
            self.batch_choices[key] = choose_batch_size(self.model, images, cap)
        return self.batch_choices[key]

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """The model's logits on ``images``."""
        return self.model(images)

    def classify(self, loaded: list[ImageRecord], logits: Tensor | None) -> ShardOutput:
        """The image table of ``loaded`` from the model's ``logits`` on them (None when nothing loaded):
        labels, targets (the config's ``target`` rule), predicted classes and each target's softmax probability."""
        if not loaded or logits is None:
            empty = np.zeros(0, np.int64)
            return ShardOutput([], empty, empty, empty, np.zeros(0, np.float32))
        logits = logits.detach()
        predicted = logits.argmax(dim=1)  # as every method takes the predicted classes
        probs = torch.softmax(logits.float(), dim=1)
        labels = torch.tensor([r.label for r in loaded], device=self.device)
        targets = predicted if self.config.target == "predicted" else labels
        if int(targets.max()) >= probs.shape[1]:
            raise DataError(f"a label is outside the model's {probs.shape[1]} classes")
        target_prob = probs.gather(1, targets.view(-1, 1)).squeeze(1)
        return ShardOutput(
            keys=[r.key for r in loaded],
            labels=labels.cpu().numpy(),
            targets=targets.cpu().numpy(),
            predicted=predicted.cpu().numpy(),
            target_prob=target_prob.cpu().numpy(),
        )
