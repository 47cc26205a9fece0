"""The HDF5 store: one file per shard, committed atomically and checksummed.

Where the files live is :class:`pipeline.run_dir.RunDir`'s business; this module
writes, reads and verifies them.

Shard file layout::

    attrs: shard_id, stage, method, config_hash, versions (JSON), device, wall_time_s, created,
           schema (JSON list of every dataset below), digest (SHA-256 of the datasets and attrs)
    images/keys [n] bytes, images/labels [n] int64, images/targets [n] int64,
    images/predicted [n] int64, images/target_prob [n] float32     (images that loaded)
    failures/keys [m] bytes, failures/messages [m] bytes             (images that did not)
    maps/<layer> [n, H, W] float32                                   (explain: direct methods)
    partial/sums/<name>, partial/constants/<name> [n, ...]           (explain: sampled methods;
                                                                      attrs sample_start, sample_stop)
    values/<metric> [n] float64, curves/<metric> [n, T] float32      (score shards)
    reasons/<metric> [n] bytes                                       (score shards: why a value is NaN,
                                                                      empty when it is not)

Strings are fixed-length UTF-8 bytes, so every dataset is covered by HDF5's
Fletcher-32 filter, checked on every read. A checkpoint (``<id>.partial.h5``) has the
same layout plus the attribute ``next_sample``, which the digest covers too.

A file is built in memory and written with ordinary file I/O under a temporary name,
fsync'ed and renamed: a reader sees a whole file or none, and a full disk is a Python
error (:class:`ShardWriteError`) naming the folder, never a crash inside HDF5.
:func:`read_shard` checks the schema, the checksums and the digest and raises
:class:`CorruptShardError` naming the file; :func:`verify_shard` says what is wrong
without raising.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import platform
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np

from .digests import content_digest
from .errors import PipelineError
from .hdf5_header import header_problem
from .run_dir import atomic_write, temporary_path

__all__ = [
    "ShardOutput",
    "CorruptShardError",
    "ShardWriteError",
    "ResultsWriteError",
    "write_shard",
    "read_shard",
    "verify_shard",
    "library_versions",
    "atomic_h5",
]

class CorruptShardError(PipelineError, ValueError):
    """A shard or checkpoint file is unreadable, incomplete or altered; the message names it."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


class ShardWriteError(PipelineError, OSError):
    """A shard file could not be written (e.g. the disk is full); the message names the folder."""


class ResultsWriteError(PipelineError, OSError):
    """``results.h5`` could not be written (e.g. the disk is full); the message names the folder."""


@dataclasses.dataclass
class ShardOutput:
    """What a shard computed, as NumPy arrays aligned with ``keys``."""

    keys: list[str]
    labels: np.ndarray
    targets: np.ndarray
    predicted: np.ndarray
    target_prob: np.ndarray
    failures: dict[str, str] = dataclasses.field(default_factory=dict)
    maps: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    sums: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    constants: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    values: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    curves: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    reasons: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    attrs: dict[str, Any] = dataclasses.field(default_factory=dict)


def library_versions() -> dict[str, str]:
    import torch
    import torchvision

    from . import __version__

    return {
        "xai_pipeline": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "h5py": h5py.__version__,
        "python": platform.python_version(),
    }


