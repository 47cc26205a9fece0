"""The cost estimate (pipeline.cost) against the forwards and backwards a real small run makes.

:class:`CountingNet` is the tiny experiment's model counting the images of every forward
and every backward it takes part in; every built-in method and metric runs shard by shard,
and each shard's counted rows must equal the estimate's.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from pipeline.cli import main
from pipeline.config import parse_config
from pipeline.cost import CostEstimate, UnitCosts, Work, estimate_cost, format_duration, shard_work
from pipeline.demo_model import ShapesNet
from pipeline.planning import Plan
from pipeline.run_dir import RunDir
from pipeline.rundir import plan_run
from pipeline.stages import ShardRunner, run_shards
from tests.tiny_experiment import IMAGE_SIZE, ConfigFactory, ImageTree, YamlWriter, tiny_config

#: counted rows per tally name: [forwards, backwards]
TALLIES: dict[str, list[int]] = {}


class CountingNet(ShapesNet):
    """``ShapesNet`` adding the images of each forward, and of each backward through its logits, to
    ``TALLIES[tally]``."""

    def __init__(self, tally: str, num_classes: int = 4, width: int = 8) -> None:
        super().__init__(num_classes=num_classes, width=width)
        self.tally = tally

    def forward(self, x: Tensor) -> Tensor:
        logits = super().forward(x)
        counts = TALLIES.setdefault(self.tally, [0, 0])
        counts[0] += x.shape[0]
        if logits.requires_grad:
            logits.register_hook(lambda gradient: counts.__setitem__(1, counts[1] + gradient.shape[0]))
        return logits


#: every built-in method; the Score-CAM-like ones on layers whose channel maps all vary on these images
#: (constant ones are not forwarded: the estimate is their upper bound), LIME on enough superpixels
#: for maps that are not constant (a constant map is not scored)
ALL_METHODS: list[dict[str, Any]] = [
    {"name": "gradcam", "layers": ["layer2", "layer3"]},
    {"name": "abscam-init", "layers": ["layer3"]},
    {"name": "abscam-final", "layers": ["layer1", "layer2.0.conv1"], "params": {"batch_size": 7}},
    {"name": "fem", "layers": ["layer3"]},
    {"name": "scorecam", "layers": ["layer2.0.bn2", "layer3.0.bn2"], "params": {"batch_size": 9}},
    {"name": "scorecam", "id": "scorecam-cic", "layers": ["layer3.0.bn2"], "params": {"weights": "cic-softmax"}},
    {"name": "lime", "params": {"n_samples": 10, "segmentation": "slic", "n_segments": 100, "batch_size": 8}},
    {"name": "extremal", "params": {"iterations": 2, "areas": [0.1, 0.3], "step": 4, "sigma": 4.0}},
    {"name": "random"},
    {"name": "centre"},
    {"name": "rise", "params": {"n_masks": 20, "grid_size": 4, "batch_size": 7}},
    {"name": "rise-gaussian", "params": {"n_masks": 12, "grid_size": 4, "batch_size": 32}},
]
ALL_METRICS: list[dict[str, Any]] = [
    {"name": "insertion", "params": {"step": 100, "batch_size": 13}},
    {"name": "deletion", "params": {"step": 256}},
    {"name": "average_drop", "params": {"batch_size": 5}},
    {"name": "average_increase", "params": {"batch_size": 5}},
    {"name": "pcc"},
    {"name": "randomization", "params": {"blocks": ["layer3", "fc"], "steps": 1}},  # the head alone: the
]  # layers' activations stay, so Score-CAM's varying channels and the counts are exact


def _counting_config(raw: dict[str, Any], tally: str) -> dict[str, Any]:
    """The tiny experiment ``raw`` with every built-in method and metric, on a :class:`CountingNet`."""
    raw["model"]["factory"] = "tests.test_cost:CountingNet"
    raw["model"]["kwargs"]["tally"] = tally
    raw["methods"], raw["metrics"] = ALL_METHODS, ALL_METRICS
    raw["sharding"] = {"images_per_shard": 7, "samples_per_shard": 8}
    raw["compute"] = {"loader_workers": 0}
    return raw


@pytest.fixture(scope="module")
def counted_run(tmp_path_factory: pytest.TempPathFactory, image_tree: ImageTree, checkpoint: Path
                ) -> tuple[Plan, CostEstimate, dict[str, Work]]:
    """The run of every built-in method and metric, planned, then computed shard by shard, with the
    rows counted per shard."""
    run_dir = tmp_path_factory.mktemp("counted") / "run"
    raw = _counting_config(tiny_config(image_tree.root, image_tree.gt_dir, checkpoint), "counted")
    plan = plan_run(parse_config(raw), run_dir)
    estimate = CostEstimate.read(RunDir(run_dir).cost)
    runner = ShardRunner(run_dir)
    counted = {}
    for shard in sorted(plan.shards, key=lambda s: s.stage != "explain"):
        TALLIES["counted"] = [0, 0]
        runner.run(shard.id)
        counted[shard.id] = Work(*TALLIES["counted"])
    return plan, estimate, counted


def test_every_shard_makes_the_forwards_and_backwards_the_estimate_counts(
    counted_run: tuple[Plan, CostEstimate, dict[str, Work]]
) -> None:
    plan, estimate, counted = counted_run
    planned = {shard_id: sum(lines.values(), Work()) for shard_id, lines in shard_work(plan, estimate.units).items()}
    wrong = {plan.shard(i).describe(): (planned[i], counted[i]) for i in counted if planned[i] != counted[i]}
    assert not wrong
    assert estimate.total == sum(counted.values(), Work())


def test_each_method_and_metric_line_counts_its_own_shards(
    counted_run: tuple[Plan, CostEstimate, dict[str, Work]]
) -> None:
    plan, estimate, counted = counted_run
    lines = {(line.stage, line.name): line.total for line in estimate.lines}
    for entry in ALL_METHODS:
        label = entry.get("id", entry["name"])
        shards = [s for s in plan.stage("explain") if s.method == label]
        assert lines[("explain", label)] == sum((counted[s.id] for s in shards), Work()), label
    score_shards = plan.stage("score")
    perturbation = [s for s in score_shards if "insertion" in s.metrics]
    assert sum(lines[("score", m["name"])].forwards for m in ALL_METRICS if m["name"] != "randomization") == sum(
        counted[s.id].forwards for s in perturbation)
    assert all(counted[s.id] == Work() for s in score_shards if "pcc" in s.metrics)
    randomization = [s for s in score_shards if "randomization" in s.metrics]
    assert lines[("score", "randomization")] == sum((counted[s.id] for s in randomization), Work())


def test_the_declared_costs_are_the_formulas_of_the_readme(
    counted_run: tuple[Plan, CostEstimate, dict[str, Work]]
) -> None:
    units = counted_run[1].units
    pixels = IMAGE_SIZE * IMAGE_SIZE
    # ShapesNet(width=4): layer1 has 4 channels, layer2 8, layer3 16
    assert units.methods == {
        "gradcam": Work(1, 1), "abscam-init": Work(1, 1), "abscam-final": Work(1 + 4 + 8, 1), "fem": Work(1),
        "scorecam": Work(1 + 8 + 16), "scorecam-cic": Work(1 + 16 + 1), "lime": Work(10), "extremal": Work(4, 4),
        "random": Work(), "centre": Work(), "rise": Work(20), "rise-gaussian": Work(12),
    }
    assert units.metrics == {
        "insertion": Work(math.ceil(pixels / 100) + 1), "deletion": Work(pixels // 256 + 1),
        "average_drop": Work(2), "average_increase": Work(), "pcc": Work(), "randomization": Work(),
    }
    assert units.shares == {"average_increase": "average_drop"}
    # the randomization test: one explanation per step, of the shard's method on the shard's layer alone
    assert units.reruns == {"randomization": 1}
    assert units.explanation("scorecam", "layer2.0.bn2") == Work(1 + 8)
    assert units.explanation("scorecam", "layer3.0.bn2") == Work(1 + 16)
    assert units.explanation("rise", "-") == Work(20)


def test_plan_prints_a_line_per_method_and_metric_and_labels_the_time_an_estimate(
    make_config: ConfigFactory, write_yaml: YamlWriter, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = make_config()
    raw["methods"].append({"name": "extremal", "params": {"iterations": 5}})
    assert main(["plan", str(write_yaml(raw)), "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[1]: line for line in out.splitlines() if line.startswith(("  explain", "  score"))}
    # 12 images: a target forward per image and explain shard, plus the method's rows; a CAM method's
    # own forward finds the predicted classes
    assert "12 forwards" in lines["gradcam"] and "12 backwards" in lines["gradcam"] and "2 layers" in lines["gradcam"]
    assert "792 forwards" in lines["rise"]  # 2 sample ranges of 32 masks: 2 x 12 + 64 x 12
    assert "192 forwards" in lines["extremal"] and "180 backwards" in lines["extremal"]  # 12 + 5 x 3 areas x 12
    assert "816 forwards" in lines["insertion"] and "4 maps per image" in lines["insertion"]  # 4 x 12 x (1024/64 + 1)
    assert "0 forwards" in lines["pcc"]
    assert "ESTIMATE from one timed batch" in out and "on cpu" in out
    assert any(line.startswith("  total") for line in out.splitlines())


def test_cost_json_holds_the_timing_and_plan_again_without_checks_keeps_it(
    make_config: ConfigFactory, tmp_path: Path
) -> None:
    config = parse_config(make_config())
    plan = plan_run(config, tmp_path / "run")
    folder = RunDir(tmp_path / "run")
    saved = json.loads(folder.cost.read_text())
    assert saved["throughput"]["device"] == "cpu" and saved["throughput"]["forward_s"] > 0
    assert saved["throughput"]["backward_s"] > 0  # Grad-CAM needs backwards
    estimate = CostEstimate.read(folder.cost)
    assert estimate.seconds(Work(10, 10)) == pytest.approx(
        10 * saved["throughput"]["forward_s"] + 10 * saved["throughput"]["backward_s"])
    plan_run(config, tmp_path / "run", check=False)
    assert CostEstimate.read(folder.cost) == estimate
    assert estimate.config_hash == plan.config_hash


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_device_not_available_here_gives_counts_without_a_time(
    make_config: ConfigFactory, tmp_path: Path
) -> None:
    raw = make_config()
    raw["device"] = "cuda"
    plan_run(parse_config(raw), tmp_path / "run")
    estimate = CostEstimate.read(RunDir(tmp_path / "run").cost)
    assert estimate.throughput is None and estimate.total.forwards > 0
    assert "time not estimated" in estimate.describe()


def test_committed_shards_are_left_out_of_what_is_still_to_compute(make_config: ConfigFactory, tmp_path: Path) -> None:
    plan = plan_run(parse_config(make_config()), tmp_path / "run", check=False)
    units = UnitCosts({"gradcam": Work(1, 1), "rise": Work(64)}, {"insertion": Work(17), "deletion": Work(17),
                                                                  "pcc": Work()})
    rise = [s.id for s in plan.stage("explain") if s.method == "rise"]
    estimate = estimate_cost(plan, units, committed=rise)
    by_name = {line.name: line for line in estimate.lines}
    assert by_name["rise"].total == Work(2 * 12 + 64 * 12) and by_name["rise"].pending == Work()
    assert by_name["gradcam"].pending == by_name["gradcam"].total == Work(24, 12)
    assert "still to compute" in estimate.describe()


def test_a_method_that_declares_no_cost_counts_its_target_forwards_and_says_at_least(
    make_config: ConfigFactory, tmp_path: Path
) -> None:
    plan = plan_run(parse_config(make_config()), tmp_path / "run", check=False)
    units = UnitCosts({"gradcam": None, "rise": Work(64)}, {"insertion": Work(17), "deletion": Work(17), "pcc": Work()})
    estimate = estimate_cost(plan, units)
    gradcam = next(line for line in estimate.lines if line.name == "gradcam")
    assert gradcam.total == Work(12) and not gradcam.declared
    assert "at least" in estimate.describe()


def test_the_progress_bar_names_stage_and_method_and_counts_forwards(
    make_config: ConfigFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = make_config()
    raw["methods"] = [{"name": "rise", "params": {"n_masks": 16, "grid_size": 4, "batch_size": 8}}]
    raw["metrics"] = [{"name": "deletion", "params": {"step": 256}}]
    plan = plan_run(parse_config(raw), tmp_path / "run")
    assert run_shards(tmp_path / "run", [s.id for s in plan.shards], progress=True) == {}
    err = capsys.readouterr().err
    total = CostEstimate.read(RunDir(tmp_path / "run").cost).total.forwards
    assert "explain rise" in err and "score rise: deletion" in err
    assert f"{total}/{total}" in err and "forward/s" in err


@pytest.mark.parametrize("seconds, text", [(0.25, "0.25 s"), (42, "42 s"), (150, "2.5 min"), (3 * 3600, "3.0 h"),
                                           (3 * 86400, "3.0 days")])
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
