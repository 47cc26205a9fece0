"""The HDF5 store: one file per shard, committed atomically.

Where the files live is :class:`pipeline.run_dir.RunDir`'s business; this module
writes and reads them.

Shard file layout::

    attrs: shard_id, stage, method, config_hash, versions (JSON), device, wall_time_s, created
    images/keys [n] str, images/labels [n] int64, images/targets [n] int64,
    images/predicted [n] int64, images/target_prob [n] float32     (images that loaded)
    failures/keys [m] str, failures/messages [m] str                 (images that did not)
    maps/<layer> [n, H, W] float32                                   (explain: direct methods)
    partial/sums/<name>, partial/constants/<name> [n, ...]           (explain: sampled methods;
                                                                      attrs sample_start, sample_stop)
    values/<metric> [n] float64, curves/<metric> [n, T] float32      (score shards)

A checkpoint (``<id>.partial.h5``) has the same layout plus the attribute
``next_sample``. Every file is written under a temporary name in the same folder,
flushed and renamed: a reader sees a whole file or none.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .run_dir import temporary_path

__all__ = [
    "ShardOutput",
    "write_shard",
    "read_shard",
    "library_versions",
    "atomic_h5",
]

_STR = h5py.string_dtype()


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


class atomic_h5:
    """Open ``path`` for writing under a temporary name; rename it into place on success."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.tmp = temporary_path(self.path)

    def __enter__(self) -> h5py.File:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = h5py.File(self.tmp, "w")
        return self.file

    def __exit__(self, kind: object, error: object, trace: object) -> None:
        try:
            self.file.flush()
            self.file.close()
            if kind is None:
                with open(self.tmp, "rb") as handle:
                    os.fsync(handle.fileno())
                os.replace(self.tmp, self.path)
        finally:
            if self.tmp.exists():
                self.tmp.unlink()


def _put_group(group: h5py.Group, arrays: dict[str, np.ndarray]) -> None:
    for name, array in arrays.items():
        group.create_dataset(name, data=np.asarray(array))


def write_shard(path: Path, output: ShardOutput) -> None:
    """Commit ``output`` to ``path`` atomically."""
    with atomic_h5(path) as f:
        for key, value in output.attrs.items():
            f.attrs[key] = json.dumps(value) if isinstance(value, (dict, list)) else value
        images = f.create_group("images")
        images.create_dataset("keys", data=np.array(output.keys, dtype=object), dtype=_STR)
        _put_group(images, {
            "labels": output.labels.astype(np.int64),
            "targets": output.targets.astype(np.int64),
            "predicted": output.predicted.astype(np.int64),
            "target_prob": output.target_prob.astype(np.float32),
        })
        failures = f.create_group("failures")
        failures.create_dataset("keys", data=np.array(list(output.failures), dtype=object), dtype=_STR)
        failures.create_dataset("messages", data=np.array(list(output.failures.values()), dtype=object), dtype=_STR)
        _put_group(f.create_group("maps"), output.maps)
        partial = f.create_group("partial")
        _put_group(partial.create_group("sums"), output.sums)
        _put_group(partial.create_group("constants"), output.constants)
        _put_group(f.create_group("values"), output.values)
        _put_group(f.create_group("curves"), output.curves)


def _read_group(group: h5py.Group) -> dict[str, np.ndarray]:
    return {name: group[name][()] for name in group}


def _strings(dataset: h5py.Dataset) -> list[str]:
    return [s.decode() if isinstance(s, bytes) else str(s) for s in dataset[()]]


def read_shard(path: Path) -> ShardOutput:
    """Load a committed shard file."""
    with h5py.File(path, "r") as f:
        attrs = {}
        for key, value in f.attrs.items():
            attrs[key] = value.item() if isinstance(value, np.generic) else value
        images = f["images"]
        return ShardOutput(
            keys=_strings(images["keys"]),
            labels=images["labels"][()],
            targets=images["targets"][()],
            predicted=images["predicted"][()],
            target_prob=images["target_prob"][()],
            failures=dict(zip(_strings(f["failures/keys"]), _strings(f["failures/messages"]))),
            maps=_read_group(f["maps"]),
            sums=_read_group(f["partial/sums"]),
            constants=_read_group(f["partial/constants"]),
            values=_read_group(f["values"]),
            curves=_read_group(f["curves"]),
            attrs=attrs,
        )
