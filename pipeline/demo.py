"""The embedded demo: self-made data and model, no downloads.

:func:`prepare_demo` trains (once, cached) a small CNN to name the shape drawn most often
among several on textured clutter (the ``majority`` scene of
:func:`~pipeline.demo_data.make_shapes_dataset`: shapes told apart by their outline, the
shapes of other classes evidence against the class), generates a separate set of such
images with their ground-truth maps (the blurred masks of the class's shapes), and writes
an experiment config that explains them with every method and scores them with every
metric. Class-specific methods then find the class's shapes and leave the others out,
class-agnostic ones (FEM) highlight every shape, and Insertion tells them apart.
"""
from __future__ import annotations

import os
from pathlib import Path

import yaml

from .demo_data import Scene, make_shapes_dataset
from .demo_model import ensure_shapes_checkpoint

__all__ = ["prepare_demo", "demo_config", "demo_checkpoint", "cache_dir", "IMAGE_SIZE", "SCENE"]

IMAGE_SIZE = 64
SCENE: Scene = "majority"
#: the demo model is trained with up to a quarter of the pixels of an image missing, so that a random
#: Deletion order does not keep or raise its belief (scattered grey pixels are no class's evidence)
PIXEL_DROPOUT = 0.25


def cache_dir() -> Path:
    """Where trained demo checkpoints are kept (``$XAI_PIPELINE_CACHE`` or ``~/.cache/xai-pipeline``)."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "xai-pipeline"
    return Path(os.environ.get("XAI_PIPELINE_CACHE", default))


def demo_checkpoint() -> Path:
    """The demo model's checkpoint in :func:`cache_dir` (trained on first use)."""
    return ensure_shapes_checkpoint(cache_dir(), image_size=IMAGE_SIZE, scene=SCENE, pixel_dropout=PIXEL_DROPOUT)


def demo_config(data_root: Path, checkpoint: Path) -> dict[str, object]:
    """The demo experiment: every method (small LIME and Extremal settings) on ``layer3``, every metric
    (the randomization test in two steps: the head and ``layer3`` re-initialized)."""
    step = IMAGE_SIZE * IMAGE_SIZE // 32
    layers = ["layer3"]
    return {
        "name": "shapes-demo",
        "data": {"root": str(data_root / "images"), "gt_dir": str(data_root / "gt"), "image_size": IMAGE_SIZE},
        "model": {"factory": "pipeline.demo_model:ShapesNet", "num_classes": 4, "checkpoint": str(checkpoint)},
        "methods": [
            {"name": "rise", "params": {"n_masks": 500, "grid_size": 8, "batch_size": 250}},
            {"name": "rise-gaussian", "params": {"n_masks": 500, "grid_size": 8, "batch_size": 250}},
            {"name": "gradcam", "layers": layers},
            {"name": "abscam-init", "layers": layers},
            {"name": "abscam-final", "layers": layers},
            {"name": "fem", "layers": layers},
            {"name": "scorecam", "layers": layers},
            {"name": "lime", "params": {"n_samples": 200, "segmentation": "slic", "n_segments": 30, "batch_size": 200}},
            {"name": "extremal", "params": {"areas": [0.1], "iterations": 30, "step": 8, "sigma": 8.0,
                                            "num_levels": 4, "lr": 0.1, "area_growth": 1.1}},
            {"name": "random"},
            {"name": "centre"},
        ],
        "metrics": [
            {"name": "insertion", "params": {"step": step}},
            {"name": "deletion", "params": {"step": step}},
            {"name": "pcc"},
            {"name": "ssim"},
            {"name": "pointing_game", "params": {"tolerance": 4}},
            {"name": "average_drop"},
            {"name": "average_increase"},
            {"name": "randomization", "params": {"steps": 2}},
        ],
        "sharding": {"images_per_shard": 16, "samples_per_shard": 250},
    }


def prepare_demo(out: Path, *, images_per_class: int = 8) -> Path:
    """Make the demo's data, model and config under ``out``; returns the config's path."""
    out = Path(out)
    checkpoint = demo_checkpoint()
    data_root = out / "data"
    if not (data_root / "manifest.csv").is_file():
        make_shapes_dataset(data_root, n_per_class=images_per_class, image_size=IMAGE_SIZE, seed=2024, split=False,
                            scene=SCENE)
    config_path = out / "demo.yaml"
    config_path.write_text(yaml.safe_dump(demo_config(data_root.resolve(), checkpoint), sort_keys=False))
    return config_path
