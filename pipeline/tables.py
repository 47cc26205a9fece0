"""Metric tables: the tidy per-image table and the per-(method, layer) summary.

``metrics.csv`` has one row per (image, method, layer, metric). The summary has,
for every (method, layer, metric): mean, variance (ddof=1), std, a 95% confidence
interval of the mean (Student t) and the count of images it covers. It is written as
``summary.csv`` (long form) and as ``summary.md`` / ``summary.tex`` (one row per
method and layer, one column group per metric, with arrows saying whether higher
or lower is better, e.g. "Deletion ↓", "Insertion ↑").
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from scipy import stats

__all__ = ["METRIC_COLUMNS", "summarize", "wide_summary", "metric_title", "write_tables"]

METRIC_COLUMNS = ["key", "label", "class_name", "target", "predicted", "method", "layer", "metric", "value"]


def metric_title(name: str) -> str:
    """A metric's column title with its arrow: ``Insertion ↑``."""
    from .metrics import METRICS

    spec = METRICS.get(name)
    arrow = "" if spec is None else (" ↑" if spec.higher_is_better else " ↓")
    titles = {"pcc": "PCC", "ssim": "SSIM"}
    return titles.get(name, name.replace("_", " ").title()) + arrow


def summarize(metrics: pd.DataFrame, by: Sequence[str] = ("method", "layer"), group_by_class: bool = False) -> pd.DataFrame:
    """Mean, variance, std, 95% CI and count per group and metric (NaN values are left out)."""
    keys = list(by) + (["class_name"] if group_by_class else []) + ["metric"]
    valid = metrics.dropna(subset=["value"])
    grouped = valid.groupby(keys, sort=False)["value"]
    summary = grouped.agg(mean="mean", var="var", std="std", count="count").reset_index()
    sem = summary["std"] / np.sqrt(summary["count"])
    half = stats.t.ppf(0.975, (summary["count"] - 1).clip(lower=1)) * sem
    summary["ci95_low"] = summary["mean"] - half
    summary["ci95_high"] = summary["mean"] + half
    return summary


def wide_summary(summary: pd.DataFrame, by: Sequence[str] = ("method", "layer")) -> pd.DataFrame:
    """One row per group; for every metric, its mean, variance and count (as the users' tables)."""
    rows = []
    order = list(dict.fromkeys(summary["metric"]))
    for group, part in summary.groupby(list(by), sort=False):
        row = dict(zip(by, group if isinstance(group, tuple) else (group,)))
        for record in part.itertuples():
            title = metric_title(record.metric)
            row[f"{title} mean"] = record.mean
            row[f"{title} var"] = record.var
            row[f"{title} n"] = record.count
        rows.append(row)
    columns = list(by) + [f"{metric_title(m)} {s}" for m in order for s in ("mean", "var", "n")]
    return pd.DataFrame(rows).reindex(columns=columns)


def write_tables(metrics: pd.DataFrame, out_dir: Path, *, group_by_class: bool = False) -> pd.DataFrame:
    """Write metrics.csv and summary.{csv,md,tex}; returns the long summary."""
    out_dir = Path(out_dir)
    metrics.to_csv(out_dir / "metrics.csv", index=False)
    summary = summarize(metrics, group_by_class=group_by_class)
    summary.to_csv(out_dir / "summary.csv", index=False)
    wide = wide_summary(summary, by=["method", "layer"] + (["class_name"] if group_by_class else []))
    (out_dir / "summary.md").write_text(wide.to_markdown(index=False, floatfmt=".4f") + "\n")
    (out_dir / "summary.tex").write_text(
        wide.to_latex(index=False, float_format="%.4f", escape=True, na_rep="--")
    )
    return summary
