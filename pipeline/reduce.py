"""Reduce: merge the committed shards into ``results.h5`` and the metric tables.

``results.h5`` layout::

    attrs: config_hash, model_digest, class_names (JSON), image_size
    images/keys [N] str, images/labels [N] int64, images/targets [N] int64,
    images/predicted [N] int64, images/target_prob [N] float32,
    images/has_gt [N] bool, images/failed [N] bool
    maps/<method>/<layer> [N, H, W] float32     chunked one map per chunk, gzip;
                                                NaN rows for images that failed
    curves/<metric>/<method>/<layer> [N, T] float32   (insertion, deletion)
    failures/keys [M] str, failures/messages [M] str

``<method>`` is the method entry's label (its ``id``, default its name) and
``<layer>`` a module name, or ``-`` for methods without layers. Rows follow the
plan's image order (sorted keys). The merged maps do not depend on how the work
was sharded. Beside it: ``metrics.csv``, ``summary.{csv,md,tex}`` and
``failures.csv`` (see :mod:`pipeline.tables`).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from .config import load_config
from .errors import PipelineError
from .merge import merge_chunk
from .models import build_model
from .planning import PLAN_FILE, Plan, Shard
from .store import atomic_h5, committed_ids, read_shard, shard_path
from .tables import METRIC_COLUMNS, write_tables
from .worker import CONFIG_FILE

__all__ = ["ReduceError", "ReduceResult", "reduce_run", "RESULTS_FILE"]

RESULTS_FILE = "results.h5"
_STR = h5py.string_dtype()


class ReduceError(PipelineError, RuntimeError):
    """The run cannot be reduced yet (shards are missing)."""


@dataclasses.dataclass
class ReduceResult:
    results: Path
    metrics: pd.DataFrame
    summary: pd.DataFrame
    failures: dict[str, str]


def _group(shards: list[Shard]) -> dict[tuple[str, tuple[int, int]], list[Shard]]:
    groups: dict[tuple[str, tuple[int, int]], list[Shard]] = {}
    for shard in shards:
        groups.setdefault((shard.method, shard.images), []).append(shard)
    return groups


def reduce_run(run_dir: Path, *, progress: bool | None = None, group_by_class: bool = False) -> ReduceResult:
    """Merge every committed shard of ``run_dir``; every planned shard must be committed.

    With ``group_by_class`` the summary tables have a row per method, layer and class.
    """
    from tqdm.auto import tqdm

    run_dir = Path(run_dir)
    config = load_config(run_dir / CONFIG_FILE)
    plan = Plan.read(run_dir / PLAN_FILE)
    missing = [s for s in plan.shards if s.id not in committed_ids(run_dir)]
    if missing:
        listed = "\n  ".join(s.describe() for s in missing[:10])
        more = f"\n  ... and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise ReduceError(
            f"{run_dir}: {len(missing)} of {len(plan.shards)} shards are not committed; "
            f"run `xai-pipeline resume {run_dir}` (or `status`) first:\n  {listed}{more}"
        )
    model = build_model(config.model)
    records = plan.records
    row = {r.key: i for i, r in enumerate(records)}
    n = len(records)
    height, width = config.data.image_size
    targets = np.full(n, -1, np.int64)
    predicted = np.full(n, -1, np.int64)
    target_prob = np.full(n, np.nan, np.float32)
    failures: dict[str, str] = {}
    frames: list[pd.DataFrame] = []
    labels = np.array([r.label for r in records], np.int64)
    class_names = np.array(plan.class_names, dtype=object)
    explain_groups = _group(plan.stage("explain"))
    score_shards = plan.stage("score")
    with atomic_h5(run_dir / RESULTS_FILE) as f:
        f.attrs.update(
            config_hash=plan.config_hash,
            model_digest=plan.model_digest,
            class_names=json.dumps(list(plan.class_names)),
            image_size=[height, width],
        )
        for (method, chunk), shards in tqdm(explain_groups.items(), desc="merge", disable=_quiet(progress)):
            merged = merge_chunk(run_dir, config, shards, model)
            indices = [row[k] for k in merged.images.keys]
            failures.update(merged.images.failures)
            if not indices:
                continue
            targets[indices] = merged.images.targets
            predicted[indices] = merged.images.predicted
            target_prob[indices] = merged.images.target_prob
            for layer, maps in merged.maps.items():
                name = f"maps/{method}/{layer}"
                if name not in f:
                    f.create_dataset(
                        name, shape=(n, height, width), dtype="f4", chunks=(1, height, width),
                        compression="gzip", compression_opts=4, fillvalue=np.nan,
                    )
                f[name][indices] = maps
        for shard in tqdm(score_shards, desc="scores", disable=_quiet(progress)):
            output = read_shard(shard_path(run_dir, shard.id))
            layer = shard.layers[0]
            indices = np.array([row[k] for k in output.keys], dtype=np.int64)
            if not len(indices):
                continue
            for metric, values in output.values.items():
                frames.append(pd.DataFrame({
                    "key": output.keys, "label": labels[indices], "class_name": class_names[labels[indices]],
                    "target": targets[indices], "predicted": predicted[indices],
                    "method": shard.method, "layer": layer, "metric": metric, "value": values.astype(np.float64),
                }))
            for metric, curve in output.curves.items():
                name = f"curves/{metric}/{shard.method}/{layer}"
                if name not in f:
                    f.create_dataset(name, shape=(n, curve.shape[1]), dtype="f4", fillvalue=np.nan)
                f[name][list(indices)] = curve
        images = f.create_group("images")
        images.create_dataset("keys", data=np.array(plan.keys, dtype=object), dtype=_STR)
        images.create_dataset("labels", data=labels)
        images.create_dataset("targets", data=targets)
        images.create_dataset("predicted", data=predicted)
        images.create_dataset("target_prob", data=target_prob)
        images.create_dataset("has_gt", data=np.array([r.gt_path is not None for r in records]))
        images.create_dataset("failed", data=np.array([r.key in failures for r in records]))
        group = f.create_group("failures")
        group.create_dataset("keys", data=np.array(list(failures), dtype=object), dtype=_STR)
        group.create_dataset("messages", data=np.array(list(failures.values()), dtype=object), dtype=_STR)
    metrics = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=METRIC_COLUMNS)
    metrics = _config_order(metrics, [m.label for m in config.methods], [m.name for m in config.metrics])
    summary = write_tables(metrics, run_dir, group_by_class=group_by_class)
    pd.DataFrame({"key": list(failures), "error": list(failures.values())}).to_csv(
        run_dir / "failures.csv", index=False
    )
    return ReduceResult(run_dir / RESULTS_FILE, metrics, summary, failures)


def _config_order(metrics: pd.DataFrame, methods: list[str], names: list[str]) -> pd.DataFrame:
    """Rows in the config's order of methods and metrics, then by layer and image key."""
    rank_method = metrics["method"].map({m: i for i, m in enumerate(methods)})
    rank_metric = metrics["metric"].map({m: i for i, m in enumerate(names)})
    order = metrics.assign(_m=rank_method, _k=rank_metric).sort_values(["_m", "layer", "_k", "key"], kind="stable")
    return order.drop(columns=["_m", "_k"]).reset_index(drop=True)


def _quiet(progress: bool | None) -> bool | None:
    """tqdm's ``disable``: None shows the bar only on a terminal."""
    return None if progress is None else not progress
