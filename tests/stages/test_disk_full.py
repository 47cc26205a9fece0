"""A full disk is a recorded error naming the folder, never a crash; interrupted writes leave nothing that counts."""
from __future__ import annotations

import contextlib
import errno
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np
import pandas as pd
import pytest

import pipeline.run_dir as run_dir_module
from pipeline.cli import main
from pipeline.config import parse_config
from pipeline.rundir import plan_run
from pipeline.run_dir import STALE_AFTER_S, RunDir
from pipeline.stages import run_shards
from pipeline.store import ShardWriteError, read_shard, write_shard
from tests.tiny_experiment import ConfigFactory, FinishedRun

#: free space left on the small file system once the run is planned: an error record fits, a shard does not
FREE_BYTES = 12 * 1024


@contextlib.contextmanager
def _tmpfs(mount: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` at ``mount`` (skipped where mounting is not allowed)."""
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs."""
    with _tmpfs(tmp_path / "tmpfs", "256k") as mount:
        yield mount


def _fill(mount: Path, leave: int) -> Path:
    """Fill the file system at ``mount`` until ``leave`` bytes are free; returns the filler file."""
    stats = os.statvfs(mount)
    filler = mount / "filler"
    filler.write_bytes(b"\0" * (stats.f_bavail * stats.f_frsize - leave))
    return filler


def _hidden(run_dir: Path) -> list[Path]:
    return [p for p in run_dir.rglob(".*") if p.is_file()]


def test_a_full_disk_fails_each_shard_with_a_recorded_error(make_config: ConfigFactory, small_tmpfs: Path) -> None:
    run_dir = small_tmpfs / "run"
    plan = plan_run(parse_config(make_config()), run_dir)
    _fill(small_tmpfs, FREE_BYTES)
    ids = [s.id for s in plan.shards]
    failed = run_shards(run_dir, ids, progress=False)
    assert set(failed) == set(ids)
    folder = RunDir(run_dir)
    assert folder.committed() == set()
    recorded = folder.errors(ids)
    assert recorded  # as many records as the space left holds (a page each)
    for shard in plan.stage("explain"):
        messages = [failed[shard.id]] + ([recorded[shard.id]["message"]] if shard.id in recorded else [])
        for message in messages:
            assert "No space left on device" in message and str(folder.shard_folder(shard.id)) in message
    assert all(failed[s.id].startswith("skipped") for s in plan.stage("score"))
    assert _hidden(run_dir) == []


def test_an_error_during_the_write_names_the_folder_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = RunDir(tmp_path).shard("abcd")
    from tests.test_store import _output

    def full(descriptor: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(run_dir_module.os, "fsync", full)
    with pytest.raises(ShardWriteError) as error:
        write_shard(path, _output())
    assert error.value.errno == errno.ENOSPC and str(path.parent) in str(error.value)
    assert os.listdir(path.parent) == []


def test_temporaries_of_interrupted_writes_are_removed_by_the_next_run(
    make_config: ConfigFactory, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    plan = plan_run(parse_config(make_config()), run_dir)
    folder = RunDir(run_dir)
    shard = plan.stage("explain")[0]
    ended = subprocess.Popen(["true"])
    ended.wait()
    host = platform.node()
    stale = [
        folder.shard_folder(shard.id) / f".{shard.id}.h5.tmp-{host}-{ended.pid}-456",
        folder.shard_folder(shard.id) / f".{shard.id}.error.json.tmp-other-host-123-456",
        run_dir / f".results.h5.tmp-{host}-{ended.pid}-9",
    ]
    live = [
        folder.shard_folder(shard.id) / f".{shard.id}.h5.tmp-{host}-{os.getpid()}-1",  # a write in progress here
        run_dir / f".summary.md.tmp-other-host-{os.getpid()}-2",  # a recent write of another host
    ]
    for path in stale + live:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    old = time.time() - STALE_AFTER_S - 60
    os.utime(stale[1], (old, old))
    kept = folder.shard_folder(shard.id) / "notes.txt"
    kept.write_text("mine")
    assert sorted(folder.remove_stale_temporaries()) == sorted(stale)
    assert kept.exists() and all(p.exists() for p in live) and not any(p.exists() for p in stale)
    for path in stale:
        path.write_bytes(b"")
    os.utime(stale[1], (old, old))
    assert run_shards(run_dir, [shard.id], progress=False) == {}
    assert not any(p.exists() for p in stale) and read_shard(folder.shard(shard.id)).keys
    for path in stale:
        path.write_bytes(b"")
    os.utime(stale[1], (old, old))
    with folder.locked():  # every command that takes the lock removes them
        assert not any(p.exists() for p in stale) and all(p.exists() for p in live)


@pytest.mark.parametrize("free", ["4k", "half of results.h5"])
def test_a_full_disk_during_reduce_is_an_error_naming_the_folder(
    finished_run: FinishedRun, tmp_path: Path, capsys: pytest.CaptureFixture[str], free: str
) -> None:
    with _tmpfs(tmp_path / "tmpfs", "16m") as mount:
        run_dir = mount / "run"
        shutil.copytree(finished_run.run_dir, run_dir)
        folder = RunDir(run_dir)
        for path in folder.outputs():
            path.unlink(missing_ok=True)
        shards = {p: p.read_bytes() for p in folder.shards.rglob("*.h5")}
        results_size = (finished_run.run_dir / "results.h5").stat().st_size
        filler = _fill(mount, 4096 if free == "4k" else results_size // 2)
        assert main(["reduce", str(run_dir), "--no-progress"]) == 2
        error = capsys.readouterr().err
        assert "No space left on device" in error and str(run_dir) in error
        assert not folder.results.exists() and _hidden(run_dir) == []
        assert {p: p.read_bytes() for p in folder.shards.rglob("*.h5")} == shards  # nothing computed is lost
        filler.unlink()
        assert main(["reduce", str(run_dir), "--no-progress"]) == 0
        with h5py.File(folder.results, "r") as got, h5py.File(finished_run.run_dir / "results.h5", "r") as ref:
            np.testing.assert_array_equal(got["maps/rise/-"][()], ref["maps/rise/-"][()])
        pd.testing.assert_frame_equal(pd.read_parquet(folder.metrics_parquet),
                                      pd.read_parquet(finished_run.run_dir / "metrics.parquet"))
