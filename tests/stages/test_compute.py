"""The config's compute section: forward precision by autocast, channels-last layout, and
how bfloat16 changes every method's maps and their Insertion/Deletion AUCs on the demo."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from pipeline.config import (
    IMAGENET_MEAN, IMAGENET_STD, ComputeConfig, ConfigError, ExperimentConfig, config_dict, parse_config,
)
from pipeline.data import load_image
from pipeline.demo import IMAGE_SIZE, SCENE, demo_checkpoint, demo_config
from pipeline.demo_data import make_shapes_dataset
from pipeline.demo_model import load_shapes_net
from pipeline.methods import build_method
from pipeline.metrics import deletion, insertion
from pipeline.models import ModelError, apply_compute
from tests.tiny_experiment import one_thread


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def test_default_compute_is_float32_and_left_out_of_the_saved_config(make_config) -> None:  # type: ignore[no-untyped-def]
    raw = make_config()
    config = parse_config(raw, source="test")
    assert config.compute == ComputeConfig() and config.compute.precision == "float32"
    assert "compute" not in config_dict(config)
    raw["compute"] = {"precision": "bfloat16", "channels_last": True, "loader_workers": 2}
    changed = parse_config(raw, source="test")
    assert config_dict(changed)["compute"] == raw["compute"]
    assert ExperimentConfig.model_validate(config_dict(changed)) == changed


@pytest.mark.parametrize("compute", [{"precision": "half"}, {"loader_workers": -1}, {"loader_workers": "many"}])
def test_bad_compute(make_config, compute: dict[str, object]) -> None:  # type: ignore[no-untyped-def]
    raw = make_config()
    raw["compute"] = compute
    with pytest.raises(ConfigError, match="compute"):
        parse_config(raw, source="test")


def test_bfloat16_autocasts_only_the_forward_and_keeps_module_names() -> None:
    model = apply_compute(small_net(), ComputeConfig(precision="bfloat16", channels_last=True), torch.device("cpu"))
    assert [name for name, _ in model.named_modules()] == [name for name, _ in small_net().named_modules()]
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert model(torch.randn(2, 3, 8, 8)).dtype == torch.bfloat16
    assert (torch.randn(2, 2) @ torch.randn(2, 2)).dtype == torch.float32  # outside the forward: float32
    with pytest.raises(ModelError, match="CUDA"):
        apply_compute(small_net(), ComputeConfig(precision="float16"), torch.device("cpu"))


def test_a_deep_copy_of_an_autocast_model_runs_its_own_weights() -> None:
    """The randomization test re-initializes a deep copy: its forward must not call the original's."""
    model = apply_compute(small_net(), ComputeConfig(precision="bfloat16"), torch.device("cpu"))
    duplicate = copy.deepcopy(model)
    with torch.no_grad():
        duplicate[-1].bias.fill_(100.0)
        images = torch.rand(2, 3, 8, 8)
        assert (model(images) < 50).all() and (duplicate(images) > 50).all()
        assert duplicate(images).dtype == torch.bfloat16


@pytest.fixture(scope="module")
def demo_batch(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], torch.Tensor]:
    """The demo's trained model (cached), its config, and two fresh demo images per class."""
    checkpoint = demo_checkpoint()
    root = tmp_path_factory.mktemp("demo")
    make_shapes_dataset(root, n_per_class=2, image_size=IMAGE_SIZE, seed=2024, split=False, scene=SCENE)
    paths = sorted((root / "images").rglob("*.png"))
    images = torch.stack([load_image(p, (IMAGE_SIZE, IMAGE_SIZE), IMAGENET_MEAN, IMAGENET_STD) for p in paths])
    return checkpoint, demo_config(root, checkpoint), images


Results = dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]

#: (least map correlation, largest |mean AUC change|, largest change of one image's AUC) under bfloat16
DIRECT = (0.99, 0.01, 0.05)
OPTIMIZED = (0.8, 0.2, 1.0)


def _maps_and_aucs(checkpoint: Path, precision: str, entries: list[dict[str, Any]], images: torch.Tensor,
                   targets: torch.Tensor, step: int) -> Results:
    """``{method: (maps, Insertion AUCs, Deletion AUCs)}`` with the model's forwards at ``precision``."""
    model = apply_compute(load_shapes_net(checkpoint).eval(), ComputeConfig(precision=precision), torch.device("cpu"))
    results = {}
    for entry in entries:
        params = {**entry.get("params", {}), **({"layer": entry["layers"]} if "layers" in entry else {})}
        maps = build_method(entry["name"], model, **params).explain(images, targets)
        auc_in, _ = insertion(model, images, maps, targets, step=step)
        auc_del, _ = deletion(model, images, maps, targets, step=step)
        assert maps.dtype == torch.float32 and auc_in.dtype == torch.float32
        results[entry["name"]] = (maps, auc_in, auc_del)
    return results


def test_what_bfloat16_changes_on_the_demo(demo_batch: tuple[Path, dict[str, Any], torch.Tensor]) -> None:
    """Every real method of the demo config, on its trained model and images, run with the model's
    forwards in float32 and in bfloat16 (CPU autocast); Insertion and Deletion scored by the same
    model. Per method: the correlation of the maps, and the change of the mean AUCs and the largest
    change of one image's AUC. The table is printed (pytest -s) for the README.

    Extremal Perturbations optimize a mask over hundreds of gradient steps: bfloat16's rounding
    sends some images to another optimum, so its bounds are the loose ones of :data:`OPTIMIZED`."""
    checkpoint, config, images = demo_batch
    step = config["metrics"][0]["params"]["step"]
    entries = [e for e in config["methods"] if e["name"] not in ("random", "centre")]
    with one_thread():
        with torch.no_grad():
            targets = load_shapes_net(checkpoint).eval()(images).argmax(dim=1)
        full = _maps_and_aucs(checkpoint, "float32", entries, images, targets, step)
        half = _maps_and_aucs(checkpoint, "bfloat16", entries, images, targets, step)
    print("\n| method | map correlation | Insertion mean change (largest) | Deletion mean change (largest) |")
    for entry in entries:
        (maps32, in32, del32), (maps16, in16, del16) = full[entry["name"]], half[entry["name"]]
        correlation = float(torch.corrcoef(torch.stack([maps32.flatten(), maps16.flatten()]))[0, 1])
        moves = [(float((b - a).mean()), float((b - a).abs().max())) for a, b in ((in32, in16), (del32, del16))]
        print(f"| {entry['name']} | {correlation:.5f} | " + " | ".join(f"{m:+.4f} ({x:.4f})" for m, x in moves) + " |")
        least, mean_bound, largest_bound = OPTIMIZED if entry["name"] == "extremal" else DIRECT
        assert not torch.equal(maps32, maps16), entry["name"]  # bfloat16 did change the maps
        assert correlation > least, entry["name"]
        assert all(abs(mean) < mean_bound and largest < largest_bound for mean, largest in moves), entry["name"]
