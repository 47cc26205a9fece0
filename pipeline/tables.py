"""Metric tables: the tidy per-image table and the per-(method, layer) summary.

``metrics.parquet`` (and ``metrics.csv`` for runs of up to a million rows) has one
row per (image, method, layer, metric). The summary has,
for every (method, layer, metric): mean, variance (ddof=1), std, a 95% confidence
interval of the mean (Student t), the count of images it covers and ``n_nan``, the
images whose value is NaN (left out of the statistics; ``failures.csv`` says why where
a reason is known). It is written as ``summary.csv`` (long form) and as ``summary.md`` /
``summary.tex``: tables of the means, variances, image counts and NaN counts with one
row per method and layer and one column
per metric, titled with an arrow saying whether higher or lower is better
("Deletion ↓", "Insertion ↑"), as in the users' reports.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from .run_dir import atomic_write

__all__ = ["METRIC_COLUMNS", "Moments", "summarize", "wide_summary", "metric_title", "write_summary"]

METRIC_COLUMNS = ["key", "label", "class_name", "target", "predicted", "method", "layer", "metric", "value"]


def metric_title(name: str) -> str:
    """A metric's column title with its arrow: ``Insertion ↑`` (the name itself if unknown)."""
    from .metrics import METRICS

    spec = METRICS.get(name)
    return name if spec is None else spec.label


def _with_interval(summary: pd.DataFrame) -> pd.DataFrame:
    """Add the 95% confidence interval of the mean (Student t) to a table of mean, std and count."""
    sem = summary["std"] / np.sqrt(summary["count"])
    half = stats.t.ppf(0.975, (summary["count"] - 1).clip(lower=1)) * sem
    summary["ci95_low"] = summary["mean"] - half
    summary["ci95_high"] = summary["mean"] + half
    return summary


def summarize(metrics: pd.DataFrame, by: Sequence[str] = ("method", "layer"), group_by_class: bool = False) -> pd.DataFrame:
    """Mean, variance, std, 95% CI and count per group and metric (NaN values are left out and
    counted in ``n_nan``)."""
    keys = list(by) + (["class_name"] if group_by_class else []) + ["metric"]
    grouped = metrics.groupby(keys, sort=False)["value"]
    summary = grouped.agg(mean="mean", var="var", std="std", count="count", size="size").reset_index()
    summary["n_nan"] = summary.pop("size") - summary["count"]
    return _with_interval(summary)


class Moments:
    """Count, mean and sum of squared deviations per group, updated batch by batch
    (Chan, Golub and LeVeque's pairwise update), so a summary needs no table of every value.
    NaN values are left out of the moments and counted."""

    def __init__(self) -> None:
        self._groups: dict[tuple[str, ...], tuple[int, float, float]] = {}
        self._nan: dict[tuple[str, ...], int] = {}  # every group seen, in order

    def add(self, group: tuple[str, ...], values: np.ndarray) -> None:
        """Fold ``values`` (NaNs are left out and counted) into ``group``."""
        values = np.asarray(values, dtype=np.float64)
        if not values.size:
            return
        nan = np.isnan(values)
        self._nan[group] = self._nan.get(group, 0) + int(nan.sum())
        values = values[~nan]
        if not values.size:
            return
        count, mean = values.size, float(values.mean())
        squares = float(((values - mean) ** 2).sum())
        if group in self._groups:
            seen, seen_mean, seen_squares = self._groups[group]
            total = seen + count
            delta = mean - seen_mean
            mean = seen_mean + delta * count / total
            squares = seen_squares + squares + delta * delta * seen * count / total
            count = total
        self._groups[group] = (count, mean, squares)

    def frame(self, columns: Sequence[str], order: Sequence[tuple[str, ...]] | None = None) -> pd.DataFrame:
        """The summary table: one row per group (named by ``columns``), in ``order`` when given."""
        groups = [g for g in order if g in self._nan] if order is not None else list(self._nan)
        rows = []
        for group in groups:
            count, mean, squares = self._groups.get(group, (0, np.nan, np.nan))
            var = squares / (count - 1) if count > 1 else np.nan
            rows.append((*group, mean, var, np.sqrt(var), count, self._nan[group]))
        summary = pd.DataFrame(rows, columns=[*columns, "mean", "var", "std", "count", "n_nan"])
        summary[["count", "n_nan"]] = summary[["count", "n_nan"]].astype(np.int64)
        return _with_interval(summary)


def wide_summary(summary: pd.DataFrame, statistic: str = "mean", by: Sequence[str] = ("method", "layer")) -> pd.DataFrame:
    """One row per group, one column per metric (titled with its arrow), holding ``statistic``."""
    order = list(dict.fromkeys(summary["metric"]))
    groups = pd.MultiIndex.from_frame(summary[list(by)].drop_duplicates())
    wide = summary.set_index([*by, "metric"])[statistic].unstack("metric").reindex(index=groups, columns=order)
    if statistic in ("count", "n_nan"):
        wide = wide.astype("Int64")
    wide.columns = [metric_title(m) for m in order]
    return wide.reset_index()


def write_summary(summary: pd.DataFrame, out_dir: Path, *, group_by_class: bool = False) -> None:
    """Write the long ``summary`` as summary.csv and its mean, variance, count and NaN-count tables
    as summary.md and .tex."""
    out_dir = Path(out_dir)
    atomic_write(out_dir / "summary.csv", summary.to_csv(index=False))
    by = ["method", "layer"] + (["class_name"] if group_by_class else [])
    sections = {name: wide_summary(summary, statistic, by) for name, statistic in
                (("Mean", "mean"), ("Variance", "var"), ("Images", "count"),
                                                        ("NaN values", "n_nan"))}
    atomic_write(out_dir / "summary.md", "".join(
        f"## {name}\n\n{table.to_markdown(index=False, floatfmt='.4f')}\n\n" for name, table in sections.items()
    ))
    atomic_write(out_dir / "summary.tex", "\n".join(
        table.to_latex(index=False, float_format="%.4f", na_rep="--", caption=name, escape=True)
        for name, table in sections.items()
    ))
