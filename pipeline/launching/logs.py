"""The log section of a shard's last SLURM attempt (``xai-pipeline logs RUN_DIR SHARD_ID``).

A job prints ``starting shard <id> (...)`` to both its ``.out`` and ``.err`` logs
before each shard; a shard's section runs from the last such line to the next one
(or the end: the requeue messages and submitit's own lines are kept). ``.out``
holds progress, requeue and skip messages, ``.err`` tracebacks.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import PipelineError
from .accounting import latest_tasks, read_submissions

__all__ = ["shard_log", "section", "STARTING"]

#: the line a job prints before each shard
STARTING = "starting shard"


def section(text: str, shard_id: str, lines: int) -> list[str]:
    """The lines of ``text`` from the last start of ``shard_id`` to the next shard's start (at most ``lines``)."""
    all_lines = text.splitlines()
    starts = [n for n, line in enumerate(all_lines) if line.startswith(f"{STARTING} {shard_id}")]
    if not starts:
        return all_lines[-lines:]
    end = next((n for n in range(starts[-1] + 1, len(all_lines)) if all_lines[n].startswith(STARTING)),
               len(all_lines))
    return all_lines[starts[-1] : end][-lines:]


def shard_log(run_dir: Path, shard_id: str, *, lines: int = 200) -> str:
    """Both logs of the task that last ran ``shard_id``, cut to that shard's section."""
    latest = latest_tasks(read_submissions(Path(run_dir)))
    if shard_id not in latest:
        raise PipelineError(f"shard {shard_id} was never submitted to SLURM from {run_dir} (see jobs.json)")
    submission, index = latest[shard_id]
    parts = []
    for suffix in ("out", "err"):
        path = submission.log(index, suffix)
        if not path.is_file():
            parts.append(f"==> {path} <== (not written yet: the task has not started)")
            continue
        parts.append(f"==> {path} <==")
        parts.extend(section(path.read_text(errors="replace"), shard_id, lines))
    return "\n".join(parts)
