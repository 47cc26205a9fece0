"""Reduce: merge the committed shards into ``results.h5`` and the metric tables, in one pass.

Every shard file is read once; partial sums are merged with the method's parameters
alone (no model is built); metric rows stream into ``metrics.parquet`` (and
``metrics.csv`` for runs of up to :data:`CSV_MAX_ROWS` rows) and into running
moments for the summary, so memory does not grow with the number of images.

``results.h5`` layout::

    attrs: config_hash, model_digest, class_names (JSON), image_size, maps ("all", "none" or "sample")
    images/keys [N] str, images/labels [N] int64, images/targets [N] int64,
    images/predicted [N] int64, images/target_prob [N] float32,
    images/has_gt [N] bool, images/failed [N] bool,
    images/map_row [N] int64                     row of each image in the maps (-1: not kept)
    maps/<method>/<layer> [K, H, W] float32      K kept images (``results.maps``), chunked one
                                                 map per chunk; NaN rows for images that failed
    curves/<metric>/<method>/<layer> [N, T] float32   (insertion, deletion; randomization: one column per step)
    failures/keys [M] str, failures/messages [M] str

``<method>`` is the method entry's label (its ``id``, default its name) and
``<layer>`` a module name, or ``-`` for methods without layers. Rows follow the
plan's image order (sorted keys). The merged maps do not depend on how the work
was sharded. Metric rows are in the config's order of methods, then by layer, image
chunk and metric. Beside it: ``summary.{csv,md,tex}`` (see :mod:`pipeline.tables`),
``failures.csv``, ``warnings.md`` (see :mod:`pipeline.diagnostics`) and ``comparison.{csv,md}`` (see
:mod:`pipeline.comparison`); their SHA-256 digests are in the attribute ``tables`` of
``results.h5``, which is renamed into place last (see :func:`pipeline.integrity.results_whole`).

``failures.csv`` has the columns :data:`FAILURE_COLUMNS`: a row per image that could not
be read (stage ``explain``, no method, layer or metric), then a row per image, method
entry, layer and metric whose value is NaN for a known reason (stage ``score``: an
unusable saliency map or ground-truth map), in the order of the metric rows.

A shard file that is corrupt is never merged: it is moved to ``shards/corrupt/`` (with
the score shards that read it) and the reduce stops, naming it and ``xai-pipeline resume``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ..comparison import write_comparison
from ..config import ExperimentConfig, ResultsConfig, load_config
from ..diagnostics import RunWarnings, run_warnings, write_warnings
from ..digests import file_digest
from ..errors import PipelineError
from ..integrity import TABLES_ATTRIBUTE, quarantine_shards
from ..metrics import METRICS
from ..planning import Plan, Shard
from ..run_dir import RunDir, atomic_write, temporary_path
from ..store import CorruptShardError, ShardOutput, atomic_h5, read_shard
from ..tables import METRIC_COLUMNS, Moments, write_summary
from .merge import merge_outputs

__all__ = ["ReduceError", "CorruptShardsFound", "ReduceResult", "reduce_run", "kept_map_rows", "CSV_MAX_ROWS",
           "FAILURE_COLUMNS"]

#: runs with more metric rows than this get metrics.parquet only
CSV_MAX_ROWS = 1_000_000
_STR = h5py.string_dtype()
_ROW_GROUP = 1 << 16
#: the columns the comparison between methods reads back
_COMPARED = ["key", "method", "layer", "metric", "value"]
#: the columns of failures.csv
FAILURE_COLUMNS = ["key", "stage", "method", "layer", "metric", "error"]
_SCHEMA = pa.schema([
    ("key", pa.string()), ("label", pa.int64()), ("class_name", pa.string()), ("target", pa.int64()),
    ("predicted", pa.int64()), ("method", pa.string()), ("layer", pa.string()), ("metric", pa.string()),
    ("value", pa.float64()),
])


class ReduceError(PipelineError, RuntimeError):
    """The run cannot be reduced yet (shards are missing or corrupt)."""


class CorruptShardsFound(ReduceError):
    """A shard file was corrupt: it was quarantined, and the run needs it computed again."""


@dataclasses.dataclass
class ReduceResult:
    results: Path
    metrics_path: Path
    summary: pd.DataFrame
    failures: dict[str, str]
    warnings: RunWarnings

    @functools.cached_property
    def metrics(self) -> pd.DataFrame:
        """The per-image metric table (read from ``metrics.parquet`` on first use)."""
        return pd.read_parquet(self.metrics_path)


def kept_map_rows(results: ResultsConfig, count: int, seed: int) -> np.ndarray:
    """The rows (sorted) of the images whose maps ``results.h5`` keeps."""
    if results.maps == "all":
        return np.arange(count, dtype=np.int64)
    if results.maps == "none":
        return np.zeros(0, dtype=np.int64)
    size = min(results.sample_size, count)
    return np.sort(np.random.default_rng(seed).choice(count, size=size, replace=False)).astype(np.int64)


class _MetricRows:
    """Streams metric rows into metrics.parquet (and metrics.csv) and the summary's moments."""

    def __init__(self, run_dir: RunDir, write_csv: bool, group_by_class: bool) -> None:
        self.run_dir = run_dir
        self.group_by_class = group_by_class
        self.moments = Moments()
        self._pending: list[dict[str, Any]] = []
        self._pending_rows = 0
        self._parquet_tmp = temporary_path(run_dir.metrics_parquet)
        self._csv_tmp = temporary_path(run_dir.metrics_csv) if write_csv else None
        try:
            if self._csv_tmp is not None:
                pd.DataFrame(columns=METRIC_COLUMNS).to_csv(self._csv_tmp, index=False)
            self._parquet = pq.ParquetWriter(self._parquet_tmp, _SCHEMA)
        except OSError:
            self._remove_temporaries()
            raise

    def add(self, columns: dict[str, Any]) -> None:
        """Rows of one method, layer and metric: ``method``, ``layer``, ``metric`` are strings, the others arrays."""
        values = columns["value"]
        self.moments.add((columns["method"], columns["layer"], columns["metric"]), values)
        if self.group_by_class:
            for name in np.unique(columns["class_name"]):
                chosen = columns["class_name"] == name
                self.moments.add((columns["method"], columns["layer"], str(name), columns["metric"]), values[chosen])
        self._pending.append(columns)
        self._pending_rows += len(values)
        if self._pending_rows >= _ROW_GROUP:
            self._flush()

    def _flush(self) -> None:
        """Write the pending rows as one row group (one Arrow conversion per column)."""
        if not self._pending:
            return
        counts = [len(part["value"]) for part in self._pending]
        arrays = []
        for name, field in zip(_SCHEMA.names, _SCHEMA):
            parts = [part[name] for part in self._pending]
            if isinstance(parts[0], str):
                column = np.repeat(np.array(parts, dtype=object), counts)
            else:
                column = np.concatenate(parts)
            arrays.append(pa.array(column, type=field.type))
        table = pa.Table.from_arrays(arrays, schema=_SCHEMA)
        self._parquet.write_table(table, row_group_size=max(table.num_rows, 1))
        if self._csv_tmp is not None:
            table.to_pandas().to_csv(self._csv_tmp, mode="a", header=False, index=False)
        self._pending, self._pending_rows = [], 0

    def close(self, committed: bool) -> None:
        """Finish both files; rename them into place when ``committed``, else remove them."""
        try:
            if committed:
                self._flush()
                self._parquet.close()
                self._parquet_tmp.replace(self.run_dir.metrics_parquet)
                if self._csv_tmp is not None:
                    self._csv_tmp.replace(self.run_dir.metrics_csv)
                else:
                    self.run_dir.metrics_csv.unlink(missing_ok=True)
        finally:
            if self._parquet.is_open:
                with contextlib.suppress(OSError):  # a full disk: the file is removed anyway
                    self._parquet.close()
            self._remove_temporaries()

    def _remove_temporaries(self) -> None:
        self._parquet_tmp.unlink(missing_ok=True)
        if self._csv_tmp is not None:
            self._csv_tmp.unlink(missing_ok=True)


