"""Reading a finished run: :func:`load_run` and the :class:`Run` it returns.

A :class:`Run` reads the small per-image arrays of ``results.h5`` once (keys, labels,
targets, predictions, target probabilities, ground-truth and failure flags) and
everything else on demand: :meth:`Run.maps` and :meth:`Run.curves` open the file,
read only the rows asked for from one dataset and close it again; ``metrics.parquet``
is read the first time :attr:`Run.metrics` is used. Rows follow the plan's image
order (sorted keys), the order of :attr:`Run.images`.

A *view* is one (method, layer) pair of the results: ``("gradcam", "layer3")``, or
``("rise", "-")`` for a method without layers (see :data:`pipeline.planning.NO_LAYER`).
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np
import pandas as pd

from ..config import ExperimentConfig, load_config
from ..data import ImageRecord, load_data_gt, load_data_image
from ..planning import NO_LAYER, Plan
from ..run_dir import RunDir
from ..tables import summarize

__all__ = ["Run", "load_run", "view_label", "View"]

#: one (method label, layer) pair of the results
View = tuple[str, str]



def view_label(method: str, layer: str) -> str:
    """How a view is named in figures and tables: ``gradcam / layer3``, or ``rise`` without a layer."""
    return method if layer == NO_LAYER else f"{method} / {layer}"


def _names(dataset: h5py.Dataset) -> list[str]:
    return [value.decode() if isinstance(value, bytes) else str(value) for value in dataset[()]]


class Run:
    """A finished (reduced) run folder; see the module docstring."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir)
        folder = RunDir(self.path)
        self.results_path = folder.results
        if not self.results_path.is_file():
            raise FileNotFoundError(
                f"{self.results_path} does not exist: reduce the run first (`xai-pipeline reduce {self.path}`)"
            )
        self.config: ExperimentConfig = load_config(folder.config)
        plan = Plan.read(folder.plan)
        self._records = {record.key: record for record in plan.records}
        with h5py.File(self.results_path, "r") as f:
            self.class_names: list[str] = json.loads(f.attrs["class_names"])
            height, width = (int(v) for v in f.attrs["image_size"])
            self.image_size = (height, width)
            images = f["images"]
            keys = _names(images["keys"])
            columns = {name: images[name][()] for name in
                       ("labels", "targets", "predicted", "target_prob", "has_gt", "failed", "map_row")}
            datasets: list[str] = []
            f.visititems(lambda name, item: datasets.append(name) if isinstance(item, h5py.Dataset) else None)
            failures = f["failures"]
            self.failures = pd.DataFrame({"key": _names(failures["keys"]), "error": _names(failures["messages"])})
        self.images = pd.DataFrame({
            "key": keys,
            "label": columns["labels"],
            "class_name": [self._class_name(i) for i in columns["labels"]],
            "target": columns["targets"],
            "target_name": [self._class_name(i) for i in columns["targets"]],
            "predicted": columns["predicted"],
            "predicted_name": [self._class_name(i) for i in columns["predicted"]],
            "target_prob": columns["target_prob"],
            "has_gt": columns["has_gt"].astype(bool),
            "failed": columns["failed"].astype(bool),
        })
        self._row = {key: row for row, key in enumerate(keys)}
        self._map_row = columns["map_row"]
        self._maps: dict[str, list[str]] = {}
        self._curves: dict[str, dict[str, list[str]]] = {}
        for name in datasets:
            parts = name.split("/")
            if parts[0] == "maps" and len(parts) == 3:
                self._maps.setdefault(parts[1], []).append(parts[2])
            elif parts[0] == "curves" and len(parts) == 4:
                self._curves.setdefault(parts[1], {}).setdefault(parts[2], []).append(parts[3])

    def __repr__(self) -> str:
        return (f"Run({str(self.path)!r}: {len(self.images)} images ({int(self.images['failed'].sum())} failed), "
                f"methods {', '.join(self.methods)}, metrics {', '.join(self.metric_names)})")

    def _class_name(self, index: int) -> str | None:
        return self.class_names[index] if 0 <= index < len(self.class_names) else None

    # -- what the file holds ---------------------------------------------------------------

    @property
    def methods(self) -> list[str]:
        """Method labels that have maps, in the config's order."""
        present = self._maps
        ordered = [entry.label for entry in self.config.methods if entry.label in present]
        return ordered + [name for name in present if name not in ordered]

    def layers(self, method: str) -> list[str]:
        """The layers of ``method`` that have maps (``["-"]`` for a method without layers)."""
        if method not in self._maps:
            known = ", ".join(self.methods)
            raise ValueError(f"method {method!r} has no maps in {self.results_path}; methods: {known}")
        present = self._maps[method]
        entry = next((e for e in self.config.methods if e.label == method), None)
        ordered = [layer for layer in (entry.layers or []) if layer in present] if entry else []
        return ordered + [layer for layer in present if layer not in ordered]

    def views(self, methods: Sequence[str | View] | None = None) -> list[View]:
        """(method, layer) pairs: every one of the run, or those of ``methods``.

        An item of ``methods`` is a method label (all its layers) or a ``(method, layer)`` pair.
        """
        if methods is None:
            return [(method, layer) for method in self.methods for layer in self.layers(method)]
        if isinstance(methods, str):
            methods = [methods]
        views: list[View] = []
        for item in methods:
            if isinstance(item, str):
                views.extend((item, layer) for layer in self.layers(item))
            else:
                method, layer = item
                views.append((method, self._layer(method, layer)))
        return views

    @property
    def curve_metrics(self) -> list[str]:
        """Metrics whose per-image curves are stored (insertion, deletion, randomization)."""
        return list(self._curves)

    @property
    def metric_names(self) -> list[str]:
        """Metrics with per-image values in ``metrics.parquet``, in the config's order."""
        present = set(self.metrics["metric"])
        ordered = [m.name for m in self.config.metrics if m.name in present]
        return ordered + sorted(present - set(ordered))

    def _layer(self, method: str, layer: str | None) -> str:
        layers = self.layers(method)
        if layer is None:
            if len(layers) != 1:
                raise ValueError(f"method {method!r} has layers {', '.join(layers)}: pass `layer`")
            return layers[0]
        if layer not in layers:
            raise ValueError(f"method {method!r} has no layer {layer!r}; its layers: {', '.join(layers)}")
        return layer

    # -- per-image arrays, read lazily -------------------------------------------------------

    def rows(self, keys: str | Sequence[str] | None = None, indices: int | Sequence[int] | None = None) -> np.ndarray:
        """Row numbers of ``keys`` or ``indices`` (all rows when both are None)."""
        if keys is not None and indices is not None:
            raise ValueError("give `keys` or `indices`, not both")
        count = len(self.images)
        if keys is not None:
            keys = [keys] if isinstance(keys, str) else list(keys)
            unknown = [k for k in keys if k not in self._row]
            if unknown:
                raise ValueError(f"unknown image key(s) {', '.join(map(repr, unknown[:5]))} in {self.path}")
            return np.array([self._row[k] for k in keys], dtype=np.int64)
        if indices is not None:
            rows = np.atleast_1d(np.asarray(indices, dtype=np.int64))
            if rows.size and (rows.min() < -count or rows.max() >= count):
                raise ValueError(f"indices must lie in [-{count}, {count - 1}], got {list(rows)}")
            return rows % count if count else rows
        return np.arange(count, dtype=np.int64)

    @property
    def has_maps(self) -> np.ndarray:
        """Per image (in the order of :attr:`images`), whether ``results.h5`` keeps its maps
        (the config's ``results.maps``: all, none or a sample)."""
        return self._map_row >= 0

    def _read(self, name: str, keys: str | Sequence[str] | None, indices: int | Sequence[int] | None,
              *, maps: bool = False) -> np.ndarray:
        rows = self.rows(keys, indices)
        single = isinstance(keys, str) or (indices is not None and np.ndim(indices) == 0)
        if maps:
            missing = rows[self._map_row[rows] < 0]
            if missing.size:
                shown = ", ".join(repr(self.images["key"].iloc[r]) for r in missing[:5])
                raise ValueError(f"{self.results_path} keeps no maps of image(s) {shown} (results.maps of the "
                                 f"config: maps are kept for all images, none or a sample)")
            rows = self._map_row[rows]
        with h5py.File(self.results_path, "r") as f:
            dataset = f[name]
            if keys is None and indices is None and not maps:
                data = dataset[()]
            else:
                unique = np.unique(rows)
                block = dataset[unique] if unique.size else np.empty((0, *dataset.shape[1:]), dataset.dtype)
                data = block[np.searchsorted(unique, rows)]
        return data[0] if single else data

    def maps(self, method: str, layer: str | None = None, *, keys: str | Sequence[str] | None = None,
             indices: int | Sequence[int] | None = None) -> np.ndarray:
        """Saliency maps ``[n, H, W]`` of one view, for ``keys`` or ``indices`` (default: every image).

        A single key (a ``str``) or a single index (an ``int``) gives one map ``[H, W]``.
        ``layer`` may be left out for a method with one layer. Failed images have NaN maps; an
        image whose maps the run did not keep (:attr:`has_maps`) raises ValueError.
        """
        return self._read(f"maps/{method}/{self._layer(method, layer)}", keys, indices, maps=True)

    def has_curves(self, metric: str, method: str, layer: str) -> bool:
        """Whether the results hold ``metric`` curves of this view (none when every map was unusable)."""
        return layer in self._curves.get(metric, {}).get(method, [])

    def curves(self, metric: str, method: str, layer: str | None = None, *,
               keys: str | Sequence[str] | None = None, indices: int | Sequence[int] | None = None) -> np.ndarray:
        """Per-image ``metric`` curves ``[n, T]`` of one view (selection as in :meth:`maps`)."""
        if metric not in self._curves:
            known = ", ".join(self.curve_metrics) or "(none)"
            raise ValueError(f"no {metric!r} curves in {self.results_path}; curves: {known}")
        layer = self._layer(method, layer)
        if layer not in self._curves[metric].get(method, []):
            raise ValueError(f"no {metric!r} curves for method {method!r} layer {layer!r}")
        return self._read(f"curves/{metric}/{method}/{layer}", keys, indices)

    # -- tables ----------------------------------------------------------------------------

    @functools.cached_property
    def metrics(self) -> pd.DataFrame:
        """The tidy per-image table of ``metrics.parquet`` (one row per image, method, layer and metric)."""
        return pd.read_parquet(RunDir(self.path).metrics_parquet)

    def summary(self, by: Sequence[str] = ("method", "layer"), group_by_class: bool = False) -> pd.DataFrame:
        """Mean, variance, std, 95% CI and count per group and metric (:func:`pipeline.tables.summarize`)."""
        return summarize(self.metrics, by=by, group_by_class=group_by_class)

    def compare(self, metric: str, *, n_resamples: int = 9999, confidence: float = 0.95, seed: int = 0) -> pd.DataFrame:
        """Paired comparison of the methods on ``metric``: one row per layer and pair of methods,
        with bootstrap intervals, Wilcoxon-Holm tests, effect sizes, mean ranks and Friedman's
        test (:func:`pipeline.comparison.compare`)."""
        from ..comparison import compare

        if metric not in self.metric_names:
            raise ValueError(f"unknown metric {metric!r} in {self.path}; metrics: {', '.join(self.metric_names)}")
        rows = self.metrics[self.metrics["metric"] == metric]
        return compare(rows, n_resamples=n_resamples, confidence=confidence, seed=seed)

    def values(self, metric: str, method: str, layer: str | None = None) -> pd.Series:
        """Per-image values of ``metric`` for one view, indexed by key in the order of :attr:`images`."""
        if metric not in self.metric_names:
            raise ValueError(f"unknown metric {metric!r} in {self.path}; metrics: {', '.join(self.metric_names)}")
        layer = self._layer(method, layer)
        table = self.metrics
        part = table[(table["metric"] == metric) & (table["method"] == method) & (table["layer"] == layer)]
        series = part.set_index("key")["value"].reindex(self.images["key"])
        series.name = metric
        return series

    # -- images ----------------------------------------------------------------------------

    def _record(self, key: str) -> ImageRecord:
        if key not in self._records:
            raise ValueError(f"unknown image key {key!r} in {self.path}")
        return self._records[key]

    def image(self, key: str) -> np.ndarray:
        """The image ``key`` as the model saw it (resized and cropped), RGB ``[H, W, 3]`` in [0, 1], for plotting."""
        data = self.config.data
        tensor = load_data_image(self._record(key).path, data)
        mean = np.asarray(data.mean, dtype=np.float32)
        std = np.asarray(data.std, dtype=np.float32)
        rgb = tensor.permute(1, 2, 0).numpy() * std + mean
        return np.clip(rgb, 0.0, 1.0)

    def ground_truth(self, key: str) -> np.ndarray:
        """The ground-truth map of ``key`` ``[H, W]``, resized (and cropped) as the image."""
        record = self._record(key)
        if record.gt_path is None:
            raise ValueError(f"image {key!r} has no ground-truth map")
        return load_data_gt(record.gt_path, self.config.data).numpy()


def load_run(run_dir: str | Path) -> Run:
    """Open the finished run in ``run_dir`` (its ``results.h5`` must exist)."""
    return Run(run_dir)
