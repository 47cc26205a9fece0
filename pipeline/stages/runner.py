"""The shard runner: computes shards of one run folder in this process and commits them.

:class:`ShardRunner` loads the run (config, plan, model) once per process and runs
shards by id: the explain stage (:mod:`pipeline.stages.explain`) or the score stage
(:mod:`pipeline.stages.score`) computes the shard's output and :func:`commit_shard`
writes it, the one way a shard is committed. A failure is recorded beside the shard
(``kind`` ``data`` for bad input, not worth retrying; ``error`` otherwise).

A committed shard that turns out corrupt (see :mod:`pipeline.integrity`) is moved to
``shards/corrupt/`` and computed again, with the score shards that read it.

:func:`run_shards` shows a progress bar named after the stage and method of the shard in
progress (``explain rise``, ``score rise: insertion, deletion``). It counts model forwards
(images through the model) against those the plan's cost estimate (``cost.json``, see
:mod:`pipeline.cost`) gives the queued shards, so its rate and remaining time follow the
work, not the number of shards; without an estimate it counts shards.
"""
from __future__ import annotations

import contextlib
import logging
import socket
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

from torch import nn

from ..cost import read_estimate, shard_work
from ..data import DataError
from ..integrity import find_corrupt, quarantine_shards
from ..planning import Plan, Shard
from ..run_dir import RunDir
from ..store import CorruptShardError, ShardOutput, library_versions, verify_shard, write_shard
from .context import RunContext
from .explain import ExplainStage
from .score import ScoreStage

__all__ = ["ShardRunner", "ShardError", "run_shards", "commit_shard", "planned_forwards"]

logger = logging.getLogger(__name__)


class ShardError(RuntimeError):
    """A shard failed; ``kind`` is ``data`` for bad input (not worth retrying) or ``error``."""

    def __init__(self, message: str, kind: str = "error") -> None:
        super().__init__(message)
        self.kind = kind


def commit_shard(context: RunContext, shard: Shard, output: ShardOutput, *, wall_time_s: float) -> Path:
    """Write ``output`` as shard ``shard``'s committed file, with its provenance; drop its checkpoint and error."""
    output.attrs.update(
        shard_id=shard.id,
        stage=shard.stage,
        method=shard.method,
        config_hash=context.plan.config_hash,
        model_digest=context.plan.model_digest,
        versions=library_versions(),
        device=str(context.device),
        host=socket.gethostname(),
        wall_time_s=wall_time_s,
        created=time.time(),
    )
    path = context.run_dir.shard(shard.id)
    write_shard(path, output)
    context.run_dir.checkpoint(shard.id).unlink(missing_ok=True)
    context.run_dir.clear_error(shard.id)
    return path


class ShardRunner:
    """Runs the shards of one run folder in this process."""

    def __init__(self, run_dir: str | Path | RunDir, *, checkpoint_every: float = 300.0,
                 device: str | None = None) -> None:
        self.context = RunContext.load(run_dir, device)
        self.explain = ExplainStage(self.context, checkpoint_every=checkpoint_every)
        self.score = ScoreStage(self.context)
        #: shards whose committed file was found corrupt or read one, removed to be computed again
        self.invalidated: set[str] = set()

    @property
    def run_dir(self) -> RunDir:
        return self.context.run_dir

    @property
    def plan(self) -> Plan:
        return self.context.plan

    def schedule(self, shard_ids: Sequence[str]) -> None:
        """Decode the images of ``shard_ids`` ahead, in the order they will be run (see
        :mod:`pipeline.stages.prefetch`); running other shards, or these in another order, stays correct."""
        self.context.schedule([self.plan.shard(i) for i in shard_ids])

    def close(self) -> None:
        """Stop the image loader's worker processes."""
        self.context.prefetcher.close()

    def committed(self, shard_id: str) -> bool:
        """True when shard ``shard_id`` is committed and its file whole (cheap check); a corrupt
        file is moved to ``shards/corrupt/``, with the score shards that read it, and False returned."""
        path = self.run_dir.shard(shard_id)
        if not path.is_file():
            return False
        reason = verify_shard(path, deep=False)
        if reason is None:
            return True
        self.invalidated.update(quarantine_shards(self.run_dir, self.plan, {shard_id: reason}))
        return False

    def run(self, shard_id: str, *, force: bool = False) -> Path:
        """Compute and commit one shard (skipped when committed and whole, unless ``force``)."""
        shard = self.plan.shard(shard_id)
        path = self.run_dir.shard(shard.id)
        if not force and self.committed(shard.id):
            return path
        started = time.perf_counter()
        try:
            output = self._compute(shard)
            return commit_shard(self.context, shard, output, wall_time_s=time.perf_counter() - started)
        except DataError as error:
            self._record(shard.id, str(error), kind="data")
            raise ShardError(f"shard {shard.describe()}: {error}", kind="data") from error
        except Exception as error:
            self._record(shard.id, f"{type(error).__name__}: {error}", kind="error")
            raise

    def _record(self, shard_id: str, message: str, *, kind: str) -> None:
        """Record a shard's failure; when even that fails (a full disk), say so and go on."""
        try:
            self.run_dir.record_error(shard_id, message, kind=kind)
        except OSError as error:
            logger.warning("cannot record the failure of shard %s (%s): %s", shard_id, error, message)

    def _compute(self, shard: Shard) -> ShardOutput:
        """The shard's output; an explain shard a score shard reads that turns out corrupt is
        quarantined and computed again first."""
        if shard.stage == "explain":
            return self.explain.compute(shard)
        for _ in shard.after:
            try:
                return self.score.compute(shard)
            except CorruptShardError as error:
                culprit = next((i for i in shard.after if self.run_dir.shard(i) == error.path), None)
                if culprit is None:
                    raise
                self.invalidated.update(quarantine_shards(self.run_dir, self.plan, {culprit: error.reason}))
                self.run(culprit)
        return self.score.compute(shard)

    def save_progress(self) -> None:
        """Save the running sums of the sampled shard in progress, if any (safe from a signal handler)."""
        self.explain.save_progress()


