r"""Metric tables: the tidy per-image table and the per-(method, layer) summary.

``metrics.parquet`` (and ``metrics.csv`` for runs of up to a million rows) has one
row per (image, method, layer, metric). The summary has,
for every (method, layer, metric): mean, variance (ddof=1), std, a 95% confidence
interval of the mean (Student t), the count of images it covers and ``n_nan``, the
images whose value is NaN (left out of the statistics; ``failures.csv`` says why where
a reason is known). It is written as ``summary.csv`` (long form) and as ``summary.md`` /
``summary.tex``: with one row per method and layer and one column per metric, titled
with an arrow saying whether higher or lower is better ("Deletion ↓", "Insertion ↑";
``$\uparrow$`` / ``$\downarrow$`` in LaTeX), first the paper-ready tables "mean ± variance"
and "mean ± half-width of the 95% CI" (:func:`combined_table`; the best mean per column in
bold, a metric with the same mean in every row flagged instead), then the means, variances,
image counts and NaN counts. Numbers have four decimals, or scientific notation when
smaller than 0.001 (:func:`format_number`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from .run_dir import atomic_write

__all__ = ["METRIC_COLUMNS", "Moments", "summarize", "wide_summary", "metric_title", "write_summary",
           "combined_table", "format_number", "constant_metrics", "SAME_FOR_ALL"]

#: the note a column title gets when the metric's mean is the same in every row
SAME_FOR_ALL = "same for all"
_SPREADS = {"var": "Mean ± variance (ddof = 1)", "ci95": "Mean ± half-width of the 95% confidence interval (Student t)"}

METRIC_COLUMNS = ["key", "label", "class_name", "target", "predicted", "method", "layer", "metric", "value"]


def metric_title(name: str, latex: bool = False) -> str:
    r"""A metric's column title with its arrow: ``Insertion ↑`` (the name itself if unknown);
    ``latex`` escapes it and writes the arrow as ``$\uparrow$``."""
    from .metrics import METRICS

    spec = METRICS.get(name)
    title = name if spec is None else spec.label
    if not latex:
        return title
    return _latex_escape(title).replace("↑", r"$\uparrow$").replace("↓", r"$\downarrow$")


def _higher_is_better(name: str) -> bool | None:
    """The metric's direction; None when it is not registered."""
    from .metrics import METRICS

    spec = METRICS.get(name)
    return None if spec is None else spec.higher_is_better


def _latex_escape(text: str) -> str:
    table = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
             "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$"}
    return "".join(table.get(char, char) for char in text)


def format_number(value: float, latex: bool = False) -> str:
    r"""Four decimals; scientific notation (``1.90e-05``, ``$1.90 \times 10^{-5}$`` in LaTeX) when
    ``0 < |value| < 0.001``; ``–`` (``--``) for NaN."""
    if not np.isfinite(value):
        return "--" if latex else "–"
    if value == 0 or abs(value) >= 1e-3:
        return f"{value:.4f}"
    mantissa, exponent = f"{value:.2e}".split("e")
    return rf"${mantissa} \times 10^{{{int(exponent)}}}$" if latex else f"{mantissa}e{exponent}"


def constant_metrics(summary: pd.DataFrame, by: Sequence[str] = ("method", "layer")) -> list[str]:
    """The metrics whose mean is the same (to 1e-9) in every group that has one, two or more groups."""
    same = []
    for metric, part in summary.groupby("metric", sort=False):
        means = part.dropna(subset=["mean"]).drop_duplicates(list(by))["mean"].to_numpy()
        if len(means) > 1 and np.ptp(means) <= 1e-9:
            same.append(str(metric))
    return same


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