class _GuardedFile(io.RawIOBase):
    """The file h5py writes ``results.h5`` through (its file-object driver): the first write error
    (a full disk) is kept and later writes are dropped, so HDF5 never sees an error; after the
    close the error is raised. HDF5 handles a failing write badly: the file stays open inside the
    library and the process crashes when it exits."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self._file = open(path, "w+b", buffering=0)
        self.error: OSError | None = None

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def readinto(self, buffer: Any) -> int | None:
        return self._file.readinto(buffer)

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if self.error is None:
            try:
                written = 0
                while written < len(view):
                    written += self._file.write(view[written:]) or 0
                return written
            except OSError as error:
                self.error = error
        self._file.seek(len(view), os.SEEK_CUR)
        return len(view)

    def truncate(self, size: int | None = None) -> int:
        if self.error is None:
            try:
                return self._file.truncate(size)
            except OSError as error:
                self.error = error
        return self.tell() if size is None else size

    def fsync(self) -> None:
        """Flush to the disk, keeping a failure as :attr:`error`."""
        if self.error is None:
            try:
                os.fsync(self._file.fileno())
            except OSError as error:
                self.error = error

    def close(self) -> None:
        self._file.close()
        super().close()


class atomic_h5:
    """Open ``path`` for writing under a temporary name; rename it into place on success. A write
    that fails (a full disk) raises :class:`ResultsWriteError` naming the folder once the file is
    closed, and leaves no file behind."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.tmp = temporary_path(self.path)

    def __enter__(self) -> h5py.File:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = _GuardedFile(self.tmp)
        self.file = h5py.File(self.handle, "w")
        return self.file

    def __exit__(self, kind: object, error: object, trace: object) -> None:
        try:
            self.file.close()
            self.handle.fsync()
            self.handle.close()
            if self.handle.error is not None:
                failed = self.handle.error
                raise ResultsWriteError(
                    failed.errno, f"cannot write {self.path.name} into {self.path.parent}: {failed.strerror or failed}"
                ) from None
            if kind is None:
                os.replace(self.tmp, self.path)
        finally:
            self.tmp.unlink(missing_ok=True)


#: the groups of a shard file, each holding datasets only
_GROUPS = ("images", "failures", "maps", "partial/sums", "partial/constants", "values", "curves", "reasons")


def _encoded(strings: list[str]) -> np.ndarray:
    """``strings`` as fixed-length UTF-8 bytes (checksummed, unlike variable-length strings)."""
    encoded = [text.encode() for text in strings]
    return np.array(encoded, dtype=f"S{max([1, *map(len, encoded)])}")


def _datasets(output: ShardOutput) -> dict[str, np.ndarray]:
    """Every dataset of ``output``'s file by path, as stored."""
    datasets = {
        "images/keys": _encoded(output.keys),
        "images/labels": np.asarray(output.labels).astype(np.int64),
        "images/targets": np.asarray(output.targets).astype(np.int64),
        "images/predicted": np.asarray(output.predicted).astype(np.int64),
        "images/target_prob": np.asarray(output.target_prob).astype(np.float32),
        "failures/keys": _encoded(list(output.failures)),
        "failures/messages": _encoded(list(output.failures.values())),
    }
    for group, arrays in (("maps", output.maps), ("partial/sums", output.sums),
                          ("partial/constants", output.constants), ("values", output.values),
                          ("curves", output.curves)):
        datasets.update({f"{group}/{name}": np.asarray(array) for name, array in arrays.items()})
    datasets.update({f"reasons/{name}": _encoded(list(texts)) for name, texts in output.reasons.items()})
    return datasets


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _digest(datasets: dict[str, np.ndarray], attrs: dict[str, Any]) -> str:
    """SHA-256 of the datasets (name, dtype, shape, little-endian bytes) and the attributes."""

    def parts() -> Iterator[tuple[str, bytes]]:
        for name in sorted(datasets):
            array = np.ascontiguousarray(datasets[name])
            array = array.astype(array.dtype.newbyteorder("<"), copy=False)
            yield f"{name}:{array.dtype.str}:{array.shape}", array.tobytes()
        plain = {key: _plain(value) for key, value in attrs.items() if key != "digest"}
        yield "attrs", json.dumps(plain, sort_keys=True, default=str).encode()

    return content_digest(parts())


def write_shard(path: Path, output: ShardOutput) -> None:
    """Commit ``output`` to ``path`` atomically; raises :class:`ShardWriteError` naming the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets = _datasets(output)
    attrs = {key: json.dumps(value) if isinstance(value, (dict, list)) else value for key, value in output.attrs.items()}
    attrs["schema"] = json.dumps(sorted(datasets))
    attrs["digest"] = _digest(datasets, attrs)
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        f.attrs.update(attrs)
        for group in _GROUPS:
            _put_group(f.require_group(group), _group(datasets, group))
    try:
        atomic_write(path, buffer.getvalue())
    except OSError as error:
        raise ShardWriteError(
            error.errno, f"cannot write {path.name} into {path.parent}: {error.strerror or error}"
        ) from error


def _put_group(group: h5py.Group, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` under ``group``, each with the Fletcher-32 checksum (scalars have none)."""
    for name, array in arrays.items():
        group.create_dataset(name, data=array, fletcher32=array.ndim > 0)


