"""The run loader against the files of a real tiny run, read independently with h5py, csv and PIL."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from pipeline.analysis import Run, load_run


def _h5_keys(run_dir: Path) -> list[str]:
    with h5py.File(run_dir / "results.h5", "r") as f:
        return [k.decode() for k in f["images/keys"][()]]


@pytest.fixture(scope="module")
def run(tiny_run: Path) -> Run:
    return load_run(tiny_run)


def test_images_table_follows_the_plan(run: Run, tiny_run: Path, broken_key: str) -> None:
    plan = json.loads((tiny_run / "plan.json").read_text())
    expected_keys = plan["images"]["keys"]
    assert list(run.images["key"]) == expected_keys == sorted(expected_keys)
    assert list(run.images["label"]) == plan["images"]["labels"]
    names = plan["class_names"]
    assert list(run.images["class_name"]) == [names[label] for label in plan["images"]["labels"]]
    assert list(run.images["has_gt"]) == [gt is not None for gt in plan["images"]["gt"]]
    failed = run.images.set_index("key")["failed"]
    assert failed[broken_key] and failed.sum() == 1
    with h5py.File(tiny_run / "results.h5", "r") as f:
        np.testing.assert_array_equal(run.images["target_prob"], f["images/target_prob"][()])
        predicted = f["images/predicted"][()]
    ok = ~run.images["failed"].to_numpy()
    assert list(run.images["predicted_name"][ok]) == [names[i] for i in predicted[ok]]


def test_methods_layers_and_views(run: Run) -> None:
    assert run.methods == ["gradcam", "rise"]
    assert run.layers("gradcam") == ["layer2", "layer3"]
    assert run.layers("rise") == ["-"]
    assert run.views() == [("gradcam", "layer2"), ("gradcam", "layer3"), ("rise", "-")]
    assert run.views(["rise", ("gradcam", "layer3")]) == [("rise", "-"), ("gradcam", "layer3")]
    assert set(run.curve_metrics) == {"insertion", "deletion"}
    assert run.metric_names == ["insertion", "deletion", "pcc", "pointing_game"]


def test_maps_are_aligned_with_the_keys_asked_for(run: Run, tiny_run: Path, broken_key: str) -> None:
    keys = _h5_keys(tiny_run)
    wanted = [keys[5], keys[0], keys[3], keys[5]]
    maps = run.maps("gradcam", "layer3", keys=wanted)
    assert maps.shape == (4, 32, 32)
    with h5py.File(tiny_run / "results.h5", "r") as f:
        stored = f["maps/gradcam/layer3"]
        for got, key in zip(maps, wanted):
            np.testing.assert_array_equal(got, stored[keys.index(key)])
        np.testing.assert_array_equal(run.maps("rise"), f["maps/rise/-"][()])
        np.testing.assert_array_equal(run.maps("rise", indices=[-1, 2]), f["maps/rise/-"][[2, 8]][::-1])
    single = run.maps("rise", keys=keys[1])
    assert single.shape == (32, 32)
    assert np.isnan(run.maps("rise", keys=broken_key)).all()
    assert np.isfinite(run.maps("rise", keys=keys[0])).all()


def test_reading_one_map_reads_only_that_slice(tiny_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[tuple[str, object]] = []
    original = h5py.Dataset.__getitem__

    def recording(self: h5py.Dataset, selection: object) -> object:
        reads.append((self.name, selection))
        return original(self, selection)

    monkeypatch.setattr(h5py.Dataset, "__getitem__", recording)
    run = load_run(tiny_run)
    assert reads and all(name.startswith(("/images/", "/failures/")) for name, _ in reads)
    reads.clear()
    key = "square/square_0000"
    row = list(run.images["key"]).index(key)
    saliency = run.maps("gradcam", "layer2", keys=key)
    assert saliency.shape == (32, 32)
    assert [name for name, _ in reads] == ["/maps/gradcam/layer2"]
    assert list(np.atleast_1d(reads[0][1])) == [row]
    reads.clear()
    curves = run.curves("deletion", "rise", keys=[key])
    assert curves.shape[0] == 1
    assert [name for name, _ in reads] == ["/curves/deletion/rise/-"]


def test_curves_match_the_metric_values(run: Run, tiny_run: Path, broken_key: str, no_gt_key: str) -> None:
    """The area under each stored insertion curve (trapezoid rule) is the image's insertion value."""
    values: dict[str, float] = {}
    with open(tiny_run / "metrics.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            if (row["metric"], row["method"], row["layer"]) == ("insertion", "gradcam", "layer3"):
                values[row["key"]] = float(row["value"] or "nan")  # NaN: an unusable (e.g. all-zero) map
    curves = run.curves("insertion", "gradcam", "layer3")
    assert curves.shape == (9, 32 * 32 // 64 + 1)
    for key, curve in zip(run.images["key"], curves):
        if key == broken_key:
            assert np.isnan(curve).all() and key not in values
            continue
        if np.isnan(values[key]):
            assert np.isnan(curve).all()
            continue
        steps = len(curve) - 1
        area = sum((curve[i] + curve[i + 1]) / 2 for i in range(steps)) / steps
        assert area == pytest.approx(values[key], abs=1e-5)
    assert sum(np.isfinite(v) for v in values.values()) >= 5  # most maps are usable
    series = run.values("insertion", "gradcam", "layer3")
    assert list(series.index) == list(run.images["key"])
    assert series[no_gt_key] == pytest.approx(values[no_gt_key], nan_ok=True)


def test_metrics_and_summary(run: Run, tiny_run: Path) -> None:
    with open(tiny_run / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(run.metrics) == len(rows)
    assert set(run.metrics["layer"]) == {"layer2", "layer3", "-"}
    pcc = [float(r["value"]) for r in rows if (r["metric"], r["method"], r["layer"]) == ("pcc", "rise", "-")
           and r["value"] not in ("", "nan")]
    summary = run.summary().set_index(["method", "layer", "metric"])
    assert summary.loc[("rise", "-", "pcc"), "mean"] == pytest.approx(sum(pcc) / len(pcc))
    assert summary.loc[("rise", "-", "pcc"), "count"] == len(pcc)
    by_class = run.summary(group_by_class=True)
    assert set(by_class["class_name"]) <= {"circle", "cross", "square", "triangle"}


def test_image_and_ground_truth_are_read_from_disk(run: Run, tiny_run: Path, no_gt_key: str) -> None:
    images = json.loads((tiny_run / "plan.json").read_text())["images"]
    path = images["paths"][images["keys"].index("cross/cross_0001")]
    expected = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255
    image = run.image("cross/cross_0001")
    assert image.shape == (32, 32, 3)
    np.testing.assert_allclose(image, expected, atol=1e-5)
    gt = np.asarray(Image.open(images["gt"][images["keys"].index("cross/cross_0001")]).convert("L"), dtype=np.float64) / 255
    np.testing.assert_allclose(run.ground_truth("cross/cross_0001"), gt, atol=1e-5)
    with pytest.raises(ValueError, match="no ground-truth map"):
        run.ground_truth(no_gt_key)


def test_bad_requests_name_what_is_wrong(run: Run, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'gradcam' has layers layer2, layer3"):
        run.maps("gradcam")
    with pytest.raises(ValueError, match="no layer 'layer9'"):
        run.maps("gradcam", "layer9")
    with pytest.raises(ValueError, match="'lime' has no maps"):
        run.maps("lime")
    with pytest.raises(ValueError, match="unknown image key"):
        run.maps("rise", keys=["nope/img"])
    with pytest.raises(ValueError, match="indices"):
        run.maps("rise", indices=[9])
    with pytest.raises(ValueError, match="no 'ssim' curves"):
        run.curves("ssim", "rise")
    with pytest.raises(FileNotFoundError, match="xai-pipeline reduce"):
        load_run(tmp_path)


def test_compare_pairs_the_views_of_one_metric(run: Run) -> None:
    from scipy import stats

    table = run.compare("insertion", n_resamples=99)
    assert set(table["metric"]) == {"insertion"} and len(table) >= 1
    first = table.iloc[0]
    a = run.values("insertion", first["method_a"], first["layer"] if first["method_a"] != "rise" else None)
    b = run.values("insertion", first["method_b"], first["layer"] if first["method_b"] != "rise" else None)
    both = a.notna() & b.notna()
    assert first["n_images"] == int(both.sum())
    assert first["p_value"] == pytest.approx(stats.wilcoxon(a[both], b[both]).pvalue)
    with pytest.raises(ValueError, match="unknown metric"):
        run.compare("ssim")
