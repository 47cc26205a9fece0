"""Executors: where pending shards run (this machine, or SLURM through submitit)."""
from __future__ import annotations

from pathlib import Path

from .launch import LaunchError, cancel_run, launch_run, resolve_profile
from .local import pending_shards, run_local
from .profiles import ClusterProfile, ProfileError, load_profile

__all__ = [
    "pending_shards",
    "run_local",
    "scheduler_running",
    "JOBS_FILE",
    "ClusterProfile",
    "ProfileError",
    "load_profile",
    "LaunchError",
    "launch_run",
    "cancel_run",
    "resolve_profile",
]

#: submitted jobs of a run, written by the SLURM launcher
JOBS_FILE = "jobs.json"


def scheduler_running(run_dir: Path, candidates: set[str]) -> tuple[set[str], str | None]:
    """Which of ``candidates`` the scheduler reports running or queued, and a note on how it answered."""
    if not (Path(run_dir) / JOBS_FILE).is_file():
        return set(), None
    from .slurm import running_shards

    return running_shards(Path(run_dir), candidates)
