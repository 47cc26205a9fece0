"""ShapesNet's structure, its training on a small shapes tree and the checkpoint cache."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import pipeline.demo_model as demo_model
from pipeline.demo_data import make_shapes_dataset
from pipeline.demo_model import ShapesNet, ensure_shapes_checkpoint, load_shapes_net, train_shapes_net

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def test_stages_head_and_output_shape() -> None:
    model = ShapesNet(num_classes=3, width=4).eval()
    names = dict(model.named_modules())
    assert {"layer1", "layer2", "layer3", "fc"} <= set(names)
    assert isinstance(model.fc, torch.nn.Linear) and model.fc.in_features == 16
    shapes = {}
    handles = [names[n].register_forward_hook(lambda m, i, o, n=n: shapes.__setitem__(n, tuple(o.shape)))
               for n in ("layer1", "layer2", "layer3")]
    with torch.no_grad():
        logits = model(torch.randn(5, 3, 64, 64))
    for handle in handles:
        handle.remove()
    assert logits.shape == (5, 3)
    assert shapes == {"layer1": (5, 4, 32, 32), "layer2": (5, 8, 16, 16), "layer3": (5, 16, 8, 8)}


def test_default_model_is_tiny() -> None:
    assert 5_000 <= sum(p.numel() for p in ShapesNet().parameters()) <= 100_000


@pytest.mark.parametrize(("arguments", "named"), [({"num_classes": 1}, "num_classes"), ({"width": 0}, "width")])
def test_bad_model_arguments(arguments: dict[str, int], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        ShapesNet(**arguments)


def held_out_accuracy(model: torch.nn.Module, root: Path) -> float:
    """Accuracy on the manifest's ``val`` rows, images normalized here with NumPy."""
    with (root / "manifest.csv").open(newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["split"] == "val"]
    images = np.stack([(np.asarray(Image.open(root / r["path"])) / 255.0 - MEAN) / STD for r in rows])
    inputs = torch.from_numpy(images.transpose(0, 3, 1, 2)).float()
    with torch.no_grad():
        predicted = model(inputs).argmax(dim=1).numpy()
    return float(np.mean(predicted == np.array([int(r["label"]) for r in rows])))


def test_training_learns_a_small_tree_and_saves_a_loadable_checkpoint(tmp_path: Path) -> None:
    make_shapes_dataset(tmp_path / "data", n_per_class=100, image_size=64, classes=("circle", "cross"), seed=5)
    checkpoint = tmp_path / "weights" / "net.pt"
    rng_before, threads_before = torch.get_rng_state(), torch.get_num_threads()
    result = train_shapes_net(tmp_path / "data", checkpoint, epochs=25, batch_size=32, seed=0)
    assert torch.equal(torch.get_rng_state(), rng_before) and torch.get_num_threads() == threads_before
    assert set(result) == {"train_accuracy", "val_accuracy", "epochs", "seconds"}
    assert result["epochs"] == 25 and result["seconds"] > 0
    assert result["val_accuracy"] >= 0.8
    assert [p.name for p in checkpoint.parent.iterdir()] == ["net.pt"]
    model = load_shapes_net(checkpoint, num_classes=2)
    assert not model.training
    assert held_out_accuracy(model, tmp_path / "data") == pytest.approx(result["val_accuracy"])


def test_bad_training_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="epochs"):
        train_shapes_net(tmp_path, tmp_path / "net.pt", epochs=0)
    with pytest.raises(ValueError, match="batch_size"):
        train_shapes_net(tmp_path, tmp_path / "net.pt", batch_size=1)
    with pytest.raises(ValueError, match="pixel_dropout"):
        train_shapes_net(tmp_path, tmp_path / "net.pt", pixel_dropout=1.0)


def test_pixel_dropout_sets_up_to_that_fraction_of_whole_pixels_to_zero() -> None:
    batch = torch.rand(200, 3, 16, 16) + 1.0  # no zero anywhere before
    augmented = demo_model._augment(batch, torch.Generator().manual_seed(0), pixel_dropout=0.25)
    zero = augmented == 0
    assert torch.equal(zero.all(dim=1), zero.any(dim=1))  # a pixel is dropped in every channel or none
    fractions = zero.all(dim=1).float().mean(dim=(1, 2))
    assert fractions.max() < 0.25 + 0.05 and fractions.min() < 0.02 and 0.09 < fractions.mean() < 0.16
    plain = demo_model._augment(batch, torch.Generator().manual_seed(0))
    assert not (plain == 0).any()


def test_cache_trains_once_per_parameter_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    small = {"n_per_class": 5, "image_size": 32, "epochs": 1}
    first = ensure_shapes_checkpoint(tmp_path, **small)
    assert first.is_file() and first.parent == tmp_path
    stamp = first.stat().st_mtime_ns

    def no_training(*args: object, **kwargs: object) -> dict[str, float]:
        raise AssertionError("the cache trained again")

    monkeypatch.setattr(demo_model, "train_shapes_net", no_training)
    assert ensure_shapes_checkpoint(tmp_path, **small) == first
    assert first.stat().st_mtime_ns == stamp
    monkeypatch.undo()

    second = ensure_shapes_checkpoint(tmp_path, **{**small, "epochs": 2})
    assert second != first and second.is_file()
    assert len(list(tmp_path.glob("shapes-data-*"))) == 1
    majority = ensure_shapes_checkpoint(tmp_path, **small, scene="majority", pixel_dropout=0.25)
    assert majority not in (first, second) and len(list(tmp_path.glob("shapes-data-*"))) == 2
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]
