"""A tiny experiment on disk for the core tests.

Twelve 32x32 RGB PNGs in an ImageFolder tree of three classes (four images each);
nine of them have a ground-truth map (six found by relative path, three by stem
alone), three have none. The model is an untrained, seeded ``ShapesNet`` of width 4
with its head's weights scaled up (so that probabilities differ between images and
Grad-CAM maps are not all zero); its ``state_dict`` is the checkpoint. :func:`tiny_config` is the experiment:
Grad-CAM on two layers and RISE with 64 masks, scored with insertion, deletion and PCC.
:class:`ConstantLogitsNet` and :class:`NanLogitsNet` load the same checkpoint and give
degenerate saliency maps (``model.factory: tests.tiny_experiment:NanLogitsNet``).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np
import torch
from PIL import Image

from pipeline.config import IMAGENET_MEAN, IMAGENET_STD
from pipeline.demo_model import ShapesNet, one_torch_thread
from pipeline.run_dir import RunDir

__all__ = [
    "IMAGE_SIZE",
    "CLASSES",
    "IMAGES_PER_CLASS",
    "BROKEN_KEY",
    "ImageTree",
    "FinishedRun",
    "write_image_tree",
    "write_checkpoint",
    "tiny_config",
    "add_broken_image",
    "one_thread",
    "ConstantLogitsNet",
    "NanLogitsNet",
    "ConfigFactory",
    "YamlWriter",
]

IMAGE_SIZE = 32
CLASSES = ("alpha", "beta", "gamma")
IMAGES_PER_CLASS = 4
BROKEN_KEY = "beta/beta_zz_broken"

#: the ``make_config`` fixture: ``(root=None, gt_dir=<the tree's>, checkpoint_path=None) -> config dict``
ConfigFactory = Callable[..., dict[str, Any]]
#: the ``write_yaml`` fixture: ``(config dict, name="experiment.yaml") -> path``
YamlWriter = Callable[..., Path]


@dataclasses.dataclass(frozen=True)
class ImageTree:
    """An ImageFolder tree with its ground-truth folder and what the tests expect of it."""

    root: Path
    gt_dir: Path
    keys: tuple[str, ...]
    labels: dict[str, int]
    gt_files: dict[str, Path]


@dataclasses.dataclass(frozen=True)
class FinishedRun:
    """A planned, run and reduced experiment (read-only: copy ``run_dir`` to change it)."""

    run_dir: Path
    config: dict[str, Any]
    tree: ImageTree
    broken_key: str


def _image(rng: np.random.Generator, label: int) -> np.ndarray:
    """A noisy 32x32 RGB image with a bright square in the channel of its class."""
    pixels = rng.integers(0, 90, size=(IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.uint8)
    top, left = rng.integers(2, IMAGE_SIZE - 14, size=2)
    pixels[top : top + 12, left : left + 12, label] = 230
    return pixels


def _gt_map(rng: np.random.Generator) -> np.ndarray:
    """A 32x32 grayscale Gaussian blob."""
    rows, cols = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
    centre = rng.uniform(8, 24, size=2)
    blob = np.exp(-((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2) / 40.0)
    return (blob * 255).astype(np.uint8)


class ConstantLogitsNet(ShapesNet):
    """``ShapesNet`` whose logits are zero for every image: its gradients, so its Grad-CAM maps, are constant."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 0.0


class NanLogitsNet(ShapesNet):
    """``ShapesNet`` whose logits are NaN for the images with a bright red square (class ``alpha``, whose
    red pixels reach 230/255; the others stay below 90/255, also when perturbed), unchanged for the others."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        red = x[:, 0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]
        bright = red.flatten(1).amax(dim=1) > 0.8
        scale = torch.where(bright, torch.nan, 1.0).to(x.dtype)
        return super().forward(x) * scale[:, None]


def write_image_tree(base: Path, seed: int = 0) -> ImageTree:
    """Write the images under ``base/images`` and their ground truth under ``base/gt``."""
    rng = np.random.default_rng(seed)
    root, gt_dir = base / "images", base / "gt"
    keys, labels, gt_files = [], {}, {}
    for label, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        (gt_dir / name).mkdir(parents=True, exist_ok=True)
        for index in range(IMAGES_PER_CLASS):
            stem = f"{name}_{index:02d}"
            Image.fromarray(_image(rng, label)).save(root / name / f"{stem}.png")
            key = f"{name}/{stem}"
            keys.append(key)
            labels[key] = label
            if index < 2:
                gt_files[key] = gt_dir / name / f"{stem}.png"
            elif index == 2:
                gt_files[key] = gt_dir / f"{stem}.png"
            else:
                continue
            Image.fromarray(_gt_map(rng)).save(gt_files[key])
    return ImageTree(root, gt_dir, tuple(sorted(keys)), labels, gt_files)


def write_checkpoint(
    path: Path, *, num_classes: int = len(CLASSES), width: int = 4, seed: int = 0, head_scale: float = 10.0
) -> Path:
    """Save the state_dict of an untrained ``ShapesNet`` seeded with ``seed``, ``fc`` weights times ``head_scale``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ShapesNet(num_classes=num_classes, width=width)
    with torch.no_grad():
        model.fc.weight.mul_(head_scale)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path


def tiny_config(root: Path, gt_dir: Path | None, checkpoint: Path) -> dict[str, Any]:
    """The config dict of the tiny experiment (absolute paths; a fresh dict every call)."""
    data: dict[str, Any] = {"root": str(root), "image_size": IMAGE_SIZE}
    if gt_dir is not None:
        data["gt_dir"] = str(gt_dir)
    return {
        "name": "tiny",
        "data": data,
        "model": {
            "factory": "pipeline.demo_model:ShapesNet",
            "kwargs": {"width": 4},
            "num_classes": len(CLASSES),
            "checkpoint": str(checkpoint),
        },
        "methods": [
            {"name": "gradcam", "layers": ["layer2", "layer3"]},
            {"name": "rise", "params": {"n_masks": 64, "grid_size": 4, "batch_size": 5}},
        ],
        "metrics": [
            {"name": "insertion", "params": {"step": 64}},
            {"name": "deletion", "params": {"step": 64}},
            {"name": "pcc"},
        ],
        "sharding": {"images_per_shard": 5, "samples_per_shard": 32},
        "device": "cpu",
    }


def add_broken_image(root: Path) -> str:
    """Write an unreadable ``.png`` into the tree at ``root``; returns its key."""
    (root / f"{BROKEN_KEY}.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    return BROKEN_KEY


#: tiny models run faster on one CPU thread, and do not stall when other processes share the cores
one_thread = one_torch_thread


def mark_committed(run_dir: Path, *shard_ids: str) -> None:
    """Put a whole HDF5 file with an (empty) schema where each shard's committed file goes: committed,
    as far as launching and status (which open new shard files and check their schema) can tell."""
    for shard_id in shard_ids:
        path = RunDir(run_dir).shard(shard_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(path, "w") as f:
            f.attrs.update(schema="[]", digest="")
