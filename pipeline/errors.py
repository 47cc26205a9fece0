"""The base of every error a user can act on: its message names the file, field or shard."""
from __future__ import annotations

__all__ = ["PipelineError"]


class PipelineError(Exception):
    """Bad input or state that the user can fix; the CLI prints it without a traceback."""