def _read(folder: RunDir, plan: Plan, shard: Shard) -> ShardOutput:
    """Shard ``shard``'s output; a corrupt file is quarantined and the reduce stops, saying how to fix it."""
    try:
        output = read_shard(folder.shard(shard.id))
        missing = [m for m in shard.metrics if m not in output.values] if output.keys else []
        if missing:
            raise CorruptShardError(folder.shard(shard.id), f"it has no values of {', '.join(missing)}")
        return output
    except CorruptShardError as error:
        again = quarantine_shards(folder, plan, {shard.id: error.reason})
        raise CorruptShardsFound(
            f"{error}; it is moved to {folder.corrupt} and nothing was merged: "
            f"run `xai-pipeline resume {folder.root}` to compute it again ({len(again)} shard(s)), then reduce"
        ) from None


def _write_rows(dataset: h5py.Dataset, rows: np.ndarray, data: np.ndarray) -> None:
    """``dataset[rows] = data``, as one slice when the rows are consecutive (a chunk's images are)."""
    if len(rows) and rows[-1] - rows[0] == len(rows) - 1 and bool((np.diff(rows) == 1).all()):
        dataset[int(rows[0]) : int(rows[-1]) + 1] = data
    else:
        dataset[rows] = data


def _explain_groups(plan: Plan) -> Iterator[list[Shard]]:
    """The explain shards of each (method entry, image chunk), in plan order, by sample range."""
    groups: dict[tuple[str, tuple[int, int]], list[Shard]] = {}
    for shard in plan.stage("explain"):
        groups.setdefault((shard.method, shard.images), []).append(shard)
    for shards in groups.values():
        yield sorted(shards, key=lambda s: s.samples or (0, 0))


