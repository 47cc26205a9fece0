"""The shapes dataset: tree, manifest, split, ground truth, determinism and bad arguments."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from pipeline.demo_data import SHAPE_CLASSES, make_shapes_dataset

SIZE = 32


def read_manifest(root: Path) -> list[dict[str, str]]:
    with (root / "manifest.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_tree_counts_sizes_and_manifest(tmp_path: Path) -> None:
    info = make_shapes_dataset(tmp_path, n_per_class=6, image_size=SIZE, seed=0)
    for class_name in SHAPE_CLASSES:
        expected = [f"{class_name}_{index:04d}.png" for index in range(6)]
        assert sorted(p.name for p in (tmp_path / "images" / class_name).iterdir()) == expected
        assert sorted(p.name for p in (tmp_path / "gt" / class_name).iterdir()) == expected
    rows = read_manifest(tmp_path)
    assert list(rows[0]) == ["path", "label", "gt", "split"]
    assert len(rows) == len(info.records) == 6 * len(SHAPE_CLASSES)
    for row in rows:
        class_name = Path(row["path"]).parent.name
        index = int(Path(row["path"]).stem.split("_")[1])
        assert row["path"] == f"images/{class_name}/{class_name}_{index:04d}.png"
        assert row["gt"] == f"gt/{class_name}/{class_name}_{index:04d}.png"
        assert int(row["label"]) == sorted(SHAPE_CLASSES).index(class_name)
        assert row["split"] == ("val" if index in (4, 9, 14) else "train")
        with Image.open(tmp_path / row["path"]) as image, Image.open(tmp_path / row["gt"]) as gt:
            assert (image.mode, image.size) == ("RGB", (SIZE, SIZE))
            assert (gt.mode, gt.size) == ("L", (SIZE, SIZE))
    assert info.classes == tuple(sorted(SHAPE_CLASSES))


def test_labels_follow_sorted_names_for_a_subset_and_split_column_is_optional(tmp_path: Path) -> None:
    info = make_shapes_dataset(tmp_path, n_per_class=2, image_size=SIZE, classes=("triangle", "circle"),
                               split=False)
    rows = read_manifest(tmp_path)
    assert list(rows[0]) == ["path", "label", "gt"]
    assert {(Path(r["path"]).parent.name, r["label"]) for r in rows} == {("circle", "0"), ("triangle", "1")}
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["circle", "triangle"]
    assert info.classes == ("circle", "triangle")


def test_ground_truth_is_a_blurred_object_mask(tmp_path: Path) -> None:
    info = make_shapes_dataset(tmp_path, n_per_class=3, image_size=64, seed=7)
    for record in info.records:
        rgb = np.asarray(Image.open(tmp_path / record.path)).astype(int)
        gt = np.asarray(Image.open(tmp_path / record.gt)).astype(int)
        on_shape = np.all(rgb == np.array(record.colour), axis=-1)
        assert on_shape.sum() >= (0.15 * 64) ** 2 / 2, record.path
        peak = gt == gt.max()
        assert gt.max() == 255
        assert on_shape[peak].all(), record.path
        assert gt[on_shape].mean() > 3 * gt[~on_shape].mean(), record.path
        assert gt[0, 0] < 255 and 0 < gt[on_shape].min(), record.path


def test_the_majority_scene_draws_several_shapes_and_marks_those_of_the_class(tmp_path: Path) -> None:
    info = make_shapes_dataset(tmp_path, n_per_class=3, image_size=64, seed=7, scene="majority")
    counts = []
    for record in info.records:
        rgb = np.asarray(Image.open(tmp_path / record.path)).astype(int)
        gt = np.asarray(Image.open(tmp_path / record.gt)).astype(int)
        saturated = rgb.max(axis=-1) - rgb.min(axis=-1) > 100  # shapes; background and clutter are muted
        components, count = ndimage.label(saturated, structure=np.ones((3, 3)))
        counts.append(count)
        assert 3 <= count <= 7, record.path
        assert saturated[np.unravel_index(gt.argmax(), gt.shape)], record.path
        assert np.all(rgb == np.array(record.colour), axis=-1).sum() > 0, record.path
        # the class's shapes (3 or 4) carry the ground truth, the others (up to 3) less of it
        means = sorted((gt[components == i].mean() for i in range(1, count + 1)), reverse=True)
        assert means[2] > 2 * means[-1] or count == 3, record.path
    assert max(counts) >= 5


def test_same_seed_gives_identical_files_and_another_seed_differs(tmp_path: Path) -> None:
    make_shapes_dataset(tmp_path / "a", n_per_class=2, image_size=SIZE, seed=11)
    make_shapes_dataset(tmp_path / "b", n_per_class=2, image_size=SIZE, seed=11)
    make_shapes_dataset(tmp_path / "c", n_per_class=2, image_size=SIZE, seed=12)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 1 + 2 * 2 * len(SHAPE_CLASSES)
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    images = [name for name in files if name.parts[0] == "images"]
    assert all((tmp_path / "a" / n).read_bytes() != (tmp_path / "c" / n).read_bytes() for n in images)


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        ({"classes": ("circle", "hexagon")}, "classes"),
        ({"classes": ("circle", "circle")}, "classes"),
        ({"classes": "circle"}, "classes"),
        ({"n_per_class": 0}, "n_per_class"),
        ({"image_size": 8}, "image_size"),
        ({"gt_sigma": 0.0}, "gt_sigma"),
        ({"scene": "crowd"}, "scene"),
        ({"scene": "majority", "classes": ("circle",)}, "majority scene needs at least 2 classes"),
    ],
)
def test_bad_arguments_name_the_parameter(tmp_path: Path, arguments: dict[str, object], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        make_shapes_dataset(tmp_path, **arguments)
    assert not (tmp_path / "manifest.csv").exists()
