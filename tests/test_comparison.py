"""pipeline.comparison against SciPy on hand-made data with known outcomes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from pipeline.comparison import best_group, compare, holm, rank_biserial, write_comparison


def tidy(values: dict[tuple[str, str], np.ndarray], metric: str = "insertion") -> pd.DataFrame:
    rows = []
    for (method, layer), column in values.items():
        for i, value in enumerate(column):
            rows.append({"key": f"img{i:03d}", "method": method, "layer": layer, "metric": metric, "value": value})
    return pd.DataFrame(rows)


def row(table: pd.DataFrame, a: str, b: str, layer: str = "-") -> pd.Series:
    match = table[(table["method_a"] == a) & (table["method_b"] == b) & (table["layer"] == layer)]
    assert len(match) == 1
    return match.iloc[0]


BASE = np.random.default_rng(0).random(30)


def test_a_method_better_on_every_image_is_significant_and_identical_ones_are_not() -> None:
    values = {("good", "-"): BASE + 0.1, ("same", "-"): BASE.copy(), ("twin", "-"): BASE.copy()}
    table = compare(tidy(values), n_resamples=999)
    assert len(table) == 3
    good = row(table, "good", "same")
    expected = stats.wilcoxon(BASE + 0.1, BASE)
    assert good["p_value"] == pytest.approx(expected.pvalue)
    assert good["significant"] and good["better"] == "good" and good["effect_size"] == 1.0
    twins = row(table, "same", "twin")
    assert twins["p_value"] == 1.0 and not twins["significant"] and twins["better"] == "" and twins["effect_size"] == 0
    assert good["mean_rank_a"] == 1.0 and good["mean_rank_b"] == 2.5
    friedman = stats.friedmanchisquare(BASE + 0.1, BASE, BASE)
    assert good["friedman_p"] == pytest.approx(friedman.pvalue) and good["friedman_p"] < 0.05
    assert best_group(table) == ["good"]


def test_lower_is_better_metrics_rank_the_other_way() -> None:
    values = {("low", "-"): BASE, ("high", "-"): BASE + 0.1}
    table = compare(tidy(values, "deletion"), n_resamples=999)
    (only,) = table.itertuples()
    assert only.better == "low" and not only.higher_is_better
    low_rank = only.mean_rank_a if only.method_a == "low" else only.mean_rank_b
    assert low_rank == 1.0


def test_bootstrap_interval_equals_scipy_with_the_same_seed() -> None:
    values = {("a", "-"): BASE, ("b", "-"): BASE[::-1].copy()}
    table = compare(tidy(values), n_resamples=999, seed=3)
    first = row(table, "a", "b")
    expected = stats.bootstrap((BASE,), np.mean, n_resamples=999, method="percentile", rng=np.random.default_rng(3))
    assert first["ci_low_a"] == pytest.approx(expected.confidence_interval.low)
    assert first["ci_high_a"] == pytest.approx(expected.confidence_interval.high)
    assert first["mean_a"] == pytest.approx(BASE.mean())


def test_layerless_methods_join_every_layers_group_on_shared_images() -> None:
    values = {
        ("gradcam", "layer3"): BASE + 0.2,
        ("gradcam", "layer4"): BASE - 0.2,
        ("rise", "-"): BASE,
    }
    frame = tidy(values)
    frame = frame[~((frame["method"] == "rise") & (frame["key"] == "img000"))]  # rise lacks one image
    table = compare(frame, n_resamples=99)
    assert sorted(zip(table["layer"], table["method_a"], table["method_b"])) == [
        ("layer3", "gradcam", "rise"), ("layer4", "gradcam", "rise"),
    ]
    assert set(table["n_images"]) == {29}
    assert row(table, "gradcam", "rise", "layer3")["better"] == "gradcam"
    assert row(table, "gradcam", "rise", "layer4")["better"] == "rise"


def test_holm_matches_the_step_down_definition() -> None:
    p = np.array([0.01, 0.04, 0.03, 0.005, np.nan])
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1: 0.02, 0.03, 0.06, 0.04 -> running max 0.02, 0.03, 0.06, 0.06
    np.testing.assert_allclose(holm(p), [0.03, 0.06, 0.06, 0.02, np.nan])


def test_rank_biserial_from_signed_ranks() -> None:
    a = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    b = np.array([0.0, 2.5, 3.0, 1.0, 5.5])
    # differences 1, -0.5, 0, 3, -0.5 -> non-zero |d| ranks: 1 -> 3, 0.5 -> 1.5, 3 -> 4, 0.5 -> 1.5
    assert rank_biserial(a, b) == pytest.approx((3 + 4 - 1.5 - 1.5) / 10)


def test_write_comparison_writes_csv_and_markdown(tmp_path: Path) -> None:
    values = {("good", "-"): BASE + 0.1, ("random", "-"): BASE}
    table = write_comparison(tidy(values), tmp_path)
    written = pd.read_csv(tmp_path / "comparison.csv", keep_default_na=False)
    assert list(written["method_a"]) == list(table["method_a"]) and written["p_holm"].iloc[0] < 0.05
    markdown = (tmp_path / "comparison.md").read_text()
    assert "**good**" in markdown and "| good | random |" in markdown
