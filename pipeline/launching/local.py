"""The local executor (the default): pending shards run one after the other in this process."""
from __future__ import annotations

from pathlib import Path

from ..planning import Plan, Shard
from ..run_dir import RunDir
from ..worker import run_shards

__all__ = ["pending_shards", "run_local"]


def pending_shards(run_dir: Path, plan: Plan | None = None) -> list[Shard]:
    """Planned shards that are not committed, explain shards before score shards."""
    folder = RunDir(run_dir)
    plan = plan or Plan.read(folder.plan)
    done = folder.committed()
    return [s for stage in ("explain", "score") for s in plan.stage(stage) if s.id not in done]


def run_local(run_dir: Path, *, progress: bool | None = None, force: bool = False) -> dict[str, str]:
    """Run every pending shard (every shard with ``force``); returns ``{shard id: error}``."""
    if force:
        plan = Plan.read(RunDir(run_dir).plan)
        ids = [s.id for stage in ("explain", "score") for s in plan.stage(stage)]
    else:
        ids = [s.id for s in pending_shards(run_dir)]
    if not ids:
        return {}
    return run_shards(Path(run_dir), ids, progress=progress, force=force)
