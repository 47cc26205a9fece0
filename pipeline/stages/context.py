"""What every shard of a run needs, loaded once per process: config, plan, model, device."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..config import ExperimentConfig, load_config
from ..data import DataError, ImageRecord, load_batch
from ..models import build_model, select_device
from ..planning import Plan, Shard
from ..run_dir import RunDir
from ..store import ShardOutput

__all__ = ["RunContext", "ChunkImages"]


@dataclasses.dataclass
class ChunkImages:
    """The images of a shard's chunk that loaded, on the device, with the targets to explain."""

    images: Tensor
    output: ShardOutput  # keys, labels, targets, predicted, target_prob, failures


@dataclasses.dataclass
class RunContext:
    """A run folder's config, plan and model, on one device."""

    run_dir: RunDir
    config: ExperimentConfig
    plan: Plan
    model: nn.Module
    device: torch.device

    @classmethod
    def load(cls, run_dir: str | Path | RunDir, device: str | None = None) -> "RunContext":
        folder = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
        config = load_config(folder.config)
        chosen = select_device(device or config.device)
        return cls(folder, config, Plan.read(folder.plan), build_model(config.model).to(chosen), chosen)

    def records(self, shard: Shard) -> list[ImageRecord]:
        return list(self.plan.records[shard.images[0] : shard.images[1]])

    def load_chunk(self, records: list[ImageRecord]) -> ChunkImages:
        """Load ``records`` and classify them: targets follow the config's ``target`` rule."""
        loaded, images, failures = load_batch(records, self.config.data)
        images = images.to(self.device)
        output = self._targets(loaded, images)
        output.failures = failures
        return ChunkImages(images, output)

    @torch.no_grad()
    def _targets(self, loaded: list[ImageRecord], images: Tensor) -> ShardOutput:
        if not loaded:
            empty = np.zeros(0, np.int64)
            return ShardOutput([], empty, empty, empty, np.zeros(0, np.float32))
        probs = torch.softmax(self.model(images).float(), dim=1)
        predicted = probs.argmax(dim=1)
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
