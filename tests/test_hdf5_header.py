"""pipeline.hdf5_header: whole, empty, cut and foreign files told apart from the superblock alone,
for every superblock version h5py writes, against the sizes HDF5 itself wrote."""
from __future__ import annotations

import io
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline.hdf5_header import header_problem


@pytest.fixture(params=["earliest", "v108", "latest"])
def written(request: pytest.FixtureRequest) -> bytes:
    """A small HDF5 file image, written with superblock version 0, 2 and 3."""
    buffer = io.BytesIO()
    with h5py.File(buffer, "w", libver=request.param) as f:
        f.create_dataset("maps/x", data=np.arange(2000.0), fletcher32=True)
        f.attrs["schema"] = '["maps/x"]'
    return buffer.getvalue()


def test_a_whole_file_passes_and_opens(written: bytes, tmp_path: Path) -> None:
    path = tmp_path / "whole.h5"
    path.write_bytes(written)
    assert header_problem(path) is None
    with h5py.File(path, "r") as f:
        assert f["maps/x"][-1] == 1999.0
    path.write_bytes(written + bytes(100))  # longer than written: HDF5 opens it too
    assert header_problem(path) is None


@pytest.mark.parametrize("keep", [1, 8, 51, 52, 400, -1])
def test_a_cut_file_is_named_truncated(written: bytes, tmp_path: Path, keep: int) -> None:
    path = tmp_path / "cut.h5"
    path.write_bytes(written[:keep])
    problem = header_problem(path)
    assert problem is not None and problem.startswith(f"{path}: ")
    assert "truncated" in problem or "not an HDF5 file" in problem  # 1 byte cannot hold the signature
    with pytest.raises(OSError):
        h5py.File(path, "r").close()  # what the check foresees, HDF5 confirms


def test_empty_foreign_and_missing_files(tmp_path: Path) -> None:
    empty, foreign = tmp_path / "empty.h5", tmp_path / "foreign.h5"
    empty.write_bytes(b"")
    foreign.write_bytes(b"PK\x03\x04" + bytes(500))
    assert header_problem(empty) == f"{empty}: the file is empty"
    assert header_problem(foreign) == f"{foreign}: not an HDF5 file (no HDF5 signature at its start)"
    assert "cannot be opened" in header_problem(tmp_path / "missing.h5")