def planned_forwards(folder: RunDir, plan: Plan) -> dict[str, int] | None:
    """The forwards the cost estimate plans for every shard of ``plan``; ``None`` without an estimate
    of this config."""
    estimate = read_estimate(folder.cost, plan.config_hash)
    if estimate is None:
        return None
    return {shard_id: sum(work.forwards for work in lines.values())
            for shard_id, lines in shard_work(plan, estimate.units).items()}


def _stage_label(shard: Shard) -> str:
    """``explain METHOD`` or ``score METHOD: METRICS``."""
    if shard.stage == "explain":
        return f"explain {shard.method}"
    return f"score {shard.method}: {', '.join(shard.metrics)}"


class _Progress:
    """A tqdm bar over the queued shards' planned forwards (``enabled=None``: only on a terminal).

    The model's forward hook advances it by the images of each forward, up to the shard's planned
    forwards; when a shard ends the bar is set to the plan's count of the shards done. Without
    planned forwards it counts shards.
    """

    def __init__(self, bar: Any, planned: dict[str, int] | None) -> None:
        self.bar, self.planned = bar, planned
        self.done = 0
        self.ceiling = 0
        self._remaining = 0  # the weight of the queue after the shard in progress
        self._expected = -1  # the length of that queue

    def weight(self, shard_id: str) -> int:
        return 1 if self.planned is None else self.planned.get(shard_id, 0)

    def start(self, shard: Shard, queued: list[str]) -> None:
        """Name ``shard`` on the bar; ``queued``: it and the shards after it (summed again only when
        shards were added to the queue, so a run of many shards stays linear)."""
        if len(queued) != self._expected:
            self._remaining = sum(self.weight(i) for i in queued)
        self.bar.total = self.done + self._remaining
        self.ceiling = self.done + self.weight(shard.id)
        self._remaining -= self.weight(shard.id)
        self._expected = len(queued) - 1
        self.bar.set_description(_stage_label(shard))  # shown at once, however short the shard

    def forward(self, _module: nn.Module, inputs: tuple[Any, ...], _output: Any) -> None:
        rows = getattr(inputs[0], "shape", (0,))[0] if inputs and self.planned is not None else 0
        step = min(rows, self.ceiling - self.bar.n)
        if step > 0:
            self.bar.update(step)

    def finish(self) -> None:
        """The shard started last is done (or failed, or skipped)."""
        self.done = self.ceiling
        self.bar.update(self.done - self.bar.n)


@contextlib.contextmanager
def _progress(runner: ShardRunner, enabled: bool | None) -> Iterator[_Progress]:
    from tqdm.auto import tqdm

    planned = planned_forwards(runner.run_dir, runner.plan)
    unit = "shard" if planned is None else "forward"
    with tqdm(total=0, disable=None if enabled is None else not enabled, unit=unit, unit_scale=planned is not None,
              dynamic_ncols=True) as bar:
        progress = _Progress(bar, planned)
        handle = runner.context.model.register_forward_hook(progress.forward)
        try:
            yield progress
        finally:
            handle.remove()


def run_shards(
    run_dir: str | Path | RunDir, shard_ids: list[str], *, progress: bool | None = None, force: bool = False
) -> dict[str, str]:
    """Run shards in this process, explain before score; returns ``{shard id: error}`` for those that failed.

    Temporary files of interrupted writes are removed first, and every committed shard of
    the plan is checked: a corrupt one is quarantined and computed again, with the score
    shards that read it, besides ``shard_ids``. Committed shards are skipped (unless
    ``force``). A failing shard is recorded and the others go on; a score shard whose
    explain shards failed is skipped with that reason.
    """
    runner = ShardRunner(run_dir)
    folder, plan = runner.run_dir, runner.plan
    folder.remove_stale_temporaries()
    again = quarantine_shards(folder, plan, find_corrupt(folder, [s.id for s in plan.shards]))
    queue = _explain_first(plan, [*shard_ids, *(i for i in again if i not in set(shard_ids))])
    failed: dict[str, str] = {}
    runner.schedule(queue if force else [i for i in queue if not folder.shard(i).is_file()])
    with _progress(runner, progress) as bar, contextlib.closing(runner):
        position = 0
        while position < len(queue):
            shard_id = queue[position]
            shard = plan.shard(shard_id)
            bar.start(shard, queue[position:])
            position += 1
            blocked = [i for i in shard.after if i in failed]
            if blocked:
                failed[shard_id] = f"skipped: it needs failed shard(s) {', '.join(blocked)}"
            elif force or not runner.committed(shard_id):
                try:
                    runner.run(shard_id, force=force)
                except Exception as error:  # every failure is recorded; the other shards go on
                    failed[shard_id] = str(error)
            redo = [i for i in sorted(runner.invalidated) if i not in queue[position:] and not runner.committed(i)]
            runner.invalidated.clear()
            queue[position:] = _explain_first(plan, [*queue[position:], *redo])
            bar.finish()
    return failed


def _explain_first(plan: Plan, shard_ids: list[str]) -> list[str]:
    """``shard_ids`` with the explain shards first, each stage in the given order."""
    return sorted(shard_ids, key=lambda i: plan.shard(i).stage != "explain")
