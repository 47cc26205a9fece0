"""A cheap check that an HDF5 file is whole, from its superblock alone.

The superblock at the start of every HDF5 file (format specification, "Superblock",
versions 0-3) records the end-of-file address: the size the library wrote. A file that
is empty, not HDF5, or shorter than that address was cut or overwritten after it was
written. One ``pread`` of the superblock and one ``fstat``, with no HDF5 library: the
cheap check of a shard (:func:`pipeline.store.verify_shard`) names a cut file this way
before HDF5 opens it; what this cannot see (a changed byte inside) is left to the
checksums of ``--verify``.
"""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["SIGNATURE", "header_problem"]

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

