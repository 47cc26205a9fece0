"""The shard worker: computes one shard on whatever device is there and commits it.

:class:`ShardRunner` loads the run (config, plan, model) once per process and runs
shards by id. A sampled shard (RISE, LIME) walks its sample range in fixed steps and
keeps its running sums in memory; every ``checkpoint_every`` seconds, and whenever
:meth:`ShardRunner.save_progress` is called (e.g. on a scheduler's timeout signal),
they are saved to ``<id>.partial.h5``. A later attempt continues from there; since
the steps are fixed, the final shard is identical to an uninterrupted run.
"""
from __future__ import annotations

import contextlib
import dataclasses
import socket
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

from .config import ExperimentConfig, load_config
from .data import DataError, ImageRecord, load_batch, load_gt
from .merge import merge_chunk
from .metrics import METRICS
from .methods import CamExplainer, Partial, SampledExplainer, build_method
from .models import build_model, select_device
from .planning import NO_LAYER, PLAN_FILE, Plan, Shard, method_params
from .store import (
    ShardOutput,
    checkpoint_path,
    clear_error,
    committed_ids,
    library_versions,
    read_shard,
    shard_path,
    write_error,
    write_shard,
)

__all__ = ["ShardRunner", "ShardError", "run_shards", "CONFIG_FILE"]

CONFIG_FILE = "config.yaml"


class ShardError(RuntimeError):
    """A shard failed; ``kind`` is ``data`` for bad input (not worth retrying) or ``error``."""

    def __init__(self, message: str, kind: str = "error") -> None:
        super().__init__(message)
        self.kind = kind


