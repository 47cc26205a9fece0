"""The demo end to end: its model learns the task, saliency finds the objects, its config is valid."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.config import IMAGENET_MEAN, IMAGENET_STD
from pipeline.data import load_gt, load_image
from pipeline.demo import cache_dir, demo_config, prepare_demo
from pipeline.demo_data import make_shapes_dataset
from pipeline.demo_model import ShapesNet, ensure_shapes_checkpoint, load_shapes_net
from pipeline.methods import build_method
from pipeline.metrics import pcc, pointing_game

SIZE = 64


@pytest.fixture(scope="module")
def trained() -> ShapesNet:
    """The demo's cached checkpoint (trained on first use, about a minute on 2 cores)."""
    return load_shapes_net(ensure_shapes_checkpoint(cache_dir(), image_size=SIZE))


@pytest.fixture(scope="module")
def held_out(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fresh images (another seed than training), their labels and ground-truth maps."""
    root = tmp_path_factory.mktemp("shapes")
    info = make_shapes_dataset(root, n_per_class=6, image_size=SIZE, seed=4321, split=False)
    images = torch.stack([load_image(root / r.path, (SIZE, SIZE), IMAGENET_MEAN, IMAGENET_STD) for r in info.records])
    labels = torch.tensor([r.label for r in info.records])
    gt = torch.stack([load_gt(root / r.gt, (SIZE, SIZE)) for r in info.records])
    return images, labels, gt


def test_model_learns_the_task(trained: ShapesNet, held_out: tuple[torch.Tensor, ...]) -> None:
    images, labels, _ = held_out
    with torch.no_grad():
        accuracy = (trained(images).argmax(dim=1) == labels).float().mean().item()
    assert accuracy >= 0.85


def test_gradcam_finds_objects_better_than_a_random_map(trained: ShapesNet, held_out: tuple[torch.Tensor, ...]) -> None:
    images, labels, gt = held_out
    maps = build_method("gradcam", trained, layer="layer3").explain(images, labels)
    random_maps = torch.rand(maps.shape, generator=torch.Generator().manual_seed(0))
    gradcam_pcc, random_pcc = pcc(maps, gt).nanmean().item(), pcc(random_maps, gt).nanmean().item()
    gradcam_hits = pointing_game(maps, gt, tolerance=4).nanmean().item()
    random_hits = pointing_game(random_maps, gt, tolerance=4).nanmean().item()
    assert gradcam_pcc > random_pcc + 0.4, (gradcam_pcc, random_pcc)
    assert gradcam_hits > random_hits + 0.4, (gradcam_hits, random_hits)


def test_prepare_demo_writes_a_valid_config(tmp_path: Path) -> None:
    from pipeline.config import load_config

    config_path = prepare_demo(tmp_path, images_per_class=2)
    config = load_config(config_path)
    assert config.data.gt_dir is not None and config.data.gt_dir.is_dir()
    assert {m.name for m in config.methods} >= {"rise", "gradcam"}
    assert demo_config(tmp_path, Path("x.pt"))["model"]["checkpoint"] == "x.pt"
