"""Finding what is corrupt or stale in a run folder, and putting it out of the way.

Nothing corrupt, stale or half-written is ever merged: a shard or checkpoint that
fails :func:`~pipeline.store.verify_shard` is moved to ``shards/corrupt/``
(:func:`quarantine_shards`) together with the removal of the committed score shards
that read it, so that the next ``run`` or ``resume`` computes them again.
:func:`results_whole` says whether ``results.h5`` and the tables beside it are those
of one finished reduce of this plan. No torch import: ``status`` uses this module.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterable, Mapping

import h5py

from .digests import file_digest
from .planning import Plan
from .run_dir import RunDir
from .store import verify_shard

__all__ = ["find_corrupt", "quarantine_shards", "results_whole", "TABLES_ATTRIBUTE"]

#: the attribute of results.h5 holding ``{table file name: SHA-256}`` of the tables written with it
TABLES_ATTRIBUTE = "tables"

logger = logging.getLogger(__name__)


def _folder(run_dir: str | Path | RunDir) -> RunDir:
    return run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)


def find_corrupt(run_dir: str | Path | RunDir, shard_ids: Iterable[str], *, deep: bool = False) -> dict[str, str]:
    """``{shard id: reason}`` of the committed shards among ``shard_ids`` that are corrupt.

    The cheap check opens each file and checks its schema; ``deep`` reads every dataset
    (Fletcher-32) and recomputes the digest. Shards that are not committed are left out.
    """
    folder = _folder(run_dir)
    committed = folder.committed()
    found = {}
    for shard_id in shard_ids:
        if shard_id in committed:
            reason = verify_shard(folder.shard(shard_id), deep=deep)
            if reason is not None:
                found[shard_id] = reason
    return found


def quarantine_shards(run_dir: str | Path | RunDir, plan: Plan, corrupt: Mapping[str, str]) -> list[str]:
    """Move the ``corrupt`` shards' files to ``shards/corrupt/``, remove the committed score shards
    that read them, and log both; returns every shard id that must be computed again (plan order)."""
    folder = _folder(run_dir)
    for shard_id, reason in corrupt.items():
        path = folder.shard(shard_id)
        if path.is_file():
            target = folder.quarantine(path, reason)
            logger.warning("corrupt shard moved to %s, it will be computed again: %s", target, reason)
    readers = [s.id for s in plan.stage("score") if set(s.after) & set(corrupt)]
    for shard_id in readers:
        if shard_id not in corrupt and folder.shard(shard_id).is_file():
            folder.shard(shard_id).unlink()
            logger.warning("score shard %s read a corrupt shard: it will be computed again", shard_id)
    again = set(corrupt) | set(readers)
    return [s.id for s in plan.shards if s.id in again]


def results_whole(run_dir: str | Path | RunDir, plan: Plan | None = None, *, deep: bool = True) -> bool:
    """True when ``results.h5`` opens, is of the run's plan (``plan``, read when not given) and every
    table written with it is there; ``deep`` also checks that each table is unchanged (its digest
    is recorded in ``results.h5``)."""
    folder = _folder(run_dir)
    try:
        plan = plan or Plan.read(folder.plan)
        with h5py.File(folder.results, "r") as f:
            config_hash = f.attrs.get("config_hash")
            tables = json.loads(f.attrs[TABLES_ATTRIBUTE])
            if "images/keys" not in f or len(f["images/keys"]) != plan.image_count:
                return False
    except (OSError, KeyError, ValueError):
        return False
    if config_hash != plan.config_hash or not tables:
        return False
    if not deep:
        return all((folder.root / name).is_file() for name in tables)
    try:
        return all(file_digest(folder.root / name) == digest for name, digest in tables.items())
    except OSError:
        return False
