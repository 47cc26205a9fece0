"""The demo end to end: its model learns the majority shape, a blur hides it, saliency finds
the class's shapes, and the demo's run tells methods apart and good methods from the baselines."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from pipeline.cli import main
from pipeline.config import IMAGENET_MEAN, IMAGENET_STD
from pipeline.data import load_gt, load_image
from pipeline.demo import SCENE, demo_checkpoint, demo_config, prepare_demo
from pipeline.demo_data import make_shapes_dataset
from pipeline.demo_model import ShapesNet, load_shapes_net
from pipeline.methods import METHODS, build_method
from pipeline.metrics import BUILTIN_METRICS, pcc, pointing_game
from pipeline.metrics.insertion_deletion import blur_substrate

SIZE = 64


@pytest.fixture(scope="module")
def trained() -> ShapesNet:
    """The demo's cached checkpoint (trained on first use, under a minute on 2 cores)."""
    return load_shapes_net(demo_checkpoint())


@pytest.fixture(scope="module")
def held_out(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fresh images (another seed than training), their labels and ground-truth maps."""
    root = tmp_path_factory.mktemp("shapes")
    info = make_shapes_dataset(root, n_per_class=6, image_size=SIZE, seed=4321, split=False, scene=SCENE)
    images = torch.stack([load_image(root / r.path, (SIZE, SIZE), IMAGENET_MEAN, IMAGENET_STD) for r in info.records])
    labels = torch.tensor([r.label for r in info.records])
    gt = torch.stack([load_gt(root / r.gt, (SIZE, SIZE)) for r in info.records])
    return images, labels, gt


def test_model_learns_the_task(trained: ShapesNet, held_out: tuple[torch.Tensor, ...]) -> None:
    images, labels, _ = held_out
    with torch.no_grad():
        accuracy = (trained(images).argmax(dim=1) == labels).float().mean().item()
    assert accuracy >= 0.85


def test_the_insertion_substrate_hides_the_class(trained: ShapesNet, held_out: tuple[torch.Tensor, ...]) -> None:
    images, labels, _ = held_out
    with torch.no_grad():
        sharp = trained(images).softmax(dim=1)[torch.arange(len(labels)), labels].mean().item()
        blurred = trained(blur_substrate(images)).softmax(dim=1)[torch.arange(len(labels)), labels].mean().item()
    assert sharp >= 0.85 and blurred <= 0.5, (sharp, blurred)


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
    assert sorted(m.name for m in config.methods) == sorted(METHODS)
    assert sorted(m.name for m in config.metrics) == sorted(BUILTIN_METRICS)
    assert demo_config(tmp_path, Path("x.pt"))["model"]["checkpoint"] == "x.pt"


def test_the_demo_separates_methods_and_prints_the_comparison_last(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", "--out", str(tmp_path), "--images-per-class", "4", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert printed.index("## Mean") < printed.index("# Method comparison") < printed.rindex("\n## ")
    metrics = pd.read_parquet(tmp_path / "run" / "metrics.parquet")
    assert set(metrics["method"]) == set(METHODS) and set(metrics["metric"]) == set(BUILTIN_METRICS)
    means = metrics.groupby(["metric", "method"])["value"].mean()
    insertion, deletion = means["insertion"], means["deletion"]
    real = insertion.drop(["random", "centre"])
    assert real.max() - real.min() >= 0.1, insertion  # the methods differ, not only from the baselines
    assert insertion["gradcam"] > insertion["random"] + 0.15, insertion
    assert deletion["gradcam"] < deletion["random"] - 0.1, deletion
    comparison = pd.read_csv(tmp_path / "run" / "comparison.csv")
    pairs = comparison[comparison[["method_a", "method_b"]].isin(["gradcam", "random"]).all(axis=1)]
    paired = pairs.set_index("metric").loc[["insertion", "deletion"]]
    gradcam_effect = paired["effect_size"].where(paired["method_a"] == "gradcam", -paired["effect_size"])
    assert (paired["p_value"] < 0.01).all() and (gradcam_effect > 0.5).all(), paired
    randomization = means["randomization"]
    assert randomization["centre"] == randomization["random"] == pytest.approx(1.0)  # they ignore the model
    assert randomization["gradcam"] < 0.5, randomization
    assert (tmp_path / "run" / "warnings.md").read_text() == "## Warnings\n\nNo warnings.\n"  # none fire on the demo
