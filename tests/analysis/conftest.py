"""A tiny finished run shared by the analysis tests.

Nine 32x32 shapes images in four classes (one of them an unreadable file, so the run
records a failure, and one without a ground-truth map), an untrained ``ShapesNet`` of
width 4, Grad-CAM on two layers and RISE with a few masks, scored with insertion,
deletion, PCC and the pointing game; planned, run and reduced with the pipeline's API.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from pipeline.config import parse_config
from pipeline.demo_data import make_shapes_dataset
from pipeline.demo_model import ShapesNet
from pipeline.launching import run_local
from pipeline.stages import reduce_run
from pipeline.rundir import plan_run

IMAGE_SIZE = 32
BROKEN_KEY = "triangle/zz_broken"
NO_GT_KEY = "circle/circle_0001"


def tiny_config(data_root: Path, checkpoint: Path) -> dict[str, object]:
    """The experiment of the shared run."""
    return {
        "name": "tiny-analysis",
        "data": {"root": str(data_root / "images"), "gt_dir": str(data_root / "gt"), "image_size": IMAGE_SIZE},
        "model": {
            "factory": "pipeline.demo_model:ShapesNet",
            "kwargs": {"width": 4},
            "num_classes": 4,
            "checkpoint": str(checkpoint),
        },
        "methods": [
            {"name": "gradcam", "layers": ["layer2", "layer3"]},
            {"name": "rise", "params": {"n_masks": 40, "grid_size": 4, "batch_size": 40}},
        ],
        "metrics": [
            {"name": "insertion", "params": {"step": 64}},
            {"name": "deletion", "params": {"step": 64}},
            {"name": "pcc"},
            {"name": "pointing_game"},
        ],
        "sharding": {"images_per_shard": 3, "samples_per_shard": 40},
        "device": "cpu",
    }


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder of a finished, reduced tiny run (see the module docstring)."""
    base = tmp_path_factory.mktemp("tiny_run")
    data_root = base / "data"
    make_shapes_dataset(data_root, n_per_class=2, image_size=IMAGE_SIZE, seed=7, split=False)
    (data_root / "images" / f"{BROKEN_KEY}.png").write_bytes(b"not a png")
    (data_root / "gt" / f"{NO_GT_KEY}.png").unlink()
    torch.manual_seed(0)
    checkpoint = base / "tiny.pt"
    torch.save(ShapesNet(num_classes=4, width=4).state_dict(), checkpoint)
    run_dir = base / "run"
    plan_run(parse_config(tiny_config(data_root, checkpoint)), run_dir)
    failures = run_local(run_dir, progress=False)
    assert not failures, failures
    reduce_run(run_dir, progress=False)
    return run_dir


@pytest.fixture(scope="session")
def randomization_run(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared run's data and model with Grad-CAM on ``layer3`` and the ``centre`` baseline, scored
    by the randomization test in two steps: a finished, reduced run folder."""
    raw = yaml.safe_load((tiny_run / "config.yaml").read_text())
    raw["methods"] = [{"name": "gradcam", "layers": ["layer3"]}, {"name": "centre"}]
    raw["metrics"] = [{"name": "randomization", "params": {"steps": 2}}]
    run_dir = tmp_path_factory.mktemp("randomization_run") / "run"
    plan_run(parse_config(raw), run_dir)
    failures = run_local(run_dir, progress=False)
    assert not failures, failures
    reduce_run(run_dir, progress=False)
    return run_dir


@pytest.fixture(scope="session")
def broken_key() -> str:
    """The key of the tiny run's unreadable image (recorded as a failure)."""
    return BROKEN_KEY


@pytest.fixture(scope="session")
def no_gt_key() -> str:
    """The key of the tiny run's image that has no ground-truth map."""
    return NO_GT_KEY
