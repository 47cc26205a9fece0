"""pipeline.run_dir: the run folder's layout, the one-pass scan, error records, atomic writes."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

import pipeline.run_dir as run_dir_module
from pipeline.run_dir import RunDir, atomic_write


def test_shard_files_are_spread_over_prefix_folders(tmp_path: Path) -> None:
    folder = RunDir(tmp_path)
    assert folder.shard("ab12cd") == tmp_path / "shards" / "ab" / "ab12cd.h5"
    assert folder.checkpoint("ab12cd") == tmp_path / "shards" / "ab" / "ab12cd.partial.h5"
    assert folder.error("ab12cd") == tmp_path / "shards" / "ab" / "ab12cd.error.json"
    assert (folder.config.name, folder.plan.name, folder.results.name, folder.jobs.name) == (
        "config.yaml", "plan.json", "results.h5", "jobs.json")


def test_scan_tells_committed_checkpoints_and_errors_apart(tmp_path: Path) -> None:
    folder = RunDir(tmp_path)
    assert folder.scan().committed == frozenset()  # no shards folder yet
    for shard_id in ("aa01", "aa02", "bb03"):
        folder.shard(shard_id).parent.mkdir(parents=True, exist_ok=True)
        folder.shard(shard_id).write_bytes(b"")
    folder.checkpoint("cc04").parent.mkdir(parents=True)
    folder.checkpoint("cc04").write_bytes(b"")
    folder.record_error("aa05", "boom", kind="error")
    (tmp_path / "shards" / "aa" / ".aa06.h5.tmp-1-2").write_bytes(b"partial")  # a write in progress
    (tmp_path / "shards" / "aa" / "notes.txt").write_text("x")
    files = folder.scan()
    assert files.committed == {"aa01", "aa02", "bb03"}
    assert files.checkpoints == {"cc04"}
    assert files.errors == {"aa05"}
    assert folder.committed() == files.committed


def test_scan_lists_each_folder_once_at_thousands_of_shards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = RunDir(tmp_path)
    ids = [f"{i:016x}" for i in range(0, 5000 * 7919, 7919)]
    for shard_id in ids:
        path = folder.shard(shard_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    prefixes = {shard_id[:2] for shard_id in ids}
    assert max(len(os.listdir(tmp_path / "shards" / p)) for p in prefixes) <= len(ids) // len(prefixes) * 2
    listed: list[str] = []
    original = os.scandir

    def counting(path: str | os.PathLike[str]) -> object:
        listed.append(os.fspath(path))
        return original(path)

    monkeypatch.setattr(run_dir_module.os, "scandir", counting)
    assert folder.committed() == set(ids)
    assert len(listed) == len(set(listed)) == 1 + len(prefixes)


def test_error_records(tmp_path: Path) -> None:
    folder = RunDir(tmp_path)
    folder.record_error("s1", "cannot read image x.png", kind="data")
    folder.record_error("s2", "RuntimeError: out of memory", kind="error", log="/logs/s2.err")
    folder.error("s3").parent.mkdir(parents=True)
    folder.error("s3").write_text("{not json")  # a torn record is left out
    errors = folder.errors(["s1", "s2", "s3", "s4"])
    assert set(errors) == {"s1", "s2"}
    assert (errors["s1"]["kind"], errors["s1"]["message"], errors["s1"]["log"]) == (
        "data", "cannot read image x.png", None)
    assert (errors["s2"]["kind"], errors["s2"]["log"], errors["s2"]["shard"]) == ("error", "/logs/s2.err", "s2")
    folder.record_error("s1", "second attempt", kind="error")
    assert folder.read_error("s1")["message"] == "second attempt"  # type: ignore[index]
    folder.clear_error("s1")
    folder.clear_error("never-failed")
    assert folder.read_error("s1") is None
    assert folder.scan().errors == {"s2", "s3"} and folder.committed() == set()


def test_atomic_write_leaves_the_old_file_when_it_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "sub" / "config.yaml"
    atomic_write(path, "first")
    assert path.read_text() == "first"

    def broken_replace(source: object, target: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(run_dir_module.os, "replace", broken_replace)
    with pytest.raises(OSError, match="No space"):
        atomic_write(path, "second")
    assert path.read_text() == "first"
    assert os.listdir(path.parent) == ["config.yaml"]  # no temporary file left behind
