"""pipeline.store: shard files round-trip, atomic commits."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

import pipeline.store as store
from pipeline.errors import PipelineError
from pipeline.run_dir import RunDir
from pipeline.store import ShardOutput, library_versions, read_shard, write_shard


def _output(seed: int = 0) -> ShardOutput:
    rng = np.random.default_rng(seed)
    return ShardOutput(
        keys=["a/x", "b/y", "c/z"],
        labels=np.array([0, 1, 2]),
        targets=np.array([2, 1, 0], dtype=np.int32),
        predicted=np.array([2, 2, 0]),
        target_prob=np.array([0.5, 0.25, 0.125], dtype=np.float64),
        failures={"a/broken": "cannot read image a/broken.png: bad", "c/ü": "ünïcode message"},
        maps={"layer3": rng.random((3, 4, 5)).astype(np.float32), "-": rng.random((3, 4, 5)).astype(np.float32)},
        sums={"weighted": rng.random((3, 4, 5)), "count": np.full(3, 7.0)},
        constants={"segments": rng.integers(0, 9, size=(3, 4, 5))},
        values={"insertion": rng.random(3), "pcc": np.array([0.5, np.nan, -0.25])},
        curves={"insertion": rng.random((3, 6)).astype(np.float32)},
        attrs={"shard_id": "abc", "stage": "explain", "next_sample": 64, "wall_time_s": 1.5, "resumed": True,
               "versions": {"torch": "2.x"}, "layers": ["layer3", "-"]},
    )


def test_every_field_round_trips(tmp_path: Path) -> None:
    output = _output()
    path = RunDir(tmp_path).shard("abc")
    write_shard(path, output)
    back = read_shard(path)
    assert back.keys == output.keys
    for name, dtype in (("labels", np.int64), ("targets", np.int64), ("predicted", np.int64),
                        ("target_prob", np.float32)):
        array = getattr(back, name)
        assert array.dtype == dtype, name
        np.testing.assert_array_equal(array, getattr(output, name).astype(dtype))
    assert back.failures == output.failures
    for group in ("maps", "sums", "constants", "values", "curves"):
        written, read = getattr(output, group), getattr(back, group)
        assert read.keys() == written.keys(), group
        for name, array in written.items():
            assert read[name].dtype == array.dtype, (group, name)
            np.testing.assert_array_equal(read[name], array)
    attrs = back.attrs
    assert (attrs["shard_id"], attrs["stage"], attrs["next_sample"], attrs["wall_time_s"], attrs["resumed"]) == (
        "abc", "explain", 64, 1.5, True)
    assert type(attrs["next_sample"]) is int and type(attrs["wall_time_s"]) is float
    assert json.loads(attrs["versions"]) == {"torch": "2.x"}  # dicts and lists are stored as JSON text
    assert json.loads(attrs["layers"]) == ["layer3", "-"]


def test_an_empty_output_round_trips(tmp_path: Path) -> None:
    empty = ShardOutput(keys=[], labels=np.zeros(0, int), targets=np.zeros(0, int), predicted=np.zeros(0, int),
                        target_prob=np.zeros(0, np.float32))
    write_shard(tmp_path / "e.h5", empty)
    back = read_shard(tmp_path / "e.h5")
    assert back.keys == [] and back.failures == {} and back.maps == {} and back.values == {}
    assert back.labels.shape == (0,)


def test_file_layout_matches_the_documentation(tmp_path: Path) -> None:
    write_shard(tmp_path / "s.h5", _output())
    with h5py.File(tmp_path / "s.h5", "r") as f:
        names: list[str] = []
        f.visit(names.append)
    assert {"images/keys", "images/labels", "images/targets", "images/predicted", "images/target_prob",
            "failures/keys", "failures/messages", "maps/layer3", "maps/-", "partial/sums/weighted",
            "partial/sums/count", "partial/constants/segments", "values/insertion", "values/pcc",
            "curves/insertion"} <= set(names)


def test_a_write_that_fails_midway_commits_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = RunDir(tmp_path).shard("abc")
    original = store._put_group

    def failing(group: h5py.Group, arrays: dict[str, np.ndarray]) -> None:
        if group.name == "/values":
            raise RuntimeError("disk on fire")
        original(group, arrays)

    monkeypatch.setattr(store, "_put_group", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_shard(path, _output())
    assert not path.exists()
    assert os.listdir(path.parent) == []  # no temporary file left either
    assert RunDir(tmp_path).committed() == set()

    monkeypatch.setattr(store, "_put_group", original)
    write_shard(path, _output(seed=1))
    monkeypatch.setattr(store, "_put_group", failing)
    with pytest.raises(RuntimeError):
        write_shard(path, _output(seed=2))  # a failed rewrite keeps the committed file whole
    np.testing.assert_array_equal(read_shard(path).maps["layer3"], _output(seed=1).maps["layer3"])
    assert os.listdir(path.parent) == [path.name]
    assert RunDir(tmp_path).committed() == {"abc"}


def test_a_writer_killed_midway_leaves_nothing(tmp_path: Path) -> None:
    path = RunDir(tmp_path).shard("killed")
    script = textwrap.dedent(f"""
        import sys, time
        import numpy as np
        import pipeline.store as store

        original = store._put_group

        def slow(group, arrays):
            original(group, arrays)
            if group.name == "/maps":
                print("maps written", flush=True)
                time.sleep(60)

        store._put_group = slow
        output = store.ShardOutput(
            keys=["k"] * 64, labels=np.zeros(64), targets=np.zeros(64), predicted=np.zeros(64),
            target_prob=np.zeros(64), maps={{"layer": np.ones((64, 128, 128), np.float32)}},
        )
        store.write_shard(store.Path({str(path)!r}), output)
    """)
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "maps written"
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
    finally:
        process.kill()
        process.wait()
    assert not path.exists()
    assert RunDir(tmp_path).committed() == set()
    assert os.listdir(path.parent) == []  # the file is built in memory: nothing reached the disk


def test_library_versions_name_the_stack() -> None:
    versions = library_versions()
    assert {"xai_pipeline", "torch", "torchvision", "numpy", "h5py", "python"} <= versions.keys()
    assert versions["numpy"] == np.__version__


def test_every_dataset_is_checksummed_and_the_schema_and_digest_are_recorded(tmp_path: Path) -> None:
    output = _output()
    write_shard(tmp_path / "s.h5", output)
    with h5py.File(tmp_path / "s.h5", "r") as f:
        datasets: list[str] = []
        f.visititems(lambda name, item: datasets.append(name) if isinstance(item, h5py.Dataset) else None)
        assert all(f[name].fletcher32 for name in datasets)
        assert sorted(json.loads(f.attrs["schema"])) == sorted(datasets)
        assert len(f.attrs["digest"]) == 64
    assert "schema" not in read_shard(tmp_path / "s.h5").attrs
    empty = ShardOutput(keys=[], labels=np.zeros(0, int), targets=np.zeros(0, int), predicted=np.zeros(0, int),
                        target_prob=np.zeros(0, np.float32))
    write_shard(tmp_path / "e.h5", empty)
    assert store.verify_shard(tmp_path / "e.h5", deep=True) is None


def _corrupt(path: Path, how: str) -> None:
    """Damage a shard file the way the issue found them damaged."""
    if how == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif how == "zero bytes":
        path.write_bytes(b"")
    elif how == "garbage":
        path.write_bytes(os.urandom(4096))
    elif how == "flipped byte":  # inside a dataset's chunk: Fletcher-32 catches it
        data = bytearray(path.read_bytes())
        with h5py.File(path, "r") as f:
            chunk = f["maps/layer3"].id.get_chunk_info(0).byte_offset
        data[chunk + 8] ^= 0xFF
        path.write_bytes(bytes(data))
    elif how == "dataset deleted":
        with h5py.File(path, "a") as f:
            del f["maps/layer3"]
    elif how == "zeros written":
        with h5py.File(path, "a") as f:
            f["maps/layer3"][...] = 0
    elif how == "attribute edited":
        with h5py.File(path, "a") as f:
            f.attrs["next_sample"] = 32
    elif how == "rows dropped":
        with h5py.File(path, "a") as f:
            values = f["values/pcc"][()]
            del f["values/pcc"]
            f["values/pcc"] = values[:2]


CHEAPLY_FOUND = ["truncated", "zero bytes", "garbage", "dataset deleted"]
DEEPLY_FOUND = ["flipped byte", "zeros written", "attribute edited", "rows dropped"]


@pytest.mark.parametrize("how", CHEAPLY_FOUND + DEEPLY_FOUND)
def test_a_damaged_shard_is_refused_naming_the_file(tmp_path: Path, how: str) -> None:
    path = RunDir(tmp_path).shard("abc")
    write_shard(path, _output())
    assert store.verify_shard(path, deep=True) is None
    _corrupt(path, how)
    with pytest.raises(store.CorruptShardError) as error:
        read_shard(path)
    assert str(path) in str(error.value) and error.value.path == path
    assert isinstance(error.value, PipelineError)
    deep = store.verify_shard(path, deep=True)
    assert deep is not None and deep.startswith(str(path)) and "\n" not in deep
    cheap = store.verify_shard(path, deep=False)
    assert (cheap is not None) == (how in CHEAPLY_FOUND)
    if how == "dataset deleted":
        assert "maps/layer3" in cheap  # type: ignore[operator]


def test_a_file_without_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "old.h5"
    with h5py.File(path, "w") as f:
        f["images/keys"] = np.array([b"a"])
    assert "no schema" in store.verify_shard(path, deep=False)  # type: ignore[operator]
    with pytest.raises(store.CorruptShardError, match="no schema"):
        read_shard(path)