def _score_order(config: ExperimentConfig, plan: Plan) -> list[Shard]:
    """Score shards by method entry (config order), layer (entry order), image chunk and metric group."""
    method_rank = {entry.label: i for i, entry in enumerate(config.methods)}
    layer_rank = {(entry.label, layer): i for entry in config.methods for i, layer in enumerate(entry.layers or [])}
    metric_rank = {m.name: i for i, m in enumerate(config.metrics)}
    return sorted(plan.stage("score"), key=lambda s: (
        method_rank[s.method], layer_rank.get((s.method, s.layers[0]), 0), s.images, metric_rank[s.metrics[0]]))


def _summary_order(config: ExperimentConfig, plan: Plan, group_by_class: bool) -> list[tuple[str, ...]]:
    groups = []
    for entry in config.methods:
        for layer in entry.layers or ["-"]:
            for metric in config.metrics:
                if group_by_class:
                    groups.extend((entry.label, layer, name, metric.name) for name in plan.class_names)
                else:
                    groups.append((entry.label, layer, metric.name))
    return groups


def reduce_run(run_dir: str | Path | RunDir, *, progress: bool | None = None,
               group_by_class: bool = False) -> ReduceResult:
    """Merge every committed shard of ``run_dir``; every planned shard must be committed.

    With ``group_by_class`` the summary tables have a row per method, layer and class.
    """
    from tqdm.auto import tqdm

    folder = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    config = load_config(folder.config)
    plan = Plan.read(folder.plan)
    committed = folder.committed()
    missing = [s for s in plan.shards if s.id not in committed]
    if missing:
        listed = "\n  ".join(s.describe() for s in missing[:10])
        more = f"\n  ... and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise ReduceError(
            f"{folder.root}: {len(missing)} of {len(plan.shards)} shards are not committed; "
            f"run `xai-pipeline resume {folder.root}` (or `status`) first:\n  {listed}{more}"
        )
    quiet = None if progress is None else not progress
    n = plan.image_count
    height, width = config.data.image_size
    row = {key: i for i, key in enumerate(plan.images.keys)}
    labels = np.array(plan.images.labels, np.int64)
    class_names = np.array(plan.class_names, dtype=object)
    targets = np.full(n, -1, np.int64)
    predicted = np.full(n, -1, np.int64)
    target_prob = np.full(n, np.nan, np.float32)
    kept = kept_map_rows(config.results, n, config.seed)
    map_row = np.full(n, -1, np.int64)
    map_row[kept] = np.arange(len(kept))
    failures: dict[str, str] = {}
    nan_reasons: list[tuple[str, ...]] = []  # (key, "score", method, layer, metric, reason)
    mixed: dict[str, list[list[str]]] = {}  # method -> the ways each of its mixed chunks was computed
    score_shards = _score_order(config, plan)
    expected_rows = sum((s.images[1] - s.images[0]) * len(s.metrics) for s in score_shards)
    rows = None
    closed = False
    try:
        rows = _MetricRows(folder, expected_rows <= CSV_MAX_ROWS, group_by_class)
        with atomic_h5(folder.results) as f:
            f.attrs.update(
                config_hash=plan.config_hash,
                model_digest=plan.model_digest,
                class_names=json.dumps(list(plan.class_names)),
                image_size=[height, width],
                maps=config.results.maps,
            )
            datasets: dict[str, h5py.Dataset] = {}
            groups = list(_explain_groups(plan))
            for shards in tqdm(groups, desc="merge", disable=quiet):
                merged = merge_outputs(config, shards, [_read(folder, plan, s) for s in shards])
                if merged.computed_with:
                    mixed.setdefault(shards[0].method, []).append(merged.computed_with)
                indices = np.array([row[k] for k in merged.images.keys], dtype=np.int64)
                failures.update(merged.images.failures)
                if not len(indices):
                    continue
                targets[indices] = merged.images.targets
                predicted[indices] = merged.images.predicted
                target_prob[indices] = merged.images.target_prob
                stored = map_row[indices] >= 0
                for layer, maps in merged.maps.items():
                    name = f"maps/{shards[0].method}/{layer}"
                    if name not in datasets:
                        layout = {"chunks": (1, height, width), "compression": "gzip", "compression_opts": 1}
                        datasets[name] = f.create_dataset(name, shape=(len(kept), height, width), dtype="f4",
                                                          fillvalue=np.nan, **(layout if len(kept) else {}))
                    if stored.any():
                        _write_rows(datasets[name], map_row[indices[stored]], maps[stored])
            for shard in tqdm(score_shards, desc="scores", disable=quiet):
                output = _read(folder, plan, shard)
                layer = shard.layers[0]
                indices = np.array([row[k] for k in output.keys], dtype=np.int64)
                if not len(indices):
                    continue
                keys = np.array(output.keys, dtype=object)
                for metric in shard.metrics:
                    rows.add({
                        "key": keys, "label": labels[indices], "class_name": class_names[labels[indices]],
                        "target": targets[indices], "predicted": predicted[indices], "method": shard.method,
                        "layer": layer, "metric": metric, "value": output.values[metric].astype(np.float64),
                    })
                    nan_reasons.extend((key, "score", shard.method, layer, metric, reason)
                                       for key, reason in zip(output.keys, output.reasons.get(metric, ())) if reason)
                for metric, curve in output.curves.items():
                    name = f"curves/{metric}/{shard.method}/{layer}"
                    if name not in datasets:
                        datasets[name] = f.create_dataset(name, shape=(n, curve.shape[1]), dtype="f4",
                                                          fillvalue=np.nan)
                    _write_rows(datasets[name], indices, curve)
            images = f.create_group("images")
            images.create_dataset("keys", data=np.array(plan.images.keys, dtype=object), dtype=_STR)
            images.create_dataset("labels", data=labels)
            images.create_dataset("targets", data=targets)
            images.create_dataset("predicted", data=predicted)
            images.create_dataset("target_prob", data=target_prob)
            images.create_dataset("has_gt", data=np.array([gt is not None for gt in plan.images.gt]))
            images.create_dataset("failed", data=np.array([key in failures for key in plan.images.keys]))
            images.create_dataset("map_row", data=map_row)
            group = f.create_group("failures")
            group.create_dataset("keys", data=np.array(list(failures), dtype=object), dtype=_STR)
            group.create_dataset("messages", data=np.array(list(failures.values()), dtype=object), dtype=_STR)
            closed = True
            rows.close(committed=True)
            columns = ["method", "layer"] + (["class_name"] if group_by_class else []) + ["metric"]
            summary = rows.moments.frame(columns, _summary_order(config, plan, group_by_class))
            write_summary(summary, folder.root, group_by_class=group_by_class)
            write_comparison(pd.read_parquet(folder.metrics_parquet, columns=_COMPARED), folder.root)
            unread = [(key, "explain", "", "", "", error) for key, error in failures.items()]
            table = pd.DataFrame(unread + nan_reasons, columns=FAILURE_COLUMNS)
            atomic_write(folder.failures_csv, table.to_csv(index=False))
            gt_metrics = [m.name for m in config.metrics if METRICS[m.name].needs_ground_truth]
            overall = rows.moments.frame(["method", "layer", "metric"], _summary_order(config, plan, False))
            warnings = run_warnings(table, overall, ground_truth_metrics=gt_metrics,
                                    images_with_gt=sum(gt is not None for gt in plan.images.gt),
                                    mixed_computations=mixed)
            write_warnings(folder.warnings_md, warnings)
            written = [p for p in folder.outputs() if p != folder.results and p.is_file()]
            f.attrs[TABLES_ATTRIBUTE] = json.dumps({p.name: file_digest(p) for p in written})
    except OSError as error:  # a full disk, a quota: the shards are untouched
        raise ReduceError(f"cannot write the results into {folder.root}: {error}; the committed shards are "
                          f"untouched: free space, then `xai-pipeline reduce {folder.root}`") from error
    finally:
        if rows is not None and not closed:
            rows.close(committed=False)
    return ReduceResult(folder.results, folder.metrics_parquet, summary, failures, warnings)
