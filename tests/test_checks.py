"""pipeline.checks: every method and metric entry's parameter values are checked at plan time."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from torch import nn

from pipeline.checks import check_entries, check_layers
from pipeline.config import ConfigError, parse_config
from pipeline.models import build_model
from pipeline.rundir import plan_run
from tests.tiny_experiment import ConfigFactory

#: changes a config dict of the tiny experiment
Change = Callable[[dict[str, Any]], None]


def _set(section: str, index: int, **params: Any) -> Change:
    return lambda raw: raw[section][index].setdefault("params", {}).update(params)


def _add_method(name: str, layers: list[str] | None = None, **params: Any) -> Change:
    entry: dict[str, Any] = {"name": name, "params": params}
    if layers:
        entry["layers"] = layers
    return lambda raw: raw["methods"].append(entry)


def _add_metric(name: str, **params: Any) -> Change:
    return lambda raw: raw["metrics"].append({"name": name, "params": params})


#: the tiny experiment has methods [gradcam, rise] and metrics [insertion, deletion, pcc]
BAD_VALUES: list[tuple[Change, str]] = [
    (_set("methods", 1, p1=1.5), "methods[1].params.p1: p1 should be less than or equal to 1, got 1.5"),
    (_set("methods", 1, n_masks=0), "methods[1].params.n_masks: n_masks should be greater than or equal to 1, got 0"),
    (_set("methods", 1, grid_size=2.5), "methods[1].params.grid_size: grid_size should be a valid integer, got 2.5"),
    (_add_method("rise-gaussian", std=-0.5), "methods[2].params.std: std should be greater than or equal to 0, got -0.5"),
    (
        _add_method("lime", segmentation="foo"),
        "methods[2].params.segmentation: segmentation should be 'quickshift' or 'slic' or should be callable, got 'foo'",
    ),
    (_add_method("lime", hide_color=[0.0, 0.0]), "methods[2].params.hide_color: hide_color has 2 values"),
    (_add_method("lime", hide_color=0), "methods[2].params.hide_color: hide_color should be 'mean' or 'segment_mean' or should be an instance of Sequence, got 0"),
    (
        _add_method("scorecam", ["layer3"], weights="softmax"),
        "methods[2].params.weights: weights should be 'probability' or 'cic-softmax', got 'softmax'",
    ),
    (_add_method("abscam-final", ["layer3"], batch_size=0), "methods[2].params.batch_size: batch_size should be greater than or equal to 1, got 0"),
    (_add_method("fem", ["layer3"], k="two"), "methods[2].params.k: k should be a valid number, got 'two'"),
    (_add_method("extremal", areas=[0.1, 2]), "methods[2].params.areas: areas should be a valid number, got [0.1, 2]; or areas[1] should be less than 1, got 2"),
    (_set("metrics", 0, step=0), "metrics[0].params.step: step should be greater than or equal to 1, got 0"),
    (_set("metrics", 1, step=5000), "metrics[1].params.step: step 5000 exceeds the 1024 pixels of a 32x32 map"),
    (
        _set("metrics", 1, substrate="noise"),
        "metrics[1].params.substrate: substrate should be 'blur', 'zeros' or 'mean' or should be an instance of Tensor, got 'noise'",
    ),
    (_set("metrics", 0, batch_size=-3), "metrics[0].params.batch_size: batch_size should be greater than or equal to 1, got -3"),
    (_add_metric("ssim", sigma=-1), "metrics[3].params.sigma: sigma should be greater than 0, got -1"),
    (_add_metric("ssim", win_size=4), "metrics[3].params.win_size: win_size must be odd, got 4"),
    (_add_metric("ssim", sigma=5.0, gaussian_weights=True), "metrics[3].params.win_size: win_size 37 exceeds the map size (32, 32)"),
    (_add_metric("average_drop", top_percent=0), "metrics[3].params.top_percent: top_percent should be greater than 0, got 0"),
    (_add_metric("average_increase", batch_size=0), "metrics[3].params.batch_size: batch_size should be greater than or equal to 1, got 0"),
    (_add_metric("pointing_game", threshold=1.5), "metrics[3].params.threshold: threshold must be a number in [0, 1)"),
    (_add_metric("pointing_game", tolerance=-1), "metrics[3].params.tolerance: tolerance should be greater than or equal to 0, got -1"),
    (_add_metric("pointing_game", relative="yes"), "metrics[3].params.relative: relative should be a valid boolean, got 'yes'"),
    (_add_metric("randomization", steps=0), "metrics[3].params.steps: steps should be greater than or equal to 1, got 0"),
    (_add_metric("randomization", blocks="fc"), "metrics[3].params.blocks: blocks 'str' instances are not allowed as a Sequence value, got 'fc'"),
    (_add_metric("randomization", steps=6), "metrics[3].params.steps: steps (6) exceeds the model's 5 blocks"),
    (_add_metric("randomization", blocks=["layer3", "head"]),
     "metrics[3].params.blocks: blocks: unknown layer 'head'"),
]


@pytest.mark.parametrize(("change", "line"), BAD_VALUES, ids=[line.split(":")[0] for _, line in BAD_VALUES])
def test_a_bad_value_fails_the_plan_naming_its_field_before_anything_is_written(
    make_config: ConfigFactory, tmp_path: Path, change: Change, line: str
) -> None:
    raw = make_config()
    change(raw)
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError) as error:
        plan_run(parse_config(raw), run_dir)
    lines = str(error.value).splitlines()
    assert lines[0] == "1 bad parameter value:"
    assert lines[1].strip().startswith(line)
    assert not (run_dir / "plan.json").exists()
    assert not run_dir.exists()


def test_every_problem_is_listed_on_its_own_line(make_config: ConfigFactory, tmp_path: Path) -> None:
    raw = make_config()
    raw["methods"][1]["params"]["p1"] = 1.5
    raw["methods"].append({"name": "lime", "params": {"segmentation": "foo", "n_samples": 10}})
    raw["metrics"][0]["params"]["step"] = 0
    raw["metrics"].append({"name": "ssim", "params": {"sigma": -1}})
    with pytest.raises(ConfigError) as error:
        plan_run(parse_config(raw), tmp_path / "run")
    lines = [line.strip() for line in str(error.value).splitlines()]
    assert lines[0] == "4 bad parameter values:"
    assert [line.split(":")[0] for line in lines[1:]] == [
        "methods[1].params.p1",
        "methods[2].params.segmentation",
        "metrics[0].params.step",
        "metrics[3].params.sigma",
    ]
    assert not (tmp_path / "run").exists()


def test_a_valid_config_with_every_method_and_metric_is_planned(make_config: ConfigFactory, tmp_path: Path) -> None:
    raw = make_config()
    raw["methods"] += [
        {"name": "rise-gaussian", "params": {"n_masks": 8, "std": 0.1}},
        {"name": "lime", "params": {"n_samples": 8, "segmentation": "slic", "hide_color": [0.0, 0.0, 0.0]}},
        {"name": "scorecam", "layers": ["layer3"], "params": {"weights": "cic-softmax"}},
        {"name": "abscam-init", "layers": ["layer3"], "params": {"relu": True}},
        {"name": "abscam-final", "layers": ["layer3"], "params": {"score": "abs_logit"}},
        {"name": "fem", "layers": ["layer3"], "params": {"k": 1.5}},
        {"name": "extremal", "params": {"areas": [0.1], "iterations": 2}},
    ]
    raw["metrics"] += [
        {"name": "ssim", "params": {"gaussian_weights": False, "win_size": 31}},
        {"name": "average_drop", "params": {"top_percent": 100}},
        {"name": "average_increase"},
        {"name": "pointing_game", "params": {"threshold": 0.3, "relative": False, "tolerance": 0}},
        {"name": "randomization", "params": {"blocks": ["layer3", "fc"], "steps": 2, "seed": 1}},
    ]
    run_dir = tmp_path / "run"
    plan = plan_run(parse_config(raw), run_dir)
    assert (run_dir / "plan.json").is_file() and plan.shards


def test_the_check_runs_no_model_forward(make_config: ConfigFactory) -> None:
    raw = make_config()
    raw["methods"] += [
        {"name": "lime", "params": {"n_samples": 5000}},
        {"name": "scorecam", "layers": ["layer3"]},
        {"name": "extremal"},
    ]
    raw["metrics"] = [  # step 1: scoring one image would take 2 x 1025 forwards
        {"name": "insertion", "params": {"step": 1}},
        {"name": "deletion", "params": {"step": 1, "batch_size": 1}},
        {"name": "average_drop"},
        {"name": "average_increase"},
        {"name": "ssim"},
        {"name": "pointing_game"},
    ]
    config = parse_config(raw)
    model = build_model(config.model)
    forwards: list[int] = []
    model.register_forward_pre_hook(lambda _module, inputs: forwards.append(inputs[0].shape[0]))
    check_entries(config, model)
    assert forwards == []
    model(torch.zeros(2, 3, 32, 32))
    assert forwards == [2]  # the hook sees a forward


def test_a_negative_experiment_seed_is_a_config_error(make_config: ConfigFactory) -> None:
    raw = make_config()
    raw["seed"] = -1
    with pytest.raises(ConfigError, match="seed: Input should be greater than or equal to 0"):
        parse_config(raw)


def test_check_layers_names_a_layer_the_forward_skips_and_one_without_grid(make_config: ConfigFactory) -> None:
    raw = make_config()
    raw["methods"][0]["layers"] = ["layer3", "unused", "fc"]
    config = parse_config(raw)
    model = build_model(config.model)
    model.unused = nn.Conv2d(1, 1, 1)
    with pytest.raises(ConfigError) as error:
        check_layers(config, model)
    assert str(error.value).splitlines() == [
        "methods[0].layers: layer 'unused' does not run in the model's forward",
        "methods[0].layers: layer 'fc' has output shape (1, 3); CAM methods need [B, C, h, w] "
        "(reshape: auto expects [B, C, h, w]; tokens takes [B, N, C], channels_last [B, h, w, C])",
    ]
