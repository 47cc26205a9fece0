"""The run folder: where every file of a run lives, and how files are written into it.

Layout::

    RUN_DIR/config.yaml                     the resolved experiment config
    RUN_DIR/plan.json                       the shards (see pipeline.planning)
    RUN_DIR/cost.json                       forwards, backwards and time the plan needs (see pipeline.cost)
    RUN_DIR/shards/<ab>/<id>.h5             a committed shard (exists only when whole)
    RUN_DIR/shards/<ab>/<id>.partial.h5     a sampled shard's last saved progress (resumable)
    RUN_DIR/shards/<ab>/<id>.error.json     why the shard's last attempt failed
    RUN_DIR/shards/corrupt/                 shard and checkpoint files found corrupt, kept for
                                            inspection beside a ``.reason.txt``, never read again
    RUN_DIR/shards/checked.json             size and modification time of each committed shard that
                                            ``status`` found whole (it opens only new or changed files)
    RUN_DIR/shards/dropped/                 shard and checkpoint files a re-plan (``--update``) no
                                            longer plans, set aside by their names, never read again
    RUN_DIR/results.h5                      the merged results (see pipeline.stages.reduce)
    RUN_DIR/metrics.csv, metrics.parquet    one row per image x method x layer x metric
    RUN_DIR/summary.{csv,md,tex}            mean, variance, ... per method x layer
    RUN_DIR/comparison.{csv,md}             paired tests between methods (see pipeline.comparison)
    RUN_DIR/failures.csv                    images that could not be read, NaN values and why
    RUN_DIR/jobs.json                       SLURM submissions (see pipeline.launching.slurm)
    RUN_DIR/slurm/                          submitit's scripts and logs
    RUN_DIR/report/                         the HTML/Markdown report
    RUN_DIR/.lock                           held by the one command that writes the folder

``<ab>`` is the first two characters of the shard id, so no folder holds more than a
few hundred shard files even at tens of thousands of shards (parallel file systems
slow down on large folders). :meth:`RunDir.scan` lists the shard folder in one pass.

Every file is written under a temporary name in its folder and renamed into place
(:func:`atomic_write`): a reader sees the whole file or none. The temporary files of
writes that were interrupted are removed by the next command that takes the lock
(:meth:`RunDir.remove_stale_temporaries`).
One command at a time writes a run folder (:meth:`RunDir.locked`); SLURM jobs of the
run write only their own shards and take no lock.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import PipelineError

__all__ = ["RunDir", "RunDirBusy", "ShardFiles", "atomic_write", "temporary_path", "STALE_AFTER_S"]

logger = logging.getLogger(__name__)

_COMMITTED = ".h5"
_CHECKPOINT = ".partial.h5"
_ERROR = ".error.json"
_CORRUPT = "corrupt"
_DROPPED = "dropped"
_TEMPORARY = ".tmp-"


class RunDirBusy(PipelineError, RuntimeError):
    """Another command holds the run folder's lock; the message says which process."""


#: a temporary file of another host is stale when unchanged for this long (its writer's pid cannot
#: be checked from here; a shard is written in one go, in seconds)
STALE_AFTER_S = 6 * 3600


def temporary_path(path: Path) -> Path:
    """A hidden, unique name beside ``path`` for writing it before the rename, naming the writer's
    host and pid (so the temporaries of writers that died can be told apart)."""
    return path.with_name(f".{path.name}{_TEMPORARY}{platform.node()}-{os.getpid()}-{time.monotonic_ns()}")


