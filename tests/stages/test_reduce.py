"""pipeline.stages.reduce: results.h5 layout, merged maps, metric tables, independence of the sharding."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline.analysis import load_run
from pipeline.config import parse_config
from pipeline.launching import run_local
from pipeline.planning import Plan
from pipeline.stages import ReduceError, reduce_run
from pipeline.rundir import plan_run
from pipeline.methods.base import FIXED_POINT_BITS
from pipeline.store import read_shard
from pipeline.run_dir import RunDir
from tests.tiny_experiment import CLASSES, IMAGE_SIZE, ConfigFactory, FinishedRun, ImageTree

LAYERS = [("gradcam", "layer2"), ("gradcam", "layer3"), ("rise", "-")]
METRICS = ["insertion", "deletion", "pcc"]


def _plan(run_dir: Path) -> Plan:
    return Plan.read(run_dir / "plan.json")


def _strings(dataset: h5py.Dataset) -> list[str]:
    return [s.decode() for s in dataset[()]]


def test_results_layout(finished_run: FinishedRun) -> None:
    plan = _plan(finished_run.run_dir)
    n = len(plan.records)
    assert n == 13
    broken = plan.keys.index(finished_run.broken_key)
    with h5py.File(finished_run.run_dir / "results.h5", "r") as f:
        assert json.loads(f.attrs["class_names"]) == list(CLASSES)
        assert list(f.attrs["image_size"]) == [IMAGE_SIZE, IMAGE_SIZE]
        assert (f.attrs["config_hash"], f.attrs["model_digest"]) == (plan.config_hash, plan.model_digest)
        assert _strings(f["images/keys"]) == plan.keys == sorted(plan.keys)
        np.testing.assert_array_equal(f["images/labels"][()], [r.label for r in plan.records])
        np.testing.assert_array_equal(f["images/has_gt"][()], [r.gt_path is not None for r in plan.records])
        failed = f["images/failed"][()]
        assert failed.dtype == bool and list(np.flatnonzero(failed)) == [broken]
        assert (f["images/targets"][broken], f["images/predicted"][broken]) == (-1, -1)
        assert np.isnan(f["images/target_prob"][broken])
        ok = ~failed
        assert (f["images/targets"][()][ok] >= 0).all() and (f["images/target_prob"][()][ok] > 0).all()
        assert set(f["maps"]) == {"gradcam", "rise"}
        assert set(f["maps/gradcam"]) == {"layer2", "layer3"} and set(f["maps/rise"]) == {"-"}
        for method, layer in LAYERS:
            maps = f[f"maps/{method}/{layer}"][()]
            assert maps.shape == (n, IMAGE_SIZE, IMAGE_SIZE) and maps.dtype == np.float32
            assert np.isnan(maps[broken]).all()
            assert np.isfinite(maps[ok]).all()
        assert set(f["curves"]) == {"insertion", "deletion"}
        for metric in ("insertion", "deletion"):
            for method, layer in LAYERS:
                curves = f[f"curves/{metric}/{method}/{layer}"][()]
                assert curves.shape == (n, IMAGE_SIZE * IMAGE_SIZE // 64 + 1)
                assert np.isnan(curves[broken]).all() and np.isfinite(curves[ok]).all()
        assert _strings(f["failures/keys"]) == [finished_run.broken_key]
        assert "cannot read image" in _strings(f["failures/messages"])[0]
    failures = pd.read_csv(finished_run.run_dir / "failures.csv")
    assert list(failures["key"]) == [finished_run.broken_key]


def test_merged_maps_equal_the_shards(finished_run: FinishedRun) -> None:
    run_dir = finished_run.run_dir
    plan = _plan(run_dir)
    row = {k: i for i, k in enumerate(plan.keys)}
    p1 = 0.5
    with h5py.File(run_dir / "results.h5", "r") as f:
        gradcam = {layer: f[f"maps/gradcam/{layer}"][()] for layer in ("layer2", "layer3")}
        rise = f["maps/rise/-"][()]
    for chunk in plan.chunks():
        (explain,) = [s for s in plan.stage("explain") if s.method == "gradcam" and s.images == chunk]
        output = read_shard(RunDir(run_dir).shard(explain.id))
        rows = [row[k] for k in output.keys]
        for layer, maps in gradcam.items():
            np.testing.assert_array_equal(maps[rows], output.maps[layer])
        parts = [read_shard(RunDir(run_dir).shard(s.id)) for s in plan.stage("explain")
                 if s.method == "rise" and s.images == chunk]
        assert len(parts) == 2
        weighted = sum(p.sums["weighted"] for p in parts) * 2.0 ** -FIXED_POINT_BITS  # int64 fixed point
        count = sum(p.sums["count"] for p in parts)
        assert (count == 64).all()
        np.testing.assert_allclose(rise[rows], weighted / (count[:, None, None] * p1), rtol=1e-6)


def test_metrics_table_rows_and_values(finished_run: FinishedRun) -> None:
    run_dir = finished_run.run_dir
    plan = _plan(run_dir)
    metrics = pd.read_csv(run_dir / "metrics.csv", keep_default_na=False, na_values=[""])
    assert list(metrics.columns) == ["key", "label", "class_name", "target", "predicted", "method", "layer",
                                     "metric", "value"]
    readable = [k for k in plan.keys if k != finished_run.broken_key]
    assert len(metrics) == len(readable) * len(LAYERS) * len(METRICS) == 108
    counts = metrics.groupby(["method", "layer", "metric"]).size()
    assert set(counts) == {len(readable)} and len(counts) == 9
    assert finished_run.broken_key not in set(metrics["key"])
    records = {r.key: r for r in plan.records}
    assert (metrics["class_name"] == [CLASSES[records[k].label] for k in metrics["key"]]).all()
    assert (metrics["label"] == [records[k].label for k in metrics["key"]]).all()
    pcc = metrics[metrics["metric"] == "pcc"]
    no_gt = pcc["key"].map(lambda k: records[k].gt_path is None)
    assert pcc.loc[no_gt, "value"].isna().all() and no_gt.sum() == 3 * len(LAYERS)
    for shard in plan.stage("score"):
        output = read_shard(RunDir(run_dir).shard(shard.id))
        for metric, values in output.values.items():
            rows = metrics[(metrics["method"] == shard.method) & (metrics["layer"] == shard.layers[0])
                           & (metrics["metric"] == metric)].set_index("key")
            np.testing.assert_allclose(rows.loc[output.keys, "value"].to_numpy(), values, rtol=1e-12)


def test_summary_equals_a_pandas_groupby(finished_run: FinishedRun) -> None:
    metrics = pd.read_csv(finished_run.run_dir / "metrics.csv", keep_default_na=False, na_values=[""])
    summary = pd.read_csv(finished_run.run_dir / "summary.csv", keep_default_na=False, na_values=[""])
    expected = (metrics.dropna(subset=["value"]).groupby(["method", "layer", "metric"])["value"]
                .agg(["mean", "var", "std", "count"]))
    got = summary.set_index(["method", "layer", "metric"]).sort_index()
    assert list(got.index) == list(expected.index)
    for column in ("mean", "var", "std", "count"):
        np.testing.assert_allclose(got[column], expected[column], rtol=1e-9, err_msg=column)
    assert got.loc[("rise", "-", "pcc"), "count"] == 9


def test_reduce_with_a_missing_shard_says_how_many(run_copy: Path) -> None:
    plan = _plan(run_copy)
    victims = [plan.stage("score")[0], plan.stage("explain")[-1]]
    for shard in victims:
        RunDir(run_copy).shard(shard.id).unlink()
    with pytest.raises(ReduceError) as error:
        reduce_run(run_copy, progress=False)
    message = str(error.value)
    assert f"2 of {len(plan.shards)} shards are not committed" in message
    assert all(shard.id in message for shard in victims)
    assert "xai-pipeline resume" in message or "status" in message


def _run(raw: dict[str, Any], run_dir: Path) -> Path:
    plan_run(parse_config(raw), run_dir)
    assert run_local(run_dir, progress=False) == {}
    return reduce_run(run_dir, progress=False).results


def test_merged_maps_do_not_depend_on_the_sharding(make_config: ConfigFactory, tmp_path: Path) -> None:
    n_masks = 64
    results = []
    for images_per_shard, samples_per_shard in ((12, n_masks), (5, n_masks // 4)):
        raw = make_config()
        raw["metrics"] = [{"name": "pcc"}]
        raw["sharding"] = {"images_per_shard": images_per_shard, "samples_per_shard": samples_per_shard}
        results.append(_run(raw, tmp_path / f"run-{images_per_shard}"))
    shards = [len(_plan(r.parent).stage("explain")) for r in results]
    assert shards == [1 + 1, 3 + 3 * 4]
    with h5py.File(results[0], "r") as one, h5py.File(results[1], "r") as other:
        assert _strings(one["images/keys"]) == _strings(other["images/keys"])
        np.testing.assert_array_equal(one["images/targets"][()], other["images/targets"][()])
        for method, layer in LAYERS:
            a, b = one[f"maps/{method}/{layer}"][()], other[f"maps/{method}/{layer}"][()]
            assert np.abs(a).max() > 0
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7 * np.abs(a).max(), err_msg=f"{method}/{layer}")


def test_a_chunk_whose_images_all_fail_gives_nan_rows(
    make_config: ConfigFactory, tree_copy: ImageTree, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    plan = plan_run(parse_config(make_config(root=tree_copy.root, gt_dir=tree_copy.gt_dir)), run_dir)
    lost = plan.keys[:5]
    for record in plan.records[:5]:  # the first chunk becomes unreadable after planning
        record.path.write_bytes(b"garbage")
    assert run_local(run_dir, progress=False) == {}
    result = reduce_run(run_dir, progress=False)
    assert sorted(result.failures) == lost
    with h5py.File(result.results, "r") as f:
        np.testing.assert_array_equal(f["images/failed"][()], [k in lost for k in plan.keys])
        for method, layer in LAYERS:
            maps = f[f"maps/{method}/{layer}"][()]
            assert np.isnan(maps[:5]).all() and np.isfinite(maps[5:]).all()
            curves = f[f"curves/insertion/{method}/{layer}"][()]
            assert np.isnan(curves[:5]).all() and np.isfinite(curves[5:]).all()
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert len(metrics) == 7 * len(LAYERS) * len(METRICS) and not set(lost) & set(metrics["key"])
    assert sorted(pd.read_csv(run_dir / "failures.csv")["key"]) == lost


def test_sample_splits_give_bitwise_identical_maps(make_config: ConfigFactory, tmp_path: Path) -> None:
    results = []
    for samples_per_shard in (64, 6):
        raw = make_config()
        raw["methods"] = [
            {"name": "rise", "params": {"n_masks": 24, "grid_size": 4, "batch_size": 5}},
            {"name": "rise-gaussian", "params": {"n_masks": 24, "grid_size": 4, "batch_size": 10}},
            {"name": "lime", "params": {"n_samples": 24, "segmentation": "slic", "n_segments": 8, "batch_size": 10}},
        ]
        raw["metrics"] = [{"name": "pcc"}]
        raw["sharding"] = {"images_per_shard": 5, "samples_per_shard": samples_per_shard}
        results.append(_run(raw, tmp_path / f"run-{samples_per_shard}"))
    assert len(_plan(results[1].parent).stage("explain")) > 3 * len(_plan(results[0].parent).stage("explain"))
    with h5py.File(results[0], "r") as one, h5py.File(results[1], "r") as other:
        for method in ("rise", "rise-gaussian", "lime"):
            a, b = one[f"maps/{method}/-"][()], other[f"maps/{method}/-"][()]
            assert np.abs(a).max() > 0
            np.testing.assert_array_equal(a, b, err_msg=method)  # bit for bit, on any CPU
    tables = [pd.read_parquet(r.parent / "metrics.parquet") for r in results]
    pd.testing.assert_frame_equal(tables[0], tables[1])


def test_reduce_lists_the_shard_folders_once_and_builds_no_model(
    make_config: ConfigFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = make_config()
    raw["sharding"] = {"images_per_shard": 1, "samples_per_shard": 16}
    run_dir = tmp_path / "run"
    plan = plan_run(parse_config(raw), run_dir)
    assert len(plan.shards) > 100
    assert run_local(run_dir, progress=False) == {}
    listed: list[str] = []
    scandir, listdir = os.scandir, os.listdir

    def counting_scandir(path: Any) -> Any:
        listed.append(os.fspath(path))
        return scandir(path)

    def counting_listdir(path: Any = ".") -> Any:
        listed.append(os.fspath(path))
        return listdir(path)

    def no_model(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("reduce built the model")

    monkeypatch.setattr(os, "scandir", counting_scandir)
    monkeypatch.setattr(os, "listdir", counting_listdir)
    monkeypatch.setattr("pipeline.models.build_model", no_model)
    monkeypatch.setattr("pipeline.stages.context.build_model", no_model)
    reduce_run(run_dir, progress=False)
    in_shards = [p for p in listed if p.startswith(str(run_dir / "shards"))]
    prefixes = {s.id[:2] for s in plan.shards}
    assert len(in_shards) == len(set(in_shards)) == 1 + len(prefixes)


def test_metric_table_as_parquet_and_csv(run_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    parquet = pd.read_parquet(run_copy / "metrics.parquet")
    csv = pd.read_csv(run_copy / "metrics.csv", keep_default_na=False, na_values=[""])
    assert list(parquet.columns) == list(csv.columns)
    pd.testing.assert_frame_equal(parquet, csv, check_dtype=False)
    monkeypatch.setattr("pipeline.stages.reduce.CSV_MAX_ROWS", len(parquet) - 1)
    result = reduce_run(run_copy, progress=False)
    assert not (run_copy / "metrics.csv").exists()  # too many rows for CSV: Parquet only
    pd.testing.assert_frame_equal(result.metrics, parquet)
    assert not [p for p in run_copy.iterdir() if p.name.startswith(".")]  # no temporary file left


@pytest.mark.parametrize("maps", ["none", "sample"])
def test_results_keep_maps_of_no_image_or_a_sample(finished_run: FinishedRun, run_copy: Path, maps: str) -> None:
    config = yaml.safe_load((run_copy / "config.yaml").read_text())
    config["results"] = {"maps": maps, "sample_size": 4}
    (run_copy / "config.yaml").write_text(yaml.safe_dump(config))
    reduce_run(run_copy, progress=False)
    kept = 0 if maps == "none" else 4
    with h5py.File(run_copy / "results.h5", "r") as f, h5py.File(finished_run.run_dir / "results.h5", "r") as full:
        map_row = f["images/map_row"][()]
        rows = np.flatnonzero(map_row >= 0)
        assert len(rows) == kept and sorted(map_row[rows]) == list(range(kept))
        for method, layer in LAYERS:
            stored = f[f"maps/{method}/{layer}"][()]
            assert stored.shape == (kept, IMAGE_SIZE, IMAGE_SIZE)
            np.testing.assert_array_equal(stored[map_row[rows]], full[f"maps/{method}/{layer}"][()][rows])
            np.testing.assert_array_equal(f[f"curves/insertion/{method}/{layer}"][()],
                                          full[f"curves/insertion/{method}/{layer}"][()])
    pd.testing.assert_frame_equal(pd.read_parquet(run_copy / "metrics.parquet"),
                                  pd.read_parquet(finished_run.run_dir / "metrics.parquet"))
    run = load_run(run_copy)
    assert run.has_maps.sum() == kept
    if kept:
        key = run.images["key"][run.has_maps].iloc[0]
        np.testing.assert_array_equal(run.maps("rise", keys=key), load_run(finished_run.run_dir).maps("rise", keys=key))
    with pytest.raises(ValueError, match="keeps no maps"):
        run.maps("rise", keys=run.images["key"][~run.has_maps].iloc[0])
