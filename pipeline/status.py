"""Status of a run, read from the run folder first and the scheduler second.

Committed shard files are the truth for what is done; recorded error files say what
failed (and why); the scheduler, when the run was launched on one and answers, only
adds which of the remaining shards are running or queued.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from .planning import Plan
from .run_dir import RunDir

__all__ = ["RunStatus", "run_status"]


@dataclasses.dataclass
class RunStatus:
    run_dir: Path
    plan: Plan
    done: set[str]
    failed: dict[str, dict[str, Any]]
    running: set[str]
    pending: set[str]
    scheduler_note: str | None = None

    @property
    def total(self) -> int:
        return len(self.plan.shards)

    @property
    def finished(self) -> bool:
        return len(self.done) == self.total

    def describe(self) -> str:
        lines = [f"run {self.run_dir}: {self.plan.image_count} images, {self.total} shards"]
        for stage in ("explain", "score"):
            ids = {s.id for s in self.plan.stage(stage)}
            lines.append(
                f"  {stage:8s} done {len(ids & self.done):6d}  running {len(ids & self.running):6d}  "
                f"pending {len(ids & self.pending):6d}  failed {len(ids & set(self.failed)):6d}"
            )
        if self.scheduler_note:
            lines.append(f"  scheduler: {self.scheduler_note}")
        for shard_id, record in list(self.failed.items())[:10]:
            shard = self.plan.shard(shard_id)
            where = f" (log: {record['log']})" if record.get("log") else ""
            lines.append(f"  failed {shard.describe()}: [{record.get('kind')}] {record.get('message')}{where}")
        if len(self.failed) > 10:
            lines.append(f"  ... and {len(self.failed) - 10} more failed shards")
        results = RunDir(self.run_dir).results
        if self.finished and results.is_file():
            lines.append(f"  finished: results in {results}, tables in {self.run_dir / 'summary.md'}")
        elif self.finished:
            lines.append(f"  all shards done: `xai-pipeline reduce {self.run_dir}` writes the results")
        return "\n".join(lines)


def run_status(run_dir: Path, *, scheduler: bool = True) -> RunStatus:
    """The run's status; ``scheduler=False`` never asks the scheduler."""
    run_dir = Path(run_dir)
    folder = RunDir(run_dir)
    plan = Plan.read(folder.plan)
    planned = {s.id for s in plan.shards}
    files = folder.scan()
    done = set(files.committed & planned)
    failed = folder.errors(sorted((files.errors & planned) - done))
    running: set[str] = set()
    note = None
    if scheduler:
        from .launching import scheduler_running

        running, note = scheduler_running(run_dir, planned - done)
        running -= set(failed)
    pending = planned - done - set(failed) - running
    return RunStatus(run_dir, plan, done, failed, running, pending, note)