class ShardRunner:
    """Runs the shards of one run folder in this process."""

    def __init__(self, run_dir: Path, *, checkpoint_every: float = 300.0, device: str | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.config: ExperimentConfig = load_config(self.run_dir / CONFIG_FILE)
        self.plan = Plan.read(self.run_dir / PLAN_FILE)
        self.device = select_device(device or self.config.device)
        self.model = build_model(self.config.model).to(self.device)
        self.checkpoint_every = checkpoint_every
        self._progress: tuple[Shard, ShardOutput, Partial, int] | None = None

    # ----------------------------------------------------------------- running
    def run(self, shard_id: str, *, force: bool = False) -> Path:
        """Compute and commit one shard (skipped when already committed, unless ``force``)."""
        shard = self.plan.shard(shard_id)
        path = shard_path(self.run_dir, shard.id)
        if path.is_file() and not force:
            return path
        started = time.perf_counter()
        try:
            output = self._explain(shard) if shard.stage == "explain" else self._score(shard)
            output.attrs.update(
                shard_id=shard.id,
                stage=shard.stage,
                method=shard.method,
                config_hash=self.plan.config_hash,
                model_digest=self.plan.model_digest,
                versions=library_versions(),
                device=str(self.device),
                host=socket.gethostname(),
                wall_time_s=time.perf_counter() - started,
                created=time.time(),
            )
            write_shard(path, output)
        except DataError as error:
            write_error(self.run_dir, shard.id, str(error), kind="data")
            raise ShardError(f"shard {shard.describe()}: {error}", kind="data") from error
        except Exception as error:
            write_error(self.run_dir, shard.id, f"{type(error).__name__}: {error}", kind="error")
            raise
        finally:
            self._progress = None
        checkpoint_path(self.run_dir, shard.id).unlink(missing_ok=True)
        clear_error(self.run_dir, shard.id)
        return path

    def save_progress(self) -> None:
        """Save the running sums of the sampled shard in progress, if any."""
        if self._progress is None:
            return
        shard, output, total, next_sample = self._progress
        saved = _with_partial(output, total)
        saved.attrs["next_sample"] = next_sample
        write_shard(checkpoint_path(self.run_dir, shard.id), saved)

    # ----------------------------------------------------------------- helpers
    def _records(self, shard: Shard) -> list[ImageRecord]:
        return list(self.plan.records[shard.images[0] : shard.images[1]])

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

    # ----------------------------------------------------------------- explain
    def _explain(self, shard: Shard) -> ShardOutput:
        loaded, images, failures = load_batch(self._records(shard), self.config.data)
        images = images.to(self.device)
        output = self._targets(loaded, images)
        output.failures = failures
        if not loaded:  # every image failed: commit the failures, the other shards go on
            return output
        targets = torch.from_numpy(output.targets).to(self.device)
        entry = self.config.method(shard.method)
        params = method_params(self.config, entry)
        if entry.layers:
            params["layer"] = list(entry.layers)
        explainer = build_method(entry.name, self.model, **params)
        if isinstance(explainer, SampledExplainer):
            assert shard.samples is not None
            return self._accumulate(shard, explainer, images, targets, output)
        elif isinstance(explainer, CamExplainer):
            maps = explainer.explain_layers(images, targets)
            output.maps = {layer: m.float().cpu().numpy() for layer, m in maps.items()}
        else:
            output.maps = {NO_LAYER: explainer.explain(images, targets).float().cpu().numpy()}
        return output

    def _accumulate(
        self, shard: Shard, explainer: SampledExplainer, images: Tensor, targets: Tensor, output: ShardOutput
    ) -> ShardOutput:
        start, stop = shard.samples  # type: ignore[misc]
        total, position = self._resume(shard, output)
        step = max(explainer.batch_size, 1) * 4
        last_save = time.monotonic()
        for lo in range(position if total is not None else start, stop, step):
            hi = min(lo + step, stop)
            part = explainer.accumulate(images, targets, lo, hi)
            total = part if total is None else explainer.merge([total, part])
            self._progress = (shard, output, total, hi)
            if time.monotonic() - last_save > self.checkpoint_every and hi < stop:
                self.save_progress()
                last_save = time.monotonic()
        assert total is not None
        return _with_partial(output, total)

    def _resume(self, shard: Shard, output: ShardOutput) -> tuple[Partial | None, int]:
        path = checkpoint_path(self.run_dir, shard.id)
        if not path.is_file():
            return None, shard.samples[0]  # type: ignore[index]
        saved = read_shard(path)
        if saved.keys != output.keys:
            path.unlink()
            return None, shard.samples[0]  # type: ignore[index]
        partial = Partial(
            {k: torch.from_numpy(v).to(self.device) for k, v in saved.sums.items()},
            {k: torch.from_numpy(v).to(self.device) for k, v in saved.constants.items()},
        )
        return partial, int(saved.attrs["next_sample"])

    # ------------------------------------------------------------------- score
    def _score(self, shard: Shard) -> ShardOutput:
        from .scoring import score_maps

        explain = [self.plan.shard(i) for i in shard.after]
        merged = merge_chunk(self.run_dir, self.config, explain, self.model)
        output = merged.images
        if not output.keys:
            return output
        layer = shard.layers[0]
        keys = set(output.keys)
        records = [r for r in self._records(shard) if r.key in keys]
        loaded, images, failures = load_batch(records, self.config.data)
        if failures:
            raise DataError(f"images that were explained can no longer be read: {'; '.join(failures.values())}")
        metrics = [m for m in self.config.metrics if m.name in shard.metrics]
        needs_gt = any(METRICS[m.name].needs_ground_truth for m in metrics)
        size = self.config.data.image_size
        gt = [load_gt(r.gt_path, size) if needs_gt and r.gt_path else None for r in loaded]
        maps = torch.from_numpy(merged.maps[layer]).to(self.device)
        targets = torch.from_numpy(output.targets).to(self.device)
        values, curves = score_maps(self.model, images.to(self.device), maps, targets, gt, metrics)
        output.values = values
        output.curves = curves
        return output


def _with_partial(output: ShardOutput, partial: Partial) -> ShardOutput:
    """A copy of ``output`` holding ``partial`` as NumPy arrays (one device-to-host copy)."""
    return dataclasses.replace(
        output,
        sums={k: v.cpu().numpy() for k, v in partial.sums.items()},
        constants={k: v.cpu().numpy() for k, v in partial.constants.items()},
        attrs=dict(output.attrs),
    )


@contextlib.contextmanager
def _progress_bar(total: int, enabled: bool | None) -> Iterator[object]:
    """A tqdm bar; ``enabled=None`` shows it only on a terminal."""
    from tqdm.auto import tqdm

    with tqdm(total=total, disable=None if enabled is None else not enabled, unit="shard", dynamic_ncols=True) as bar:
        yield bar


def run_shards(
    run_dir: Path, shard_ids: list[str], *, progress: bool | None = None, force: bool = False
) -> dict[str, str]:
    """Run shards in this process, in order; returns ``{shard id: error}`` for those that failed.

    Committed shards are skipped (unless ``force``). A failing shard is recorded and the
    others go on; a score shard whose explain shards failed is skipped with that reason.
    """
    runner = ShardRunner(run_dir)
    done = committed_ids(run_dir)
    failed: dict[str, str] = {}
    with _progress_bar(len(shard_ids), progress) as bar:
        for shard_id in shard_ids:
            shard = runner.plan.shard(shard_id)
            blocked = [i for i in shard.after if i in failed]
            if blocked:
                failed[shard_id] = f"skipped: it needs failed shard(s) {', '.join(blocked)}"
            elif force or shard_id not in done:
                try:
                    runner.run(shard_id, force=force)
                except Exception as error:  # every failure is recorded; the other shards go on
                    failed[shard_id] = str(error)
            bar.update(1)  # type: ignore[attr-defined]
    return failed

