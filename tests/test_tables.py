"""pipeline.tables: the per-group statistics, titles with arrows, and the written tables."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from pipeline.tables import (
    METRIC_COLUMNS,
    Moments,
    combined_table,
    constant_metrics,
    format_number,
    metric_title,
    summarize,
    wide_summary,
    write_summary,
)

VALUES = {  # (method, layer, metric) -> per-image values
    ("rise", "-", "insertion"): [0.61, 0.42, 0.77, 0.58, np.nan],
    ("rise", "-", "deletion"): [0.12, 0.31, 0.05, 0.22, 0.18],
    ("rise", "-", "pcc"): [0.3, np.nan, np.nan, -0.1, np.nan],
    ("gradcam", "layer4", "insertion"): [0.55, 0.52, 0.71, 0.49, 0.66],
    ("gradcam", "layer4", "deletion"): [0.2, 0.25, 0.15, 0.3, 0.1],
    ("gradcam", "layer4", "pcc"): [np.nan] * 5,
    ("gradcam", "layer3", "insertion"): [0.4, np.nan, np.nan, np.nan, np.nan],
}
CLASS_OF = ["crab", "crab", "shrimp", "shrimp", "shrimp"]


def _metrics() -> pd.DataFrame:
    rows = []
    for (method, layer, metric), values in VALUES.items():
        for index, value in enumerate(values):
            rows.append({
                "key": f"img{index}", "label": CLASS_OF[index] == "shrimp", "class_name": CLASS_OF[index],
                "target": 0, "predicted": 0, "method": method, "layer": layer, "metric": metric, "value": value,
            })
    return pd.DataFrame(rows, columns=METRIC_COLUMNS)


def _expected(values: list[float]) -> dict[str, float]:
    x = np.array([v for v in values if not np.isnan(v)])
    n = len(x)
    mean, var = x.sum() / n, ((x - x.sum() / n) ** 2).sum() / (n - 1) if n > 1 else np.nan
    low, high = stats.t.interval(0.95, n - 1, loc=mean, scale=np.sqrt(var / n)) if n > 1 else (np.nan, np.nan)
    return {"mean": mean, "var": var, "std": np.sqrt(var), "count": n, "ci95_low": low, "ci95_high": high}


def test_summarize_matches_numpy_and_scipy() -> None:
    summary = summarize(_metrics()).set_index(["method", "layer", "metric"])
    assert sorted(summary.index) == sorted(VALUES)  # an all-NaN group has a row: count 0, n_nan 5
    assert (summary["n_nan"] == [int(np.isnan(VALUES[g]).sum()) for g in summary.index]).all()
    empty = summary.loc[("gradcam", "layer4", "pcc")]
    assert empty["count"] == 0 and empty["n_nan"] == 5 and np.isnan(empty["mean"])
    expected_groups = [k for k, v in VALUES.items() if not np.isnan(v).all()]
    for group in expected_groups:
        expected = _expected(VALUES[group])
        for column, value in expected.items():
            got = summary.loc[group, column]
            if np.isnan(value):
                assert np.isnan(got), (group, column)
            else:
                assert got == pytest.approx(value, rel=1e-12), (group, column)
    assert summary.loc[("rise", "-", "insertion"), "count"] == 4
    assert summary.loc[("rise", "-", "pcc"), "count"] == 2
    assert summary.loc[("gradcam", "layer3", "insertion"), "count"] == 1


def test_summarize_by_class() -> None:
    summary = summarize(_metrics(), group_by_class=True).set_index(["method", "layer", "class_name", "metric"])
    values = np.array(VALUES[("gradcam", "layer4", "insertion")])
    crab, shrimp = values[:2], values[2:]
    assert summary.loc[("gradcam", "layer4", "crab", "insertion"), "mean"] == pytest.approx(crab.mean())
    assert summary.loc[("gradcam", "layer4", "shrimp", "insertion"), "var"] == pytest.approx(shrimp.var(ddof=1))
    assert summary.loc[("rise", "-", "shrimp", "insertion"), "count"] == 2  # one NaN left out


def test_metric_titles_carry_arrows() -> None:
    assert metric_title("insertion") == "Insertion ↑"
    assert metric_title("deletion") == "Deletion ↓"
    assert metric_title("pcc") == "PCC ↑"
    assert metric_title("ssim") == "SSIM ↑"
    assert metric_title("average_drop") == "Average Drop ↓"
    assert metric_title("average_increase") == "Average Increase ↑"
    assert metric_title("pointing_game") == "Pointing game ↑"
    assert metric_title("my_metric") == "my_metric"  # not registered: no arrow


def test_wide_summary_has_one_row_per_method_and_layer() -> None:
    summary = summarize(_metrics())
    wide = wide_summary(summary, "mean")
    assert list(wide.columns) == ["method", "layer", "Insertion ↑", "Deletion ↓", "PCC ↑"]
    assert [tuple(r) for r in wide[["method", "layer"]].itertuples(index=False)] == [
        ("rise", "-"), ("gradcam", "layer4"), ("gradcam", "layer3")]
    rows = wide.set_index(["method", "layer"])
    assert rows.loc[("rise", "-"), "Insertion ↑"] == pytest.approx(np.nanmean(VALUES[("rise", "-", "insertion")]))
    assert rows.loc[("gradcam", "layer4"), "Deletion ↓"] == pytest.approx(
        np.mean(VALUES[("gradcam", "layer4", "deletion")]))
    assert np.isnan(rows.loc[("gradcam", "layer4"), "PCC ↑"])  # no value at all
    counts = wide_summary(summary, "count").set_index(["method", "layer"])
    assert counts.loc[("rise", "-"), "PCC ↑"] == 2 and counts.loc[("gradcam", "layer3"), "Insertion ↑"] == 1


def test_written_tables(tmp_path: Path) -> None:
    summary = summarize(_metrics())
    write_summary(summary, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.csv", "summary.md", "summary.tex"]
    assert len(pd.read_csv(tmp_path / "summary.csv")) == len(summary) == 7
    markdown = (tmp_path / "summary.md").read_text()
    assert [line for line in markdown.splitlines() if line.startswith("## ")] == [
        "## Mean ± variance (ddof = 1)", "## Mean ± half-width of the 95% confidence interval (Student t)",
        "## Mean", "## Variance", "## Images", "## NaN values"]
    assert markdown.count("Insertion ↑") == 6 and markdown.count("Deletion ↓") == 6
    nan_section = markdown.split("## NaN values")[1]
    rise_row = next(line for line in nan_section.splitlines() if line.startswith("| rise"))
    assert [cell.strip() for cell in rise_row.strip("|").split("|")] == ["rise", "-", "1", "0", "3"]
    mean_section = markdown.split("## Mean\n")[1].split("## Variance")[0]
    rise_row = next(line for line in mean_section.splitlines() if line.startswith("| rise"))
    assert f"{np.nanmean(VALUES[('rise', '-', 'insertion')]):.4f}" in rise_row
    variance_section = markdown.split("## Variance")[1].split("## Images")[0]
    rise_row = next(line for line in variance_section.splitlines() if line.startswith("| rise"))
    assert f"{np.var(VALUES[('rise', '-', 'deletion')], ddof=1):.4f}" in rise_row
    latex = (tmp_path / "summary.tex").read_text()
    assert latex.count("\\begin{tabular}") == 6
    assert "Insertion $\\uparrow$" in latex and "Deletion $\\downarrow$" in latex and "↑" not in latex
    assert "--" in latex  # missing figures are marked


def test_numbers_switch_to_scientific_notation_when_small() -> None:
    assert format_number(0.59504) == "0.5950" and format_number(0.0) == "0.0000" and format_number(-0.25) == "-0.2500"
    assert format_number(1.9e-05) == "1.90e-05" and format_number(-4.2e-04) == "-4.20e-04"
    assert format_number(1.9e-05, latex=True) == r"$1.90 \times 10^{-5}$"
    assert format_number(float("nan")) == "–" and format_number(float("nan"), latex=True) == "--"


def test_combined_table_bolds_the_best_mean_per_column() -> None:
    summary = summarize(_metrics())
    table = combined_table(summary, "var").set_index(["method", "layer"])
    rise_insertion = VALUES[("rise", "-", "insertion")]
    assert table.loc[("rise", "-"), "Insertion ↑"] == (
        f"**{np.nanmean(rise_insertion):.4f} ± {np.nanvar(rise_insertion, ddof=1):.4f}**")
    assert not table.loc[("gradcam", "layer4"), "Insertion ↑"].startswith("**")
    deletion = table["Deletion ↓"]  # lower is better: rise (mean 0.176) beats gradcam layer4 (0.2)
    assert deletion[("rise", "-")].startswith("**") and not deletion[("gradcam", "layer4")].startswith("**")
    assert table.loc[("gradcam", "layer3"), "Insertion ↑"] == "0.4000"  # one value: no spread
    ci = combined_table(summary, "ci95").set_index(["method", "layer"])
    row = summary.set_index(["method", "layer", "metric"]).loc[("gradcam", "layer4", "deletion")]
    assert ci.loc[("gradcam", "layer4"), "Deletion ↓"] == (
        f"{row['mean']:.4f} ± {(row['ci95_high'] - row['ci95_low']) / 2:.4f}")
    latex = combined_table(summary, "var", markup="latex")
    assert list(latex.columns)[2:] == [r"Insertion $\uparrow$", r"Deletion $\downarrow$", r"PCC $\uparrow$"]
    assert latex.iloc[0, 2].startswith(r"\textbf{0.5950 $\pm$ ")


def test_small_variances_are_not_printed_as_zero(tmp_path: Path) -> None:
    metrics = _metrics()
    chosen = metrics["metric"] == "deletion"
    metrics.loc[chosen, "value"] = 0.3 + metrics.loc[chosen, "value"] * 0.03  # variances near 1e-5
    write_summary(summarize(metrics), tmp_path)
    variance = np.var(metrics[chosen & (metrics["method"] == "rise")]["value"], ddof=1)
    assert 1e-6 < variance < 1e-3
    assert f"{variance:.2e}" in (tmp_path / "summary.md").read_text()
    mantissa, exponent = f"{variance:.2e}".split("e")
    assert rf"{mantissa} \times 10^{{{int(exponent)}}}" in (tmp_path / "summary.tex").read_text()


def test_a_metric_with_the_same_mean_everywhere_is_flagged(tmp_path: Path) -> None:
    metrics = _metrics()
    metrics.loc[metrics["metric"] == "deletion", "value"] = 1 / 3
    metrics = metrics[~((metrics["metric"] == "deletion") & metrics["value"].isna())]
    summary = summarize(metrics)
    assert constant_metrics(summary) == ["deletion"]
    table = combined_table(summary)
    assert "Deletion ↓ (same for all)" in table.columns
    assert not any(cell.startswith("**") for cell in table["Deletion ↓ (same for all)"])
    write_summary(summary, tmp_path)
    assert "the mean of Deletion ↓ is the same for every method and layer" in (tmp_path / "summary.md").read_text()


def test_every_method_and_layer_has_a_row_in_every_section(tmp_path: Path) -> None:
    summary = summarize(_metrics())
    variance = wide_summary(summary, "var")
    assert ("gradcam", "layer3") in {tuple(r) for r in variance[["method", "layer"]].itertuples(index=False)}
    write_summary(summary, tmp_path)
    variance_section = (tmp_path / "summary.md").read_text().split("## Variance")[1].split("## Images")[0]
    assert re.search(r"^\|\s*gradcam\s*\|\s*layer3\s*\|", variance_section, flags=re.MULTILINE)


def test_latex_table_escapes_special_characters(tmp_path: Path) -> None:
    metrics = _metrics()
    metrics["method"] = metrics["method"].replace({"rise": "rise_6000"})
    metrics["layer"] = metrics["layer"].replace({"layer4": "features_4"})
    write_summary(summarize(metrics), tmp_path)
    latex = (tmp_path / "summary.tex").read_text()
    assert r"rise\_6000" in latex and r"features\_4" in latex
    assert "rise_6000" not in latex.replace(r"rise\_6000", "")


def test_moments_fed_batch_by_batch_match_the_table_summary() -> None:
    metrics = _metrics()
    moments = Moments()
    rng = np.random.default_rng(0)
    for (method, layer, metric), part in metrics.groupby(["method", "layer", "metric"], sort=False):
        values = part["value"].to_numpy()
        cuts = np.sort(rng.integers(0, len(values) + 1, size=2))
        for batch in np.split(values, cuts):  # uneven batches, some empty
            moments.add((method, layer, metric), batch)
    streamed = moments.frame(["method", "layer", "metric"]).set_index(["method", "layer", "metric"])
    expected = summarize(metrics).set_index(["method", "layer", "metric"])
    assert sorted(streamed.index) == sorted(expected.index)
    for column in ("mean", "var", "std", "count", "n_nan", "ci95_low", "ci95_high"):
        np.testing.assert_allclose(streamed.loc[expected.index, column], expected[column], rtol=1e-12)


def test_moments_are_exact_for_large_offsets() -> None:
    values = 1e8 + np.arange(10_000, dtype=np.float64) % 7
    moments = Moments()
    for batch in np.array_split(values, 37):
        moments.add(("m", "-", "x"), batch)
    row = moments.frame(["method", "layer", "metric"]).iloc[0]
    assert row["var"] == pytest.approx(np.var(values, ddof=1), rel=1e-9)