def _schema(attrs: dict[str, Any]) -> list[str]:
    """The file's recorded dataset list."""
    if "schema" not in attrs or "digest" not in attrs:
        raise ValueError("it has no schema or digest (written before checksums, or not by xai-pipeline)")
    return json.loads(attrs["schema"])


def _present(f: h5py.File, schema: list[str]) -> list[str]:
    """The file's dataset list, after checking every dataset is present."""
    missing = [name for name in schema if not isinstance(f.get(name), h5py.Dataset)]
    if missing:
        raise ValueError(f"dataset(s) {', '.join(missing)} are missing")
    return schema


def _check_sizes(datasets: dict[str, np.ndarray]) -> None:
    """Raise unless every per-image dataset has one row per image."""
    n = len(datasets["images/keys"])
    for name, array in datasets.items():
        per_image = name.startswith(("images/", "maps/", "partial/", "values/", "curves/", "reasons/"))
        if per_image and (array.ndim == 0 or len(array) != n):
            raise ValueError(f"{name} has {0 if array.ndim == 0 else len(array)} rows for {n} images")


def _load(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The checked datasets and attributes of a shard file; raises :class:`CorruptShardError`."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        with h5py.File(path, "r") as f:
            attrs = {key: _plain(value) for key, value in f.attrs.items()}
            schema = _schema(attrs)
            try:
                datasets = {name: f[name][()] for name in schema}
            except KeyError:
                _present(f, schema)  # names the missing datasets
                raise
    except OSError as error:  # not HDF5, truncated, or a Fletcher-32 checksum failed
        raise CorruptShardError(path, f"cannot be read ({error})") from None
    except (ValueError, KeyError, TypeError) as error:
        raise CorruptShardError(path, str(error)) from None
    if _digest(datasets, attrs) != attrs["digest"]:
        raise CorruptShardError(path, "its contents do not match the digest written with it (altered after the commit)")
    try:
        _check_sizes(datasets)
    except (ValueError, KeyError) as error:
        raise CorruptShardError(path, f"bad layout: {error}") from None
    return datasets, attrs


def verify_shard(path: Path, *, deep: bool) -> str | None:
    """None when the shard file at ``path`` is whole, else one line saying what is wrong, naming the file.

    The cheap check reads the HDF5 header (:func:`~pipeline.hdf5_header.header_problem`), opens
    the file and checks the schema is recorded and every dataset present; ``deep`` also reads
    every dataset (Fletcher-32) and recomputes the digest.
    """
    problem = header_problem(path) if Path(path).exists() else None
    if problem is not None:
        return problem
    if deep:
        try:
            _load(path)
        except (CorruptShardError, FileNotFoundError) as error:
            return str(error)
        return None
    try:
        with h5py.File(path, "r") as f:
            _present(f, _schema({key: _plain(value) for key, value in f.attrs.items()}))
    except OSError as error:
        return f"{path}: cannot be read ({error})"
    except (ValueError, KeyError, TypeError) as error:
        return f"{path}: {error}"
    return None


def _strings(array: np.ndarray) -> list[str]:
    return [value.decode() for value in array]


def _group(datasets: dict[str, np.ndarray], group: str) -> dict[str, np.ndarray]:
    prefix = f"{group}/"
    return {name[len(prefix):]: array for name, array in datasets.items() if name.startswith(prefix)}


def read_shard(path: Path) -> ShardOutput:
    """Load a committed shard (or checkpoint) file; raises :class:`CorruptShardError` naming it
    when it cannot be read, lacks a dataset of its schema or does not match its digest."""
    datasets, attrs = _load(path)
    return ShardOutput(
        keys=_strings(datasets["images/keys"]),
        labels=datasets["images/labels"],
        targets=datasets["images/targets"],
        predicted=datasets["images/predicted"],
        target_prob=datasets["images/target_prob"],
        failures=dict(zip(_strings(datasets["failures/keys"]), _strings(datasets["failures/messages"]))),
        maps=_group(datasets, "maps"),
        sums=_group(datasets, "partial/sums"),
        constants=_group(datasets, "partial/constants"),
        values=_group(datasets, "values"),
        curves=_group(datasets, "curves"),
        reasons={name: _strings(array) for name, array in _group(datasets, "reasons").items()},
        attrs={key: value for key, value in attrs.items() if key not in ("schema", "digest")},
    )