def _writer_gone(name: str, modified: float) -> bool:
    """Whether the writer of the temporary file ``name`` has ended: a process of this host that is
    no longer running, or a writer on another host (or unknown) when the file is older than
    :data:`STALE_AFTER_S`."""
    host, _, pid = name.partition(_TEMPORARY)[2].rpartition("-")[0].rpartition("-")
    if host == platform.node() and pid.isdigit():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # running, as another user
            return False
        return False
    return time.time() - modified > STALE_AFTER_S


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file, fsync'ed and renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as handle:
            handle.write(data.encode() if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@dataclasses.dataclass(frozen=True)
class ShardFiles:
    """What the shard folder holds, by shard id, from one listing pass."""

    committed: frozenset[str]
    checkpoints: frozenset[str]
    errors: frozenset[str]


class RunDir:
    """The paths of one run folder (nothing is created until a file is written)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    def __fspath__(self) -> str:
        return os.fspath(self.root)

    # ------------------------------------------------------------------ files
    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def plan(self) -> Path:
        return self.root / "plan.json"

    @property
    def cost(self) -> Path:
        return self.root / "cost.json"

    @property
    def shards(self) -> Path:
        return self.root / "shards"

    @property
    def results(self) -> Path:
        return self.root / "results.h5"

    @property
    def metrics_csv(self) -> Path:
        return self.root / "metrics.csv"

    @property
    def metrics_parquet(self) -> Path:
        return self.root / "metrics.parquet"

    @property
    def summary_csv(self) -> Path:
        return self.root / "summary.csv"

    @property
    def summary_md(self) -> Path:
        return self.root / "summary.md"

    @property
    def summary_tex(self) -> Path:
        return self.root / "summary.tex"

    @property
    def comparison_csv(self) -> Path:
        return self.root / "comparison.csv"

    @property
    def comparison_md(self) -> Path:
        return self.root / "comparison.md"

    @property
    def failures_csv(self) -> Path:
        return self.root / "failures.csv"

    @property
    def warnings_md(self) -> Path:
        return self.root / "warnings.md"

    @property
    def jobs(self) -> Path:
        return self.root / "jobs.json"

    @property
    def slurm(self) -> Path:
        return self.root / "slurm"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the folder's lock while the block runs; raises :class:`RunDirBusy` naming the holder
        when another command has it. The temporary files of interrupted writes are removed first
        (:meth:`remove_stale_temporaries`). A folder created for the lock and left empty is removed.

        The lock file is created exclusively and records the holder's pid and host
        (filelock's SoftFileLock, safe on NFS); a lock left by a process that died on
        this host is taken over.
        """
        from filelock import SoftFileLock, Timeout

        created = not self.root.exists()
        self.root.mkdir(parents=True, exist_ok=True)
        lock = SoftFileLock(self.lock, timeout=0)
        try:
            lock.acquire()
        except Timeout:
            try:
                pid, host = self.lock.read_text().splitlines()[:2]
            except (OSError, ValueError):
                pid, host = "?", "?"
            raise RunDirBusy(
                f"{self.root} is in use by another xai-pipeline command (pid {pid} on host {host}): wait for it "
                f"to end; if that process is gone on another host, remove {self.lock}"
            ) from None
        try:
            self.remove_stale_temporaries()
            yield
        finally:
            lock.release()
            if created:
                with contextlib.suppress(OSError):  # left as it was when the command wrote nothing
                    self.root.rmdir()

    def outputs(self) -> list[Path]:
        """The files reduce writes (removed with the shards when a folder is overwritten)."""
        return [self.results, self.metrics_csv, self.metrics_parquet, self.summary_csv, self.summary_md,
                self.summary_tex, self.failures_csv, self.warnings_md, self.comparison_csv, self.comparison_md]

    # ----------------------------------------------------------------- shards
    def shard_folder(self, shard_id: str) -> Path:
        return self.shards / shard_id[:2]

    def shard(self, shard_id: str) -> Path:
        """The committed file of shard ``shard_id``."""
        return self.shard_folder(shard_id) / f"{shard_id}{_COMMITTED}"

    def shard_paths(self, shard_ids: Iterable[str]) -> dict[str, str]:
        """``{shard id: path of its committed file}`` as strings: :meth:`shard` for every shard of a
        large run, without building a ``Path`` per shard (which costs more than opening the file)."""
        shards = os.fspath(self.shards)
        return {i: f"{shards}{os.sep}{i[:2]}{os.sep}{i}{_COMMITTED}" for i in shard_ids}

    def checkpoint(self, shard_id: str) -> Path:
        """The saved progress of sampled shard ``shard_id``."""
        return self.shard_folder(shard_id) / f"{shard_id}{_CHECKPOINT}"

    def error(self, shard_id: str) -> Path:
        """The record of why shard ``shard_id`` last failed."""
        return self.shard_folder(shard_id) / f"{shard_id}{_ERROR}"

    @property
    def corrupt(self) -> Path:
        """Where corrupt shard and checkpoint files are moved (never read again)."""
        return self.shards / _CORRUPT

    def quarantine(self, path: Path, reason: str) -> Path:
        """Move the corrupt file ``path`` into :attr:`corrupt`, with ``reason`` beside it; returns its new path."""
        self.corrupt.mkdir(parents=True, exist_ok=True)
        target = self.corrupt / f"{path.name}.{time.time_ns()}"
        os.replace(path, target)
        atomic_write(target.with_name(f"{target.name}.reason.txt"), f"{reason}\n")
        return target

    @property
    def checked(self) -> Path:
        """``{shard id: "size:mtime_ns"}`` of the committed shards ``status`` found whole."""
        return self.shards / "checked.json"

    @property
    def dropped(self) -> Path:
        """Where the files of shards a re-plan no longer plans are set aside (never read again)."""
        return self.shards / _DROPPED

    def drop(self, shard_id: str, *, delete: bool = False) -> None:
        """Move shard ``shard_id``'s committed file and checkpoint into :attr:`dropped` (same names), or
        ``delete`` them, and remove its error record: a re-plan no longer plans the shard."""
        for path in (self.shard(shard_id), self.checkpoint(shard_id)):
            if delete:
                path.unlink(missing_ok=True)
            elif path.is_file():
                self.dropped.mkdir(parents=True, exist_ok=True)
                os.replace(path, self.dropped / path.name)
        self.clear_error(shard_id)

    def remove_stale_temporaries(self) -> list[Path]:
        """Remove the temporary files of interrupted writes in the run folder and its shard folders
        (those whose writer has ended: a dead process of this host, or older than
        :data:`STALE_AFTER_S` from another host); returns what was removed. Every command that
        takes the lock calls it (:meth:`locked`)."""
        removed: list[Path] = []
        for folder in [self.root, self.shards, *self._prefix_folders()]:
            try:
                with os.scandir(folder) as entries:
                    for entry in entries:
                        if entry.name.startswith(".") and _TEMPORARY in entry.name and _writer_gone(
                                entry.name, entry.stat().st_mtime):
                            removed.append(Path(entry.path))
            except FileNotFoundError:
                continue
        for path in removed:
            path.unlink(missing_ok=True)
        if removed:
            logger.warning("removed %d temporary file(s) of interrupted writes in %s", len(removed), self.root)
        return removed

    def _prefix_folders(self) -> list[str]:
        """The shard folders ``shards/<ab>`` (not :attr:`corrupt` nor :attr:`dropped`)."""
        try:
            return [entry.path for entry in os.scandir(self.shards)
                    if entry.is_dir() and entry.name not in (_CORRUPT, _DROPPED)]
        except FileNotFoundError:
            return []

    def _entries(self) -> Iterator[str]:
        """Every file name in the shard folders, from one pass over them."""
        for folder in self._prefix_folders():
            with os.scandir(folder) as entries:
                for entry in entries:
                    yield entry.name

    def scan(self) -> ShardFiles:
        """Committed shards, saved checkpoints and error records, from one listing pass."""
        committed, checkpoints, errors = set(), set(), set()
        for name in self._entries():
            if name.startswith("."):
                continue
            if name.endswith(_CHECKPOINT):
                checkpoints.add(name[: -len(_CHECKPOINT)])
            elif name.endswith(_ERROR):
                errors.add(name[: -len(_ERROR)])
            elif name.endswith(_COMMITTED):
                committed.add(name[: -len(_COMMITTED)])
        return ShardFiles(frozenset(committed), frozenset(checkpoints), frozenset(errors))

    def committed(self) -> frozenset[str]:
        """Ids of every committed shard (one listing pass)."""
        return self.scan().committed

    # ---------------------------------------------------------- error records
    def record_error(self, shard_id: str, message: str, *, kind: str, log: str | None = None) -> None:
        """Record why shard ``shard_id`` failed (``kind``: ``data`` for bad input, ``error`` otherwise)."""
        record = {"shard": shard_id, "kind": kind, "message": message, "log": log, "time": time.time(),
                  "host": platform.node()}
        atomic_write(self.error(shard_id), json.dumps(record, indent=1))

    def read_error(self, shard_id: str) -> dict[str, Any] | None:
        """The recorded failure of shard ``shard_id`` (None when there is none or it cannot be read)."""
        try:
            return json.loads(self.error(shard_id).read_text())
        except (OSError, ValueError):
            return None

    def clear_error(self, shard_id: str) -> None:
        self.error(shard_id).unlink(missing_ok=True)

    def errors(self, shard_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        """The recorded failures of ``shard_ids`` (those without a readable record are left out)."""
        records = {shard_id: self.read_error(shard_id) for shard_id in shard_ids}
        return {shard_id: record for shard_id, record in records.items() if record is not None}
