"""Which method wins: paired statistics of the per-image metric values.

For every metric, methods are compared on the same images. A *group* is one layer:
the CAM views of that layer (``gradcam / layer3``, ``fem / layer3``) together with
every method without layers (``rise``, ``random``, ...), which therefore appear in the
group of every layer; a run without CAM methods has one group, layer ``"-"``. Within a
group, the images used are those with a finite value for every method of the group
(paired by image key), so every test of the group sees the same images.

For each method of a group: the mean, its bootstrap confidence interval
(:func:`scipy.stats.bootstrap`, percentile method, ``n_resamples`` resamples, seeded)
and its mean rank over images (rank 1 is the best value on that image, ties averaged,
:func:`scipy.stats.rankdata`). For the group: Friedman's test
(:func:`scipy.stats.friedmanchisquare`, three methods or more). For each pair of
methods: the Wilcoxon signed-rank test (:func:`scipy.stats.wilcoxon`, two-sided,
zero differences dropped), its p-value adjusted with Holm's step-down over all pairs
of the group (Holm 1979; SciPy has no Holm correction) and the matched-pairs
rank-biserial correlation (Kerby 2014) as the effect size, from ``+1`` when
``method_a`` is better on every image to ``-1`` when ``method_b`` is.

:func:`compare` returns the pairwise table (``comparison.csv``);
:func:`write_comparison` writes it and ``comparison.md`` into a run folder.
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd
from scipy import stats

from .planning import NO_LAYER
from .run_dir import RunDir, atomic_write

__all__ = [
    "COMPARISON_COLUMNS",
    "ALPHA",
    "N_RESAMPLES",
    "compare",
    "holm",
    "rank_biserial",
    "best_group",
    "comparison_markdown",
    "write_comparison",
]

#: significance level of the ``significant`` column and of the best group
ALPHA = 0.05

#: bootstrap resamples of every confidence interval: 1,999 (Efron and Tibshirani's advice for
#: percentile intervals is at least 1,000), a fifth of SciPy's default 9,999, because a run of
#: 50,000 images bootstraps every view of every metric (stated in comparison.md)
N_RESAMPLES = 1999

#: the columns of :func:`compare`'s table, one row per metric, layer and pair of methods
COMPARISON_COLUMNS = [
    "metric", "layer", "method_a", "method_b", "n_images",
    "mean_a", "ci_low_a", "ci_high_a", "mean_rank_a",
    "mean_b", "ci_low_b", "ci_high_b", "mean_rank_b",
    "wilcoxon_statistic", "p_value", "p_holm", "effect_size", "significant", "better",
    "friedman_statistic", "friedman_p", "higher_is_better", "n_resamples", "confidence",
]


def holm(p_values: np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values: the ``i``-th smallest of ``m`` is
    ``max_{j <= i} min(1, (m - j + 1) p_(j))`` (NaN entries stay NaN and do not count in ``m``)."""
    p = np.asarray(p_values, dtype=float)
    adjusted = np.full_like(p, np.nan)
    valid = np.flatnonzero(~np.isnan(p))
    order = valid[np.argsort(p[valid], kind="stable")]
    m = len(order)
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    adjusted[order] = np.maximum.accumulate(scaled)
    return adjusted


def rank_biserial(a: np.ndarray, b: np.ndarray) -> float:
    """Matched-pairs rank-biserial correlation ``(T+ - T-) / (T+ + T-)`` of ``a - b`` (Kerby 2014):
    ``T+`` and ``T-`` are the rank sums of the positive and negative differences among the
    non-zero ones, ranked by absolute value; 0 when every difference is zero."""
    difference = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    difference = difference[difference != 0]
    if difference.size == 0:
        return 0.0
    ranks = stats.rankdata(np.abs(difference))
    return float((ranks[difference > 0].sum() - ranks[difference < 0].sum()) / ranks.sum())