def combined_table(summary: pd.DataFrame, spread: str = "var", by: Sequence[str] = ("method", "layer"),
                   markup: str = "markdown") -> pd.DataFrame:
    """One row per group, one column per metric: ``mean ± variance`` (``spread="var"``) or ``mean ±
    half-width of the 95% CI`` (``"ci95"``), as strings in ``markup`` ("markdown" or "latex").

    The best mean of each column (by the metric's direction) is bold (every tied row); a metric
    whose mean is the same in every row gets no bold and ``(same for all)`` in its title.
    """
    if spread not in _SPREADS:
        raise ValueError(f"spread must be one of {', '.join(_SPREADS)}, got {spread!r}")
    if markup not in ("markdown", "latex"):
        raise ValueError(f"markup must be 'markdown' or 'latex', got {markup!r}")
    latex = markup == "latex"
    order = list(dict.fromkeys(summary["metric"]))
    same = set(constant_metrics(summary, by))
    groups = summary[list(by)].drop_duplicates()
    table = groups.astype(str).map(_latex_escape) if latex else groups.astype(str)
    for metric in order:
        part = summary[summary["metric"] == metric].set_index(list(by)).reindex(pd.MultiIndex.from_frame(groups))
        means = part["mean"].to_numpy(dtype=np.float64)
        half = (part["var"] if spread == "var" else (part["ci95_high"] - part["ci95_low"]) / 2).to_numpy(np.float64)
        direction = _higher_is_better(metric)
        best = np.zeros(len(means), dtype=bool)
        if direction is not None and metric not in same and np.isfinite(means).any():
            target = np.nanmax(means) if direction else np.nanmin(means)
            best = np.isclose(means, target, rtol=0, atol=1e-12)
        cells = []
        for mean, width, bold in zip(means, half, best):
            text = format_number(mean, latex)
            if np.isfinite(mean) and np.isfinite(width):
                text += (r" $\pm$ " if latex else " ± ") + format_number(width, latex)
            cells.append((rf"\textbf{{{text}}}" if latex else f"**{text}**") if bold else text)
        title = metric_title(metric, latex) + (f" ({SAME_FOR_ALL})" if metric in same else "")
        table[title] = cells
    return table.reset_index(drop=True)


def _latex_table(table: pd.DataFrame, caption: str, groups: int) -> str:
    """A booktabs table of string cells and metric titles (already escaped); the first ``groups``
    columns (names, escaped here) left-aligned."""
    columns = "l" * groups + "r" * (len(table.columns) - groups)
    lines = [r"\begin{table}[ht]", r"\centering", rf"\caption{{{_latex_escape(caption)}}}",
             rf"\begin{{tabular}}{{{columns}}}", r"\toprule",
             " & ".join([*map(_latex_escape, table.columns[:groups]), *table.columns[groups:]]) + r" \\",
             r"\midrule"]
    lines += [" & ".join(row) + r" \\" for row in table.astype(str).itertuples(index=False)]
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(lines)


def _formatted(table: pd.DataFrame, groups: int, latex: bool) -> pd.DataFrame:
    """A wide table as strings: its numbers by :func:`format_number` (counts as integers), its
    first ``groups`` columns (the names) escaped for LaTeX when ``latex``."""
    out = table.astype(object)
    for column in out.columns[:groups]:
        out[column] = [_latex_escape(str(v)) if latex else str(v) for v in out[column]]
    for column in out.columns[groups:]:
        out[column] = [("--" if latex else "–") if pd.isna(v) else str(v) if isinstance(v, (int, np.integer))
                       else format_number(float(v), latex) for v in out[column]]
    return out


def write_summary(summary: pd.DataFrame, out_dir: Path, *, group_by_class: bool = False) -> None:
    """Write the long ``summary`` as summary.csv and its mean, variance, count and NaN-count tables
    as summary.md and .tex."""
    out_dir = Path(out_dir)
    atomic_write(out_dir / "summary.csv", summary.to_csv(index=False))
    by = ["method", "layer"] + (["class_name"] if group_by_class else [])
    wide = {name: wide_summary(summary, statistic, by) for name, statistic in
            (("Mean", "mean"), ("Variance", "var"), ("Images", "count"), ("NaN values", "n_nan"))}
    markdown = [f"## {_SPREADS[spread]}\n\n{combined_table(summary, spread, by).to_markdown(index=False, disable_numparse=True)}\n"
                for spread in _SPREADS]
    markdown += [f"## {name}\n\n{_formatted(table, len(by), False).to_markdown(index=False, disable_numparse=True)}\n"
                 for name, table in wide.items()]
    same = constant_metrics(summary, by)
    if same:
        markdown.append(f"({SAME_FOR_ALL}): the mean of {', '.join(metric_title(m) for m in same)} is the same "
                        "for every method and layer: it does not tell them apart here.\n")
    atomic_write(out_dir / "summary.md", "\n".join(markdown))
    latex = [_latex_table(combined_table(summary, spread, by, markup="latex"), caption, len(by))
             for spread, caption in _SPREADS.items()]
    titles = [*by, *(metric_title(m, latex=True) for m in dict.fromkeys(summary["metric"]))]  # wide's order
    for name, table in wide.items():
        latex.append(_latex_table(_formatted(table, len(by), True).set_axis(titles, axis=1), name, len(by)))
    atomic_write(out_dir / "summary.tex", "\n".join(latex))
