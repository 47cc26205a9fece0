"""A full disk is a recorded error naming the folder, never a crash; interrupted writes leave nothing that counts."""
from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

import pipeline.run_dir as run_dir_module
from pipeline.config import parse_config
from pipeline.rundir import plan_run
from pipeline.run_dir import RunDir
from pipeline.stages import run_shards
from pipeline.store import ShardWriteError, read_shard, write_shard
from tests.tiny_experiment import ConfigFactory

#: free space left on the small file system once the run is planned: an error record fits, a shard does not
FREE_BYTES = 12 * 1024


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs (skipped where mounting is not allowed)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def _hidden(run_dir: Path) -> list[Path]:
    return [p for p in run_dir.rglob(".*") if p.is_file()]


def test_a_full_disk_fails_each_shard_with_a_recorded_error(make_config: ConfigFactory, small_tmpfs: Path) -> None:
    run_dir = small_tmpfs / "run"
    plan = plan_run(parse_config(make_config()), run_dir)
    stats = os.statvfs(small_tmpfs)
    (small_tmpfs / "filler").write_bytes(b"\0" * (stats.f_bavail * stats.f_frsize - FREE_BYTES))
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
    stale = [
        folder.shard_folder(shard.id) / f".{shard.id}.h5.tmp-123-456",
        folder.shard_folder(shard.id) / f".{shard.id}.error.json.tmp-123-456",
        run_dir / ".results.h5.tmp-9-9",
    ]
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    kept = folder.shard_folder(shard.id) / "notes.txt"
    kept.write_text("mine")
    assert sorted(folder.remove_stale_temporaries()) == sorted(stale)
    assert kept.exists() and not any(p.exists() for p in stale)
    for path in stale:
        path.write_bytes(b"")
    assert run_shards(run_dir, [shard.id], progress=False) == {}
    assert not any(p.exists() for p in stale) and read_shard(folder.shard(shard.id)).keys