def _groups(metric_rows: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Layer -> wide table (image key x method) of the group's complete images."""
    layers = sorted(set(metric_rows["layer"]) - {NO_LAYER}) or [NO_LAYER]
    groups = {}
    for layer in layers:
        rows = metric_rows[metric_rows["layer"].isin({layer, NO_LAYER})]
        wide = rows.pivot_table(index="key", columns="method", values="value", aggfunc="first")
        wide = wide[np.isfinite(wide).all(axis=1)]
        if wide.shape[1] >= 2 and len(wide) >= 1:
            groups[layer] = wide.sort_index(axis=0).sort_index(axis=1)
    return groups


def _interval(values: np.ndarray, n_resamples: int, confidence: float, seed: int) -> tuple[float, float]:
    if len(values) < 2 or np.all(values == values[0]):
        return float(values.mean()), float(values.mean())
    result = stats.bootstrap(
        (values,), np.mean, n_resamples=n_resamples, confidence_level=confidence, method="percentile",
        batch=max(1, 10_000_000 // len(values)), rng=np.random.default_rng(seed),
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def _compare_group(
    metric: str, layer: str, wide: pd.DataFrame, higher: bool, n_resamples: int, confidence: float, seed: int
) -> list[dict[str, object]]:
    methods = list(wide.columns)
    values = wide.to_numpy(dtype=float)
    ranks = stats.rankdata(-values if higher else values, axis=1).mean(axis=0)
    means = values.mean(axis=0)
    intervals = [_interval(values[:, i], n_resamples, confidence, seed) for i in range(len(methods))]
    varies = bool((values != values[:, :1]).any())  # all-tied ranks leave Friedman's statistic undefined
    friedman = (
        stats.friedmanchisquare(*values.T) if len(methods) >= 3 and len(values) >= 2 and varies else None
    )
    rows = []
    for i, j in itertools.combinations(range(len(methods)), 2):
        a, b = values[:, i], values[:, j]
        if np.any(a != b):
            test = stats.wilcoxon(a, b)
            statistic, p_value = float(test.statistic), float(test.pvalue)
        else:  # identical on every image: no evidence of a difference
            statistic, p_value = float("nan"), 1.0
        effect = rank_biserial(a, b) if higher else -rank_biserial(a, b)
        rows.append({
            "metric": metric, "layer": layer, "method_a": methods[i], "method_b": methods[j],
            "n_images": len(values),
            "mean_a": means[i], "ci_low_a": intervals[i][0], "ci_high_a": intervals[i][1], "mean_rank_a": ranks[i],
            "mean_b": means[j], "ci_low_b": intervals[j][0], "ci_high_b": intervals[j][1], "mean_rank_b": ranks[j],
            "wilcoxon_statistic": statistic, "p_value": p_value, "effect_size": effect,
            "friedman_statistic": float("nan") if friedman is None else float(friedman.statistic),
            "friedman_p": float("nan") if friedman is None else float(friedman.pvalue),
            "higher_is_better": higher, "n_resamples": n_resamples, "confidence": confidence,
        })
    adjusted = holm(np.array([row["p_value"] for row in rows]))
    for row, p_holm in zip(rows, adjusted):
        row["p_holm"] = float(p_holm)
        row["significant"] = bool(p_holm < ALPHA)
        winner = row["method_a"] if float(row["effect_size"]) > 0 else row["method_b"]
        row["better"] = winner if row["significant"] else ""
    return rows


def compare(
    metrics: pd.DataFrame,
    *,
    higher_is_better: Mapping[str, bool] | None = None,
    n_resamples: int = N_RESAMPLES,
    confidence: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """The paired comparison of methods (see the module docstring), one row per metric, layer
    and pair of methods, columns :data:`COMPARISON_COLUMNS`.

    ``metrics`` is the tidy table (columns ``key``, ``method``, ``layer``, ``metric``,
    ``value``; see :data:`pipeline.tables.METRIC_COLUMNS`). ``higher_is_better`` maps a
    metric to its direction (default: the :data:`pipeline.metrics.METRICS` registry;
    unknown metrics count as higher-is-better). Every bootstrap uses a generator of
    ``seed``, so the table does not depend on the order of the rows.
    """
    if higher_is_better is None:
        from .metrics import METRICS

        higher_is_better = {name: spec.higher_is_better for name, spec in METRICS.items()}
    rows: list[dict[str, object]] = []
    for metric in sorted(set(metrics["metric"])):
        higher = higher_is_better.get(metric, True)
        for layer, wide in _groups(metrics[metrics["metric"] == metric]).items():
            rows.extend(_compare_group(metric, layer, wide, higher, n_resamples, confidence, seed))
    return pd.DataFrame(rows, columns=COMPARISON_COLUMNS)


def best_group(table: pd.DataFrame) -> list[str]:
    """The best group of one (metric, layer) of :func:`compare`'s table: the method with the
    best mean rank, then every method not significantly different from it (Holm-adjusted
    Wilcoxon), by mean rank."""
    ranks = _method_table(table)["mean_rank"].sort_values(kind="stable")
    best = str(ranks.index[0])
    tied = set()
    for row in table.itertuples():
        if best in (row.method_a, row.method_b) and not row.significant:
            tied.add(row.method_b if row.method_a == best else row.method_a)
    return [best] + [m for m in ranks.index if m in tied]


def _method_table(table: pd.DataFrame) -> pd.DataFrame:
    """One row per method of one (metric, layer): mean, interval and mean rank."""
    sides = []
    for side in ("a", "b"):
        part = table[[f"method_{side}", f"mean_{side}", f"ci_low_{side}", f"ci_high_{side}", f"mean_rank_{side}"]]
        sides.append(part.set_axis(["method", "mean", "ci_low", "ci_high", "mean_rank"], axis=1))
    return pd.concat(sides).drop_duplicates("method").set_index("method").sort_values("mean_rank", kind="stable")


def comparison_markdown(table: pd.DataFrame) -> str:
    """``comparison.md``: per metric and layer, the methods by mean rank with their mean,
    confidence interval and whether they are in the best group (bold), then the
    significant pairs."""
    from .tables import metric_title

    lines = ["# Method comparison", ""]
    if table.empty:
        return "\n".join(lines + ["No metric has two methods with values on the same images.", ""])
    first = table.iloc[0]
    lines += [
        f"Paired by image. Means with {first['confidence']:.0%} bootstrap intervals "
        f"({int(first['n_resamples'])} resamples, percentile); Wilcoxon signed-rank tests with Holm "
        f"correction within each metric and layer; **bold**: the best-ranked method and those not "
        f"significantly different from it (Holm-adjusted p >= {ALPHA}). Methods without layers are "
        "compared in every layer's group.",
        "",
    ]
    for (metric, layer), group in table.groupby(["metric", "layer"], sort=True):
        methods = _method_table(group)
        best = set(best_group(group))
        friedman = group["friedman_p"].iloc[0]
        heading = metric_title(str(metric)) + ("" if layer == NO_LAYER else f", layer {layer}")
        lines += [f"## {heading}", "", f"{int(group['n_images'].iloc[0])} images"
                  + ("" if np.isnan(friedman) else f"; Friedman p = {friedman:.3g}"), ""]
        lines += ["| method | mean [CI] | mean rank |", "|---|---|---|"]
        for method, row in methods.iterrows():
            name = f"**{method}**" if method in best else str(method)
            lines.append(f"| {name} | {row['mean']:.4f} [{row['ci_low']:.4f}, {row['ci_high']:.4f}] "
                         f"| {row['mean_rank']:.2f} |")
        significant = group[group["significant"]]
        lines += ["", "| better | than | p (Holm) | effect size |", "|---|---|---|---|"]
        for row in significant.itertuples():
            other = row.method_b if row.better == row.method_a else row.method_a
            lines.append(f"| {row.better} | {other} | {row.p_holm:.3g} | {abs(row.effect_size):.2f} |")
        if significant.empty:
            lines.append("| (no significant difference) | | | |")
        lines.append("")
    return "\n".join(lines)


def write_comparison(metrics: pd.DataFrame, run_dir: Path) -> pd.DataFrame:
    """Write ``comparison.csv`` (:func:`compare`) and ``comparison.md`` into ``run_dir``; returns the table."""
    folder = RunDir(run_dir)
    table = compare(metrics)
    atomic_write(folder.comparison_csv, table.to_csv(index=False))
    atomic_write(folder.comparison_md, comparison_markdown(table))
    return table
