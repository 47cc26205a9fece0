"""A cheap check that an HDF5 file is whole, from its superblock alone.

The superblock at the start of every HDF5 file (format specification, "Superblock",
versions 0-3) records the end-of-file address: the size the library wrote. A file that
is empty, not HDF5, or shorter than that address was cut or overwritten after it was
written. One ``pread`` of 64 bytes and one ``fstat`` per file, with no HDF5 library,
so ``status`` can check tens of thousands of committed shards in a fraction of a second;
what this cannot see (a changed byte inside) is left to the checksums of ``--verify``.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Mapping

__all__ = ["SIGNATURE", "header_problem", "header_problems"]

#: threads checking files at once: on a parallel file system the latency of each open dominates,
#: and threads overlap it (on a local disk they neither help nor cost)
_READERS = 8
#: the 8 bytes every HDF5 file starts with (no user block in the files the pipeline writes)
SIGNATURE = b"\x89HDF\r\n\x1a\n"

#: offset of the base address (the first of the addresses before the end-of-file address) per superblock version
_BASE_ADDRESS_OFFSET = {0: 24, 1: 28, 2: 12, 3: 12}
#: bytes read: every superblock version's addresses up to the end-of-file address (8-byte addresses)
_HEADER_BYTES = 52
#: where the size of an address ("size of offsets") is stored, per superblock version
_SIZE_OF_OFFSETS_AT = {0: 13, 1: 13, 2: 9, 3: 9}


def _end_of_file(header: bytes) -> int | None:
    """The absolute end-of-file address the superblock records (None: not a superblock this can read);
    ``header`` holds at least the superblock's addresses."""
    version = header[8]
    size = header[_SIZE_OF_OFFSETS_AT[version]] if version in _SIZE_OF_OFFSETS_AT else 0
    if size not in (2, 4, 8):
        return None
    start = _BASE_ADDRESS_OFFSET[version]
    base = int.from_bytes(header[start:start + size], "little")
    end = int.from_bytes(header[start + 2 * size:start + 3 * size], "little")
    undefined = (1 << (8 * size)) - 1
    return None if undefined in (base, end) else base + end


def header_problem(path: str | Path) -> str | None:
    """None when ``path`` starts with an HDF5 superblock and is at least as long as the size it
    records; else one line saying what is wrong (empty, not HDF5, truncated), naming the file."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError as error:
        return f"{path}: cannot be opened ({error.strerror or error})"
    try:
        header = os.pread(descriptor, _HEADER_BYTES, 0)
        size = os.fstat(descriptor).st_size
    except OSError as error:
        return f"{path}: cannot be read ({error.strerror or error})"
    finally:
        os.close(descriptor)
    if size == 0:
        return f"{path}: the file is empty"
    if not header.startswith(SIGNATURE):
        return f"{path}: not an HDF5 file (no HDF5 signature at its start)"
    if len(header) < _HEADER_BYTES:
        return f"{path}: truncated inside its HDF5 superblock ({size} bytes)"
    end = _end_of_file(header)
    if end is None:
        return f"{path}: its HDF5 superblock cannot be read"
    if size < end:
        return f"{path}: truncated ({size} bytes of the {end} written)"
    return None


def header_problems(paths: Mapping[str, str | Path]) -> dict[str, str]:
    """``{key: problem}`` of the files among ``{key: path}`` whose :func:`header_problem` is not None."""
    items = list(paths.items())

    def check(part: list[tuple[str, str | Path]]) -> dict[str, str]:
        found = ((key, header_problem(path)) for key, path in part)
        return {key: problem for key, problem in found if problem is not None}

    with ThreadPoolExecutor(_READERS) as pool:
        parts = pool.map(check, [items[k::_READERS] for k in range(_READERS)])
    found = {key: problem for part in parts for key, problem in part.items()}
    return {key: found[key] for key in paths if key in found}
