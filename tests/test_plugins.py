"""Plug-in methods and metrics: registered by decorator, named ``module:attr`` or by entry point,
validated at plan time, sharded, scored and tabulated like the built-ins."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import pytest
import torch

import pipeline.methods
from pipeline.cli import main
from pipeline.config import ConfigError, MetricConfig, config_dict, parse_config
from pipeline.methods import Explainer, method_class, method_names, register_method
from pipeline.metrics import METRICS, metric_names, metric_spec
from pipeline.planning import Plan
from pipeline.plugins import PluginError
from pipeline.stages.score import score_maps
from tests.methods.helpers import make_tiny_cam_net, seeded_batch
from tests.plugin_example import AbsGradCam, Occlusion, sparsity
from tests.tiny_experiment import ConfigFactory, YamlWriter


@pytest.fixture(autouse=True)
def _registries_restored() -> Iterator[None]:
    """Plug-ins found or registered by a test are forgotten after it (``sparsity``, registered on import, stays)."""
    methods, metrics = dict(pipeline.methods._REGISTRY), dict(METRICS)
    yield
    for registry, saved in ((pipeline.methods._REGISTRY, methods), (METRICS, metrics)):
        registry.clear()
        registry.update(saved)  # type: ignore[arg-type]


def test_score_maps_follows_each_metric_specification() -> None:
    model = make_tiny_cam_net()
    images, targets = seeded_batch(0, [1, 2, 3])
    maps = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(1))
    gt = [torch.rand(32, 32), None, torch.rand(32, 32)]
    top_mass = "tests.plugin_example:TOP_MASS"
    metrics = [MetricConfig(name=n) for n in ("sparsity", top_mass, "average_drop", "average_increase")]
    values, curves = score_maps(model, images, maps, targets, gt, metrics)
    torch.testing.assert_close(torch.from_numpy(values["sparsity"]), sparsity(maps))
    assert np.isnan(values[top_mass][1]) and not np.isnan(values[top_mass][[0, 2]]).any()
    assert curves[top_mass].shape == (3, 4) and np.isnan(curves[top_mass][1]).all()
    assert set(values["average_increase"]) <= {0.0, 100.0}
    assert list(curves) == [top_mass]


def test_a_decorated_metric_and_method_are_found_by_name() -> None:
    assert METRICS["sparsity"].parameters == ("quantile",) and METRICS["sparsity"].group == "groundtruth"
    assert "sparsity" in metric_names()

    @register_method("constant-test")
    class Constant(Explainer):
        def explain(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return torch.ones(images.shape[0], *images.shape[-2:])

    assert method_class("constant-test") is Constant and Constant.name == "constant-test"
    assert "constant-test" in method_names()
    with pytest.raises(ValueError, match="already registered"):
        register_method("constant-test")(AbsGradCam)


def test_bad_plugin_names_are_clear() -> None:
    with pytest.raises(PluginError, match="cannot import 'tests.nowhere'"):
        method_class("tests.nowhere:Thing")
    with pytest.raises(PluginError, match="has no attribute 'Missing'"):
        metric_spec("tests.plugin_example:Missing")
    with pytest.raises(PluginError, match="not an Explainer subclass"):
        method_class("tests.plugin_example:sparsity")
    with pytest.raises(PluginError, match="neither a MetricSpec nor a function decorated"):
        metric_spec("tests.plugin_example:AbsGradCam")


def test_entry_points_name_plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    info = tmp_path / "lab_plugins-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lab-plugins\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[xai_pipeline.methods]\nrow-occ = tests.plugin_example:Occlusion\n\n"
        "[xai_pipeline.metrics]\nlab-sparsity = tests.plugin_example:sparsity\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "row-occ" in method_names() and "lab-sparsity" in metric_names()
    assert method_class("row-occ") is Occlusion
    assert metric_spec("lab-sparsity").function is sparsity and metric_spec("lab-sparsity").name == "lab-sparsity"


def test_plugins_run_through_plan_shards_and_tables(
    make_config: ConfigFactory, write_yaml: YamlWriter, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = make_config()
    raw["methods"] = [
        {"name": "tests.plugin_example:AbsGradCam", "id": "abs", "layers": ["layer3"]},
        {"name": "tests.plugin_example:Occlusion", "id": "occ", "params": {"n_samples": 8, "batch_size": 4}},
    ]
    raw["metrics"] = [{"name": "deletion", "params": {"step": 256}},
                      {"name": "tests.plugin_example:sparsity", "params": {"quantile": 0.5}},
                      {"name": "tests.plugin_example:TOP_MASS"}]
    raw["sharding"] = {"images_per_shard": 6, "samples_per_shard": 4}
    run_dir = tmp_path / "run"
    assert main(["run", str(write_yaml(raw)), "--out", str(run_dir), "--no-progress"]) == 0
    assert "Top mass ↑" in capsys.readouterr().out
    plan = Plan.read(run_dir / "plan.json")
    assert sorted(s.samples for s in plan.stage("explain") if s.method == "occ") == [(0, 4), (0, 4), (4, 8), (4, 8)]
    table = pd.read_csv(run_dir / "metrics.csv")
    counts = table.dropna(subset=["value"]).groupby(["method", "metric"]).size().to_dict()
    assert counts[("occ", "tests.plugin_example:sparsity")] == 12 and counts[("abs", "deletion")] == 12
    assert counts[("abs", "tests.plugin_example:TOP_MASS")] == 9  # the images with ground truth


def test_plugin_parameters_are_validated_at_plan_time(make_config: ConfigFactory) -> None:
    raw = make_config()
    raw["methods"] = [{"name": "tests.plugin_example:Occlusion", "params": {"n_sample": 8}}]
    raw["metrics"] = [{"name": "tests.plugin_example:sparsity", "params": {"q": 1}}]
    with pytest.raises(ConfigError) as error:
        parse_config(raw)
    message = str(error.value)
    assert "has no parameter n_sample; valid parameters: n_samples, seed, batch_size" in message
    assert "has no parameter q; valid parameters: quantile" in message


def test_plugins_listed_in_the_config_are_imported_before_it_is_validated(
    make_config: ConfigFactory, write_yaml: YamlWriter
) -> None:
    raw = make_config()
    raw["metrics"] = [{"name": "sparsity"}]  # registered by tests.plugin_example's decorator
    code = ("import sys; from pipeline.config import load_config\n"
            "try:\n    load_config(sys.argv[1])\nexcept Exception as error:\n    print(error)\nelse:\n    print('ok')")
    repo = Path(__file__).resolve().parents[1]

    def load(config: dict[str, Any], name: str) -> str:  # a fresh process, as a worker node is
        done = subprocess.run([sys.executable, "-c", code, str(write_yaml(config, name))], capture_output=True,
                              text=True, cwd=repo, check=True)
        return done.stdout.strip()

    assert "unknown metric 'sparsity'" in load(raw, "without.yaml")
    assert load({**raw, "plugins": ["tests.plugin_example"]}, "with.yaml") == "ok"
    assert "plugins[0]: cannot import 'tests.nowhere'" in load({**raw, "plugins": ["tests.nowhere"]}, "bad.yaml")
    config = parse_config({**raw, "plugins": ["tests.plugin_example"]})
    assert config_dict(config)["plugins"] == ["tests.plugin_example"]
    assert "plugins" not in config_dict(parse_config(make_config()))  # an old config keeps its hash
