"""The shard runner: computes shards of one run folder in this process and commits them.

:class:`ShardRunner` loads the run (config, plan, model) once per process and runs
shards by id: the explain stage (:mod:`pipeline.stages.explain`) or the score stage
(:mod:`pipeline.stages.score`) computes the shard's output and :func:`commit_shard`
writes it, the one way a shard is committed. A failure is recorded beside the shard
(``kind`` ``data`` for bad input, not worth retrying; ``error`` otherwise).

A committed shard that turns out corrupt (see :mod:`pipeline.integrity`) is moved to
``shards/corrupt/`` and computed again, with the score shards that read it.
"""
from __future__ import annotations

import contextlib
import logging
import socket
import time
from pathlib import Path
from typing import Iterator, Sequence

from ..data import DataError
from ..integrity import find_corrupt, quarantine_shards
from ..planning import Plan, Shard
from ..run_dir import RunDir
from ..store import CorruptShardError, ShardOutput, library_versions, verify_shard, write_shard
from .context import RunContext
from .explain import ExplainStage
from .score import ScoreStage

__all__ = ["ShardRunner", "ShardError", "run_shards", "commit_shard"]

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


@contextlib.contextmanager
def _progress_bar(total: int, enabled: bool | None) -> Iterator[object]:
    """A tqdm bar; ``enabled=None`` shows it only on a terminal."""
    from tqdm.auto import tqdm

    with tqdm(total=total, disable=None if enabled is None else not enabled, unit="shard", dynamic_ncols=True) as bar:
        yield bar


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
    with _progress_bar(len(queue), progress) as bar, contextlib.closing(runner):
        position = 0
        while position < len(queue):
            shard_id = queue[position]
            position += 1
            shard = plan.shard(shard_id)
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
            bar.total = len(queue)  # type: ignore[attr-defined]
            bar.update(1)  # type: ignore[attr-defined]
    return failed


def _explain_first(plan: Plan, shard_ids: list[str]) -> list[str]:
    """``shard_ids`` with the explain shards first, each stage in the given order."""
    return sorted(shard_ids, key=lambda i: plan.shard(i).stage != "explain")
