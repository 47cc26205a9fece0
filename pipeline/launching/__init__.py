"""Executors: where pending shards run (this machine, or SLURM through submitit).

Names are imported on first use, so that ``pipeline.launching.accounting`` (what
``xai-pipeline status`` needs) loads without torch or submitit.
"""
from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "pending_shards",
    "run_local",
    "ClusterProfile",
    "CpuJobProfile",
    "ProfileError",
    "load_profile",
    "LaunchError",
    "launch_run",
    "cancel_run",
    "resolve_profile",
]

_HOMES = {
    "pending_shards": "local", "run_local": "local",
    "ClusterProfile": "profiles", "CpuJobProfile": "profiles", "ProfileError": "profiles", "load_profile": "profiles",
    "LaunchError": "launch", "launch_run": "launch", "cancel_run": "launch", "resolve_profile": "launch",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
