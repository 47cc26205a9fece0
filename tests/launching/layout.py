"""Until ``pipeline.store`` writes through :class:`~pipeline.run_dir.RunDir` (the store's move to
``RunDir`` on main), make it do so, in this process: the launcher and status find shard files
through ``RunDir`` only. The launching and status tests install it for each test; :func:`install` does nothing once the store already agrees with ``RunDir``.
Job processes of the cluster tests install it through ``tests/launching/site/sitecustomize.py``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable

from pipeline.run_dir import RunDir

__all__ = ["install"]


def _read_errors(run_dir: Path) -> dict[str, dict[str, Any]]:
    folder = RunDir(run_dir)
    errors = {}
    for shard_id in folder.scan().errors:
        try:
            errors[shard_id] = json.loads(folder.error(shard_id).read_text())
        except (OSError, ValueError):
            continue
    return errors


def install(assign: Callable[[object, str, object], None] = setattr) -> None:
    """Point the store's shard paths (and every module that imported them) at ``RunDir``'s;
    ``assign`` is ``setattr`` or a test's ``monkeypatch.setattr`` (undone after the test)."""
    import pipeline.store as store

    if store.shard_path(Path("r"), "abcd") == RunDir("r").shard("abcd"):
        return
    replacements = {
        "shard_path": lambda run_dir, shard_id: RunDir(run_dir).shard(shard_id),
        "checkpoint_path": lambda run_dir, shard_id: RunDir(run_dir).checkpoint(shard_id),
        "error_path": lambda run_dir, shard_id: RunDir(run_dir).error(shard_id),
        "committed_ids": lambda run_dir: set(RunDir(run_dir).committed()),
        "read_errors": _read_errors,
    }
    for name in ("pipeline.store", "pipeline.worker", "pipeline.reduce", "pipeline.merge"):
        __import__(name)
        module = sys.modules[name]
        for attribute, function in replacements.items():
            if hasattr(module, attribute):
                assign(module, attribute, function)
