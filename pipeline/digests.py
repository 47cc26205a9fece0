"""Content digests: what identifies shards, configs, models and files.

Every digest is SHA-256; :func:`json_digest` hashes canonical JSON (sorted keys, no
spaces, non-JSON values as ``str``), so equal content gives equal digests anywhere.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable

__all__ = ["json_digest", "file_digest", "content_digest", "DIGEST_LENGTH"]

#: hexadecimal characters kept of a JSON digest (64 bits: collisions are out of reach)
DIGEST_LENGTH = 16


def json_digest(payload: Any) -> str:
    """The first :data:`DIGEST_LENGTH` hex characters of the SHA-256 of ``payload`` as canonical JSON."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:DIGEST_LENGTH]


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes (hex)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def content_digest(parts: Iterable[tuple[str, bytes]]) -> str:
    """SHA-256 (hex) of named byte strings, each framed by its name and length (order matters)."""
    digest = hashlib.sha256()
    for name, data in parts:
        digest.update(f"{name}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()
