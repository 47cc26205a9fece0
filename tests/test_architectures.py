"""Every built-in method on eight torchvision families, through ``xai-pipeline run``.

Random weights, two small images (64x64; 32x32 for ViT-B/16 built with ``image_size=32``),
default layers (``layers`` omitted), every metric. Select with ``-m architectures``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from pipeline.cli import main
from pipeline.config import load_config

pytestmark = pytest.mark.architectures

ALL_CAMS = ["gradcam", "abscam-init", "fem", "scorecam", "abscam-final"]
EVERY_METHOD = ALL_CAMS + ["rise", "rise-gaussian", "lime", "extremal", "random", "centre"]

ARCHITECTURES: dict[str, tuple[dict[str, Any], int, list[str], str]] = {
    # arch: (kwargs, image size, methods, default layer)
    "resnet18": ({}, 64, EVERY_METHOD, "layer4"),
    "vgg11_bn": ({}, 64, EVERY_METHOD, "features.27"),
    "densenet121": ({}, 64, EVERY_METHOD, "features.denseblock4"),
    "mobilenet_v3_small": ({}, 64, EVERY_METHOD, "features.12"),
    "efficientnet_b0": ({}, 64, EVERY_METHOD, "features.8"),
    "convnext_tiny": ({}, 64, EVERY_METHOD, "features.7"),
    "vit_b_16": ({"image_size": 32}, 32, EVERY_METHOD, "encoder.layers.encoder_layer_11.ln_1"),
    "swin_t": ({}, 64, EVERY_METHOD, "features.7"),
}

METRICS = ["insertion", "deletion", "average_drop", "average_increase", "pcc", "ssim", "pointing_game"]
PARAMS = {
    "rise": {"n_masks": 8, "grid_size": 4, "batch_size": 8},
    "rise-gaussian": {"n_masks": 8, "grid_size": 4, "batch_size": 8},
    "lime": {"n_samples": 8, "batch_size": 8},
    "extremal": {"areas": [0.1], "iterations": 3},
}


def _write_data(base: Path, size: int) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    root, gt = base / "images", base / "gt"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        (gt / name).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / name / "x.png")
        Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(gt / name / "x.png")
    return root, gt


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_every_method_runs_on_the_architecture(arch: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    kwargs, size, methods, default = ARCHITECTURES[arch]
    root, gt = _write_data(tmp_path, size)
    step = size * size // 4
    config = {
        "data": {"root": str(root), "gt_dir": str(gt), "image_size": size},
        "model": {"arch": arch, "num_classes": 2, "kwargs": kwargs},
        "methods": [{"name": name, "params": PARAMS.get(name, {})} for name in methods],
        "metrics": [{"name": name, "params": {"step": step}} if name in ("insertion", "deletion") else {"name": name}
                    for name in METRICS],
        "device": "cpu",
    }
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(config))
    run_dir = tmp_path / "run"
    status = main(["run", str(path), "--out", str(run_dir), "--no-progress"])
    warnings = (run_dir / "warnings.md").read_text() if (run_dir / "warnings.md").is_file() else ""
    # random weights may leave a method with nothing but constant maps: exit 1, said in warnings.md
    assert status == 0 or (status == 1 and "is degenerate: check the method" in warnings), capsys.readouterr().err
    assert (run_dir / "results.h5").is_file()
    saved = load_config(run_dir / "config.yaml")
    cams = [m for m in methods if m in ALL_CAMS]
    assert {m.name: m.layers for m in saved.methods if m.name in cams} == {m: [default] for m in cams}
    table = pd.read_csv(run_dir / "metrics.csv")
    assert sorted(table["method"].unique()) == sorted(methods)
    counts = table.dropna(subset=["value"]).groupby("method")["metric"].nunique()
    degenerate = {m for m in methods if f"every saliency map of {m} is degenerate" in warnings}
    assert degenerate < set(methods), warnings  # random weights can zero some CAM methods' maps, never all
    assert (counts.drop(sorted(degenerate & set(counts.index))) >= len(METRICS) - 2).all(), counts
