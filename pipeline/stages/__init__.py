"""The stages of a run: explain and score shards, committed by one step, then the reduce.

- :mod:`~pipeline.stages.explain`: maps (or partial sums) of one method entry on an image chunk.
- :mod:`~pipeline.stages.score`: metric values of merged maps on an image chunk.
- :mod:`~pipeline.stages.runner`: :class:`ShardRunner` runs shards by id and commits them.
- :mod:`~pipeline.stages.reduce`: merges every shard into ``results.h5`` and the tables.
"""
from __future__ import annotations

from .reduce import CorruptShardsFound, ReduceError, ReduceResult, reduce_run
from .runner import ShardError, ShardRunner, commit_shard, run_shards

__all__ = ["ShardRunner", "ShardError", "run_shards", "commit_shard", "reduce_run", "ReduceError", "CorruptShardsFound",
           "ReduceResult"]
