"""Unusable saliency maps (NaN, inf or constant) give NaN values with a reason, and block nothing."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import pytest

from pipeline.config import parse_config
from pipeline.launching import run_local
from pipeline.rundir import plan_run
from pipeline.stages import reduce_run
from pipeline.stages.score import unusable_maps
from tests.tiny_experiment import ConfigFactory

METRICS = ["insertion", "deletion", "pcc", "pointing_game"]


def _run(raw: dict[str, Any], run_dir: Path, factory: str) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Plan, run and reduce ``raw`` with the model ``factory``: metrics, summary and failures tables."""
    raw["model"]["factory"] = factory
    raw["metrics"] = [{"name": "insertion", "params": {"step": 64}}, {"name": "deletion", "params": {"step": 64}},
                      {"name": "pcc"}, {"name": "pointing_game"}]
    plan_run(parse_config(raw), run_dir)
    assert run_local(run_dir, progress=False) == {}
    reduce_run(run_dir, progress=False)
    tables = [pd.read_csv(run_dir / name, keep_default_na=False, na_values=[""])
              for name in ("metrics.csv", "summary.csv", "failures.csv")]
    return tables[0].set_index(["method", "layer", "metric", "key"]).sort_index(), tables[1], tables[2]


def _assert_counted(metrics: pd.DataFrame, summary: pd.DataFrame) -> None:
    """The summary's n_nan and count are the NaN and other values of each group."""
    groups = metrics.groupby(["method", "layer", "metric"])["value"]
    got = summary.set_index(["method", "layer", "metric"]).sort_index()
    np.testing.assert_array_equal(got["n_nan"], groups.apply(lambda v: v.isna().sum()))
    np.testing.assert_array_equal(got["count"], groups.count())


def test_unusable_maps_are_named() -> None:
    maps = np.random.default_rng(0).random((4, 6, 6)).astype(np.float32)
    maps[1, 2, 2] = np.nan
    maps[2, 0, 0] = -np.inf
    maps[3] = 0.25
    assert unusable_maps(maps) == ["", "saliency map has NaN or inf values", "saliency map has NaN or inf values",
                                   "saliency map is constant (0.25 everywhere)"]


def test_nan_logits_give_nan_values_with_reasons_and_the_others_are_scored_as_before(
    make_config: ConfigFactory, tmp_path: Path
) -> None:
    reference, _, _ = _run(make_config(), tmp_path / "plain", "pipeline.demo_model:ShapesNet")
    metrics, summary, failures = _run(make_config(), tmp_path / "nan", "tests.tiny_experiment:NanLogitsNet")
    alpha = metrics.index.get_level_values("key").str.startswith("alpha/")
    assert metrics.index.equals(reference.index)
    np.testing.assert_array_equal(metrics.loc[~alpha, "value"], reference.loc[~alpha, "value"])
    gradcam = metrics.index.get_level_values("method") == "gradcam"
    assert metrics.loc[alpha & gradcam, "value"].isna().all()  # NaN gradients: NaN maps
    with h5py.File(tmp_path / "nan" / "results.h5", "r") as f:
        keys = [k.decode() for k in f["images/keys"][()]]
        for layer in ("layer2", "layer3"):
            maps = f[f"maps/gradcam/{layer}"][()]
            assert np.isnan(maps[[k.startswith("alpha/") for k in keys]]).any(axis=(1, 2)).all()
            assert np.isnan(f[f"curves/insertion/gradcam/{layer}"][()][[k.startswith("alpha/") for k in keys]]).all()
    # every NaN value of an image whose map is not finite is in failures.csv, with that reason
    scored = failures[failures["stage"] == "score"].set_index(["method", "layer", "metric", "key"]).sort_index()
    assert set(scored["error"]) == {"saliency map has NaN or inf values"}
    assert scored.index.isin(metrics.index[metrics["value"].isna()]).all()
    assert set(metrics.index[alpha & gradcam]) <= set(scored.index)
    assert (failures["stage"] == "explain").sum() == 0
    _assert_counted(metrics, summary)
    assert (summary.loc[summary["method"] == "gradcam", "n_nan"] >= 4).all()


def test_constant_logits_give_nan_for_constant_maps_and_other_methods_go_on(
    make_config: ConfigFactory, tmp_path: Path
) -> None:
    metrics, summary, failures = _run(make_config(), tmp_path / "run", "tests.tiny_experiment:ConstantLogitsNet")
    methods = metrics.index.get_level_values("method")
    assert metrics.loc[methods == "gradcam", "value"].isna().all()
    perturbation = metrics.index.get_level_values("metric").isin(["insertion", "deletion"])
    rise = metrics.loc[(methods == "rise") & perturbation, "value"]
    assert len(rise) == 24 and np.isfinite(rise).all()
    assert rise.to_numpy() == pytest.approx(1 / 3)  # one probability for every class, inserted or not
    reasons = failures[failures["method"] == "gradcam"]
    assert len(reasons) == 12 * 2 * len(METRICS)
    assert reasons["error"].str.startswith("saliency map is constant").all()
    assert list(failures.columns) == ["key", "stage", "method", "layer", "metric", "error"]
    _assert_counted(metrics, summary)
    gradcam = summary[summary["method"] == "gradcam"]
    assert len(gradcam) == 2 * len(METRICS) and (gradcam["count"] == 0).all() and (gradcam["n_nan"] == 12).all()
    markdown = (tmp_path / "run" / "summary.md").read_text()
    assert "## NaN values" in markdown


def test_randomization_values_do_not_depend_on_the_sharding(make_config: ConfigFactory, tmp_path: Path) -> None:
    """The randomization shards explain their chunk again on the randomized model: the same values
    and cascades however the images are split, the centre baseline at 1, Grad-CAM below."""
    runs = {}
    for per_shard in (5, 12):
        raw = make_config()
        raw["methods"] = [{"name": "gradcam", "layers": ["layer3"]},
                          {"name": "rise", "params": {"n_masks": 32, "grid_size": 4, "batch_size": 4}},
                          {"name": "centre"}]
        raw["metrics"] = [{"name": "randomization", "params": {"steps": 2, "seed": 3}}]
        raw["sharding"]["images_per_shard"] = per_shard
        run_dir = tmp_path / str(per_shard)
        plan = plan_run(parse_config(raw), run_dir)
        assert {s.metrics for s in plan.stage("score")} == {("randomization",)}
        assert run_local(run_dir, progress=False) == {}
        reduce_run(run_dir, progress=False)
        with h5py.File(run_dir / "results.h5", "r") as f:
            curves = {name: f[f"curves/randomization/{name}"][()] for name in ("gradcam/layer3", "rise/-", "centre/-")}
        metrics = pd.read_csv(run_dir / "metrics.csv").set_index(["method", "layer", "key"]).sort_index()
        runs[per_shard] = metrics["value"], curves
    (values, curves), (other_values, other_curves) = runs[5], runs[12]
    pd.testing.assert_series_equal(values, other_values)
    for name, cascade in curves.items():
        assert cascade.shape == (12, 2)
        np.testing.assert_array_equal(cascade, other_curves[name])
    np.testing.assert_allclose(curves["centre/-"], 1.0)
    np.testing.assert_array_equal(values.loc["centre"].to_numpy(), curves["centre/-"][:, -1])
    assert np.nanmean(curves["gradcam/layer3"][:, 0]) < 0.9
