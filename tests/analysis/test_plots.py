"""Each plot helper draws what it is given, checked against values read independently from the run's files."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure
from PIL import Image

from pipeline.analysis import (
    MAX_BANDS,
    Run,
    palette,
    curve_plot,
    ground_truth_comparison,
    load_run,
    metric_distributions,
    metric_heatmap,
    overlay_grid,
    randomization_cascade,
    save_figure,
)

KEYS = ["circle/circle_0000", "square/square_0001"]


@pytest.fixture(scope="module")
def run(tiny_run: Path) -> Run:
    return load_run(tiny_run)


def _stored(tiny_run: Path, name: str) -> np.ndarray:
    with h5py.File(tiny_run / "results.h5", "r") as f:
        return f[name][()]


def _row(tiny_run: Path, key: str) -> int:
    with h5py.File(tiny_run / "results.h5", "r") as f:
        return [k.decode() for k in f["images/keys"][()]].index(key)


def _minmax(array: np.ndarray) -> np.ndarray:
    low, high = float(array.min()), float(array.max())
    return np.zeros_like(array) if high == low else (array - low) / (high - low)


def _csv_values(tiny_run: Path, metric: str, method: str, layer: str) -> list[float]:
    with open(tiny_run / "metrics.csv", newline="") as handle:
        return [float(r["value"]) for r in csv.DictReader(handle)
                if (r["metric"], r["method"], r["layer"]) == (metric, method, layer) and r["value"] not in ("", "nan")]


def test_overlay_grid_draws_images_by_views(run: Run, tiny_run: Path) -> None:
    figure = overlay_grid(run, KEYS, ["gradcam", ("rise", "-")])
    assert isinstance(figure, Figure)
    panels = [ax for ax in figure.axes if ax.get_images()]
    assert len(panels) == len(KEYS) * 4
    assert len(figure.axes) == len(panels) + 1  # one shared colorbar
    top = figure.axes[:4]
    assert [ax.get_title() for ax in top[1:]] == ["gradcam / layer2", "gradcam / layer3", "rise"]
    class_names = json.loads((tiny_run / "plan.json").read_text())["class_names"]
    row = _row(tiny_run, KEYS[1])
    target = class_names[_stored(tiny_run, "images/targets")[row]]
    probability = _stored(tiny_run, "images/target_prob")[row]
    assert figure.axes[4].get_title().startswith(f"{target} ({probability:.2f})")
    assert KEYS[1] in figure.axes[4].get_ylabel()
    rise_panel = figure.axes[7]
    image, overlay = rise_panel.get_images()
    np.testing.assert_allclose(overlay.get_array(), _minmax(_stored(tiny_run, "maps/rise/-")[row]), atol=1e-6)
    assert image.get_array().shape == (32, 32, 3)


def test_overlay_grid_raw_maps_get_their_own_colorbars(run: Run, broken_key: str) -> None:
    figure = overlay_grid(run, [KEYS[0], broken_key], ["rise"], normalize=False, show_image=False,
                          row_labels=["first", "second"])
    maps = [ax for ax in figure.axes if ax.get_images()]
    assert len(maps) == 1  # the failed image has no map to draw
    assert len(figure.axes) == 2 + 1  # two panels, one colorbar for the drawn map
    texts = [t.get_text() for ax in figure.axes for t in ax.texts]
    assert "failed" in texts
    assert "second" in figure.axes[1].get_ylabel()
    with pytest.raises(ValueError, match="row_labels"):
        overlay_grid(run, KEYS, row_labels=["only one"])


def test_curve_plot_means_and_legend(run: Run, tiny_run: Path) -> None:
    figure = curve_plot(run, band="std")
    assert [ax.get_title() for ax in figure.axes] == ["Insertion ↑", "Deletion ↓"]
    for ax, metric in zip(figure.axes, ("insertion", "deletion")):
        labels = [text.get_text() for text in ax.get_legend().get_texts()]
        assert [label.split(" (AUC")[0] for label in labels] == ["gradcam / layer2", "gradcam / layer3", "rise"]
        for line, label, name in zip(ax.get_lines(), labels, ("gradcam/layer2", "gradcam/layer3", "rise/-")):
            curves = _stored(tiny_run, f"curves/{metric}/{name}")
            curves = curves[~np.isnan(curves).any(axis=1)]
            mean = curves.mean(axis=0)
            np.testing.assert_allclose(line.get_ydata(), mean, rtol=1e-6)
            per_image = _csv_values(tiny_run, metric, *name.split("/"))
            assert label.endswith(f"(AUC {np.mean(per_image):.3f})")
        band = next(c for c in ax.collections if isinstance(c, PolyCollection))
        top = band.get_paths()[0].vertices[:, 1].max()
        curves = _stored(tiny_run, f"curves/{metric}/gradcam/layer2")
        curves = curves[~np.isnan(curves).any(axis=1)]
        expected_top = min((curves.mean(axis=0) + curves.std(axis=0, ddof=1)).max(), 1.0)  # clipped to [0, 1]
        assert top == pytest.approx(expected_top, rel=1e-5)
    single = curve_plot(run, ["deletion"], ["rise"])
    assert len(single.axes) == 1 and len(single.axes[0].get_lines()) == 1
    with pytest.raises(ValueError, match="none has curves"):
        curve_plot(run, ["pcc"])


def test_randomization_cascade_draws_the_mean_and_each_image(randomization_run: Path, run: Run) -> None:
    figure = randomization_cascade(load_run(randomization_run), KEYS)
    mean_panel, *image_panels = figure.axes
    assert len(image_panels) == len(KEYS) and mean_panel.get_title() == "mean over images"
    assert [t.get_text() for t in mean_panel.get_legend().get_texts()] == ["gradcam / layer3", "centre"]
    for line, name in zip(mean_panel.get_lines(), ("gradcam/layer3", "centre/-")):
        curves = _stored(randomization_run, f"curves/randomization/{name}")
        np.testing.assert_allclose(line.get_ydata(), curves[~np.isnan(curves).any(axis=1)].mean(axis=0), rtol=1e-6)
        np.testing.assert_array_equal(line.get_xdata(), [1, 2])
    for panel, key in zip(image_panels, KEYS):
        row = _row(randomization_run, key)
        drawn = [line.get_ydata() for line in panel.get_lines()]
        np.testing.assert_allclose(drawn[1], _stored(randomization_run, "curves/randomization/centre/-")[row])
        np.testing.assert_allclose(drawn[0], _stored(randomization_run, "curves/randomization/gradcam/layer3")[row])
    with pytest.raises(ValueError, match="no randomization curves"):
        randomization_cascade(run, KEYS)


def test_curve_bands_stay_in_the_unit_interval(tiny_run: Path, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy)
    with h5py.File(copy / "results.h5", "r+") as f:  # probabilities near 1 and spread out: the band passes 1
        curves = f["curves/insertion/rise/-"]
        spread = np.where(np.arange(curves.shape[0]) % 2, 0.99, 0.6)[:, None]
        curves[...] = np.where(np.isnan(curves[()]), np.nan, np.broadcast_to(spread, curves.shape))
        written = f["curves/insertion/rise/-"][()]
    written = written[~np.isnan(written).any(axis=1)]
    assert (written.mean(axis=0) + written.std(axis=0, ddof=1)).max() > 1.0
    figure = curve_plot(load_run(copy), ["insertion"], ["rise"], band="std")
    for ax in figure.axes:
        assert ax.get_ylim() == (0.0, 1.02)
        for band in (c for c in ax.collections if isinstance(c, PolyCollection)):
            vertices = band.get_paths()[0].vertices[:, 1]
            assert vertices.min() >= 0.0 and vertices.max() <= 1.0


def test_twelve_views_get_distinct_styles_and_facets(run: Run) -> None:
    styles = palette(12)
    assert len(set(styles)) == 12 and len({colour for colour, _ in styles}) == 12
    assert palette(13)[12] == (styles[0][0], "--")  # beyond twelve: the colours again, dashed
    views = run.views()
    figure = curve_plot(run, ["insertion", "deletion"], facets=True)
    panels = [ax for ax in figure.axes if ax.get_lines()]
    assert len(panels) == 2 * len(views)
    first = panels[0]
    assert first.get_title() == "Insertion ↑: gradcam / layer2"
    coloured = [line for line in first.get_lines() if line.get_color() != "0.8"]
    assert len(coloured) == 1 and len(first.get_lines()) == len(views)  # the others' means in grey
    assert any(isinstance(c, PolyCollection) for c in first.collections)
    many = curve_plot(run, ["insertion"], [*views, *views])  # more than MAX_BANDS views: no bands in one panel
    assert len(many.axes[0].get_lines()) == 2 * len(views) > MAX_BANDS
    assert not any(isinstance(c, PolyCollection) for c in many.axes[0].collections)


@pytest.mark.parametrize("kind", ["box", "violin"])
def test_metric_distributions_one_panel_per_metric(run: Run, tiny_run: Path, kind: str) -> None:
    figure = metric_distributions(run, kind=kind)
    assert [ax.get_title() for ax in figure.axes] == ["Insertion ↑", "Deletion ↓", "PCC ↑", "Pointing game ↑"]
    for ax in figure.axes:
        assert [t.get_text() for t in ax.get_xticklabels()] == ["gradcam / layer2", "gradcam / layer3", "rise"]
    points = figure.axes[2].collections[-1].get_offsets()[:, 1]
    assert sorted(points) == pytest.approx(sorted(_csv_values(tiny_run, "pcc", "rise", "-")))
    only = metric_distributions(run, ["deletion"], [("gradcam", "layer3")], kind=kind)
    assert len(only.axes) == 1
    assert [t.get_text() for t in only.axes[0].get_xticklabels()] == ["gradcam / layer3"]


def test_metric_heatmap_cells_are_the_means(run: Run, tiny_run: Path) -> None:
    figure = metric_heatmap(run, "deletion")
    ax = figure.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["gradcam", "rise"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["layer2", "layer3", "(no layer)"]
    grid = ax.get_images()[0].get_array()
    for i, method in enumerate(("gradcam", "rise")):
        for j, layer in enumerate(("layer2", "layer3", "-")):
            values = _csv_values(tiny_run, "deletion", method, layer)
            if values:
                assert grid[i, j] == pytest.approx(np.mean(values))
            else:
                assert np.ma.is_masked(grid[i, j])
    assert "Deletion ↓" in ax.get_title()
    with pytest.raises(ValueError, match="unknown 'ssim'"):
        metric_heatmap(run, "ssim")


def test_ground_truth_comparison_skips_images_without_one(run: Run, tiny_run: Path, no_gt_key: str) -> None:
    figure = ground_truth_comparison(run, [no_gt_key, "cross/cross_0000"], ["gradcam"])
    panels = [ax for ax in figure.axes if ax.get_images()]
    assert len(panels) == 1 * (2 + 2)
    images = json.loads((tiny_run / "plan.json").read_text())["images"]
    gt_path = images["gt"][images["keys"].index("cross/cross_0000")]
    gt = np.asarray(Image.open(gt_path).convert("L"), dtype=np.float64) / 255
    np.testing.assert_allclose(panels[1].get_images()[0].get_array(), _minmax(gt), atol=1e-5)
    assert [ax.get_title().split("\n")[0] for ax in panels[1:]] == ["ground truth", "gradcam / layer2",
                                                                    "gradcam / layer3"]
    with pytest.raises(ValueError, match="none of the given images has a ground-truth map"):
        ground_truth_comparison(run, [no_gt_key])


def test_save_figure_writes_png_at_the_dpi_and_pdf(run: Run, tmp_path: Path) -> None:
    figure = metric_heatmap(run, "insertion")
    files = save_figure(figure, tmp_path / "out" / "heat.map", pdf=True, dpi=50)
    assert [f.name for f in files] == ["heat.map.png", "heat.map.pdf"]
    width, height = figure.get_size_inches()
    with Image.open(files[0]) as png:
        assert png.size == (round(width * 50), round(height * 50))
    assert files[1].read_bytes().startswith(b"%PDF")
