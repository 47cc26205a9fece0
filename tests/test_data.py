"""pipeline.data: discovery (ImageFolder, manifest), ground-truth matching, subsets, loading."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import DataConfig, SubsetConfig
from pipeline.data import (
    DataError,
    discover_images,
    load_batch,
    load_data_gt,
    load_data_image,
    load_gt,
    load_image,
    load_images,
    loader_workers,
)
from tests.tiny_experiment import CLASSES, IMAGE_SIZE, ImageTree, add_broken_image

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _rgb(path: Path, seed: int, size: tuple[int, int] = (8, 8)) -> np.ndarray:
    """Write a random RGB PNG of ``size`` (height, width); returns its pixels."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(*size, 3)).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return pixels


def _data(**fields: object) -> DataConfig:
    return DataConfig(image_size=IMAGE_SIZE, **fields)  # type: ignore[arg-type]


# ---------------------------------------------------------------- ImageFolder


def test_image_folder_keys_labels_and_ground_truth(image_tree: ImageTree) -> None:
    images = discover_images(_data(root=image_tree.root, gt_dir=image_tree.gt_dir))
    assert images.class_names == CLASSES
    assert len(images) == 12
    assert [r.key for r in images.records] == sorted(image_tree.keys)
    for record in images.records:
        assert record.path == image_tree.root / f"{record.key}.png"
        assert record.label == CLASSES.index(record.key.split("/")[0])
        assert record.gt_path == image_tree.gt_files.get(record.key)
    with_gt = {r.key for r in images.records if r.gt_path is not None}
    assert len(with_gt) == 9 and with_gt == set(image_tree.gt_files)
    by_stem = {r.key for r in images.records if r.gt_path and r.gt_path.parent == image_tree.gt_dir}
    assert by_stem == {f"{name}/{name}_02" for name in CLASSES}


def test_image_folder_without_gt_dir_has_no_ground_truth(image_tree: ImageTree) -> None:
    images = discover_images(_data(root=image_tree.root))
    assert all(r.gt_path is None for r in images.records)


def test_image_folder_lists_nested_images_and_skips_other_files(tmp_path: Path) -> None:
    root = tmp_path / "images"
    _rgb(root / "b" / "one.png", 0)
    _rgb(root / "b" / "deeper" / "two.jpg", 1)
    _rgb(root / "a" / "three.PNG", 2)
    (root / "a" / "notes.txt").write_text("not an image")
    _rgb(root / ".hidden" / "four.png", 3)
    (root / "loose.png").write_bytes(b"")  # a file at the top is no class
    images = discover_images(_data(root=root))
    assert images.class_names == ("a", "b")
    assert [(r.key, r.label) for r in images.records] == [("a/three", 0), ("b/deeper/two", 1), ("b/one", 1)]


def test_class_names_label_each_folder_by_its_names_index(image_tree: ImageTree) -> None:
    names = ["gamma", "zeta", "alpha", "beta"]  # the model's outputs: one class has no folder here
    images = discover_images(_data(root=image_tree.root, class_names=names))
    assert images.class_names == tuple(names)
    assert [r.key for r in images.records] == sorted(image_tree.keys)
    for record in images.records:
        assert names[record.label] == record.key.split("/")[0]
    with pytest.raises(DataError, match="data.class_names: the class folder.s. gamma of .*images are not among "
                                        "the class names alpha, beta"):
        discover_images(_data(root=image_tree.root, class_names=["alpha", "beta"]))


def test_image_folder_errors_name_the_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=f"data.root: {tmp_path / 'absent'} is not a folder"):
        discover_images(_data(root=tmp_path / "absent"))
    (tmp_path / "flat").mkdir()
    _rgb(tmp_path / "flat" / "x.png", 0)
    with pytest.raises(DataError, match="has no class sub-folders"):
        discover_images(_data(root=tmp_path / "flat"))
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no images found"):
        discover_images(_data(root=tmp_path / "empty"))
    _rgb(tmp_path / "tree" / "a" / "x.png", 0)
    with pytest.raises(DataError, match=f"data.gt_dir: {tmp_path / 'nogt'} is not a folder"):
        discover_images(_data(root=tmp_path / "tree", gt_dir=tmp_path / "nogt"))


def test_two_files_with_one_key_are_refused(tmp_path: Path) -> None:
    _rgb(tmp_path / "images" / "a" / "x.png", 0)
    _rgb(tmp_path / "images" / "a" / "x.jpg", 1)
    with pytest.raises(DataError, match="image keys are not unique: a/x"):
        discover_images(_data(root=tmp_path / "images"))


# ---------------------------------------------------------------- ground truth


def test_gt_matching_by_relative_path_then_by_stem(tmp_path: Path) -> None:
    root, gt = tmp_path / "images", tmp_path / "gt"
    _rgb(root / "a" / "img_1.png", 0)
    _rgb(root / "a" / "img_2.png", 1)
    _rgb(root / "b" / "img_3.jpg", 2)
    _rgb(root / "b" / "img_4.png", 3)
    (gt / "a").mkdir(parents=True)
    Image.new("L", (8, 8)).save(gt / "a" / "img_1.png")  # relative path
    Image.new("L", (8, 8)).save(gt / "img_1.png")  # stem too: the relative path wins
    np.save(gt / "img_3.npy", np.zeros((8, 8)))  # stem, another extension
    Image.new("L", (8, 8)).save(gt / "img_2.jpg")  # stem
    records = {r.key: r.gt_path for r in discover_images(_data(root=root, gt_dir=gt)).records}
    assert records == {
        "a/img_1": gt / "a" / "img_1.png",
        "a/img_2": gt / "img_2.jpg",
        "b/img_3": gt / "img_3.npy",
        "b/img_4": None,
    }


def test_gt_of_another_class_is_not_matched_by_stem(tmp_path: Path) -> None:
    root, gt = tmp_path / "images", tmp_path / "gt"
    _rgb(root / "cat" / "0001.png", 0)
    _rgb(root / "dog" / "0001.png", 1)
    (gt / "cat").mkdir(parents=True)
    Image.new("L", (8, 8)).save(gt / "cat" / "0001.png")
    records = {r.key: r.gt_path for r in discover_images(_data(root=root, gt_dir=gt)).records}
    assert records["cat/0001"] == gt / "cat" / "0001.png"
    assert records["dog/0001"] is None


# ---------------------------------------------------------------- manifest


def _manifest(path: Path, rows: list[str]) -> Path:
    path.write_text("\n".join(rows) + "\n")
    return path


def test_manifest_with_class_names(tmp_path: Path) -> None:
    for name in ("x1", "x2", "x3"):
        _rgb(tmp_path / "pics" / f"{name}.png", 0)
    (tmp_path / "maps").mkdir()
    np.save(tmp_path / "maps" / "m2.npy", np.ones((4, 4)))
    manifest = _manifest(tmp_path / "list.csv", [
        "path,label,gt", "pics/x3.png,crab,", "pics/x1.png,shrimp,", "pics/x2.png, crab ,maps/m2.npy",
    ])
    images = discover_images(_data(manifest=manifest))
    assert images.class_names == ("crab", "shrimp")  # sorted names
    assert [(r.key, r.label, r.gt_path) for r in images.records] == [
        ("pics/x1", 1, None),
        ("pics/x2", 0, tmp_path / "maps" / "m2.npy"),
        ("pics/x3", 0, None),
    ]
    assert images.records[0].path == tmp_path / "pics" / "x1.png"


def test_manifest_with_integer_labels(tmp_path: Path) -> None:
    _rgb(tmp_path / "a.png", 0)
    _rgb(tmp_path / "b.png", 1)
    manifest = _manifest(tmp_path / "list.csv", ["path,label", "a.png,2", "b.png,0"])
    images = discover_images(_data(manifest=manifest))
    assert images.class_names == ("0", "1", "2")
    assert [(r.key, r.label) for r in images.records] == [("a", 2), ("b", 0)]
    named = discover_images(_data(manifest=manifest, class_names=["n0", "n1", "n2", "n3"]))
    assert named.class_names == ("n0", "n1", "n2", "n3")
    with pytest.raises(DataError, match=r"list.csv:2: label 2 is outside 0..1"):
        discover_images(_data(manifest=manifest, class_names=["n0", "n1"]))


def test_manifest_gt_column_takes_precedence_over_gt_dir(tmp_path: Path) -> None:
    _rgb(tmp_path / "a.png", 0)
    _rgb(tmp_path / "b.png", 1)
    gt = tmp_path / "gt"
    gt.mkdir()
    np.save(gt / "a.npy", np.zeros((4, 4)))
    np.save(gt / "b.npy", np.zeros((4, 4)))
    np.save(tmp_path / "special.npy", np.zeros((4, 4)))
    manifest = _manifest(tmp_path / "list.csv", ["path,label,gt", "a.png,x,special.npy", "b.png,y,"])
    records = discover_images(_data(manifest=manifest, gt_dir=gt)).records
    assert [r.gt_path for r in records] == [tmp_path / "special.npy", gt / "b.npy"]


def test_manifest_errors_name_the_file_and_line(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=f"data.manifest: {tmp_path / 'absent.csv'} does not exist"):
        discover_images(_data(manifest=tmp_path / "absent.csv"))
    no_header = _manifest(tmp_path / "no_header.csv", ["file,class", "a.png,x"])
    with pytest.raises(DataError, match="no_header.csv: a manifest needs a header with columns path,label"):
        discover_images(_data(manifest=no_header))
    unknown = _manifest(tmp_path / "unknown.csv", ["path,label", "a.png,crab", "b.png,lobster"])
    with pytest.raises(DataError, match=r"unknown.csv:3: unknown class 'lobster'; classes: crab, shrimp"):
        discover_images(_data(manifest=unknown, class_names=["crab", "shrimp"]))


# ---------------------------------------------------------------- subsets


def test_subset_classes_split_file_and_first_n(image_tree: ImageTree, tmp_path: Path) -> None:
    keys = sorted(image_tree.keys)

    def subset(**fields: object) -> list[str]:
        data = _data(root=image_tree.root, subset=SubsetConfig(**fields))  # type: ignore[arg-type]
        return [r.key for r in discover_images(data).records]

    assert subset(classes=["gamma", "alpha"]) == [k for k in keys if not k.startswith("beta")]
    split = tmp_path / "val.txt"
    split.write_text("# validation images\ngamma/gamma_01.png\n\nalpha/alpha_03\nbeta/beta_00.jpg\nbeta/absent\n")
    assert subset(split_file=split) == ["alpha/alpha_03", "beta/beta_00", "gamma/gamma_01"]
    for count in (1, 3):
        first_of_each = [k for name in CLASSES for k in [k for k in keys if k.startswith(f"{name}/")][:count]]
        assert subset(first_n=count) == sorted(first_of_each)
    assert subset(split_file=split, classes=["beta", "gamma"], first_n=1) == ["beta/beta_00", "gamma/gamma_01"]
    assert subset(first_n=100) == keys


def test_subset_errors(image_tree: ImageTree, tmp_path: Path) -> None:
    def discover(**fields: object) -> None:
        discover_images(_data(root=image_tree.root, subset=SubsetConfig(**fields)))  # type: ignore[arg-type]

    with pytest.raises(DataError, match="data.subset.classes: unknown class.* delta; classes: alpha, beta, gamma"):
        discover(classes=["alpha", "delta"])
    with pytest.raises(DataError, match=f"data.subset.split_file: {tmp_path / 'absent.txt'} does not exist"):
        discover(split_file=tmp_path / "absent.txt")
    (tmp_path / "other.txt").write_text("zeta/z_01\n")
    with pytest.raises(DataError, match=r"no images found for data at .*images \(after the subset\)"):
        discover(split_file=tmp_path / "other.txt")


# ---------------------------------------------------------------- loading


def test_load_image_normalizes_as_a_hand_computation(tmp_path: Path) -> None:
    pixels = _rgb(tmp_path / "x.png", 7, size=(10, 12))
    tensor = load_image(tmp_path / "x.png", (10, 12), MEAN, STD)
    assert tensor.dtype == torch.float32 and tensor.shape == (3, 10, 12)
    expected = np.empty((3, 10, 12), np.float64)
    for channel in range(3):
        expected[channel] = (pixels[:, :, channel] / 255.0 - MEAN[channel]) / STD[channel]
    np.testing.assert_allclose(tensor.numpy(), expected, rtol=0, atol=1e-5)


def test_load_image_resizes_to_height_width_and_converts_to_rgb(tmp_path: Path) -> None:
    value = 100
    Image.new("L", (30, 20), color=value).save(tmp_path / "gray.png")  # PIL size is (width, height)
    tensor = load_image(tmp_path / "gray.png", (16, 24), MEAN, STD)
    assert tensor.shape == (3, 16, 24)
    for channel in range(3):
        expected = (value / 255.0 - MEAN[channel]) / STD[channel]
        np.testing.assert_allclose(tensor[channel].numpy(), expected, rtol=0, atol=1e-5)


def test_load_image_failure_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=f"cannot read image {tmp_path / 'bad.png'}"):
        load_image(tmp_path / "bad.png", (8, 8), MEAN, STD)
    with pytest.raises(DataError, match="cannot read image"):
        load_image(tmp_path / "absent.png", (8, 8), MEAN, STD)


def test_load_gt_png_npy_and_resizing(tmp_path: Path) -> None:
    values = np.random.default_rng(0).integers(0, 256, size=(6, 5)).astype(np.uint8)
    Image.fromarray(values).save(tmp_path / "map.png")
    gt = load_gt(tmp_path / "map.png", (6, 5))
    assert gt.dtype == torch.float32 and gt.shape == (6, 5)
    np.testing.assert_allclose(gt.numpy(), values / 255.0, atol=1e-6)
    array = np.random.default_rng(1).random((4, 4)) * 7.0
    np.save(tmp_path / "map.npy", array)
    np.testing.assert_allclose(load_gt(tmp_path / "map.npy", (4, 4)).numpy(), array, rtol=1e-6)
    np.save(tmp_path / "two.npy", np.repeat([[2.0], [3.0], [3.0]], 5, axis=1))  # constant maps are refused
    resized = load_gt(tmp_path / "two.npy", (9, 7))
    assert resized.shape == (9, 7)
    assert float(resized.min()) >= 2.0 and float(resized.max()) <= 3.0
    np.save(tmp_path / "cube.npy", np.zeros((2, 3, 3)))
    with pytest.raises(DataError, match=r"cube.npy must be 2-D, got shape \(2, 3, 3\)"):
        load_gt(tmp_path / "cube.npy", (3, 3))
    (tmp_path / "bad.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match="cannot read ground-truth map .*bad.png"):
        load_gt(tmp_path / "bad.png", (3, 3))


@pytest.mark.parametrize("shape", [(30, 47), (47, 30), (33, 33), (29, 40)])
def test_the_centre_crop_equals_torchvisions_resize_then_center_crop(tmp_path: Path, shape: tuple[int, int]) -> None:
    from torchvision import transforms

    _rgb(tmp_path / "x.png", 11, size=shape)
    reference = transforms.Compose([
        transforms.Resize(28), transforms.CenterCrop((20, 25)), transforms.ToTensor(), transforms.Normalize(MEAN, STD),
    ])
    with Image.open(tmp_path / "x.png") as image:
        expected = reference(image.convert("RGB"))
    # both resize with Pillow's bilinear filter and crop the same pixels: equal up to float32 rounding
    torch.testing.assert_close(load_image(tmp_path / "x.png", (20, 25), MEAN, STD, resize_size=28), expected,
                               rtol=0, atol=1e-6)
    gt = np.random.default_rng(5).random(shape, dtype=np.float32)
    np.save(tmp_path / "gt.npy", gt)
    # the map is a tensor to torchvision: F.interpolate, bilinear without antialiasing, as load_gt resizes
    expected_gt = transforms.CenterCrop((20, 25))(transforms.Resize(28, antialias=False)(torch.from_numpy(gt)[None]))
    torch.testing.assert_close(load_gt(tmp_path / "gt.npy", (20, 25), resize_size=28), expected_gt[0],
                               rtol=0, atol=1e-6)


def test_the_configs_resize_mode_reaches_the_loaders(tmp_path: Path) -> None:
    _rgb(tmp_path / "images" / "a" / "x.png", 12, size=(30, 47))
    np.save(tmp_path / "x.npy", np.random.default_rng(6).random((30, 47), dtype=np.float32))
    data = DataConfig(root=tmp_path / "images", resize="shorter_side_then_centre_crop", resize_size=28,
                      crop_size=(20, 25))
    records = discover_images(data).records
    _, images, _ = load_batch(records, data)
    torch.testing.assert_close(images[0], load_image(records[0].path, (20, 25), data.mean, data.std, resize_size=28),
                               rtol=0, atol=0)
    torch.testing.assert_close(load_data_gt(tmp_path / "x.npy", data),
                               load_gt(tmp_path / "x.npy", (20, 25), resize_size=28), rtol=0, atol=0)
    squashed = DataConfig(root=tmp_path / "images", image_size=(20, 25))
    torch.testing.assert_close(load_data_image(records[0].path, squashed),
                               load_image(records[0].path, (20, 25), squashed.mean, squashed.std), rtol=0, atol=0)


def test_load_batch_records_an_unreadable_image_and_loads_the_others(tree_copy: ImageTree) -> None:
    broken = add_broken_image(tree_copy.root)
    data = _data(root=tree_copy.root)
    records = discover_images(data).records
    assert broken in [r.key for r in records]  # listed, not opened
    loaded, images, failures = load_batch(records, data)
    assert [r.key for r in loaded] == [r.key for r in records if r.key != broken]
    assert list(failures) == [broken]
    assert str(tree_copy.root / f"{broken}.png") in failures[broken]
    assert images.shape == (len(records) - 1, 3, IMAGE_SIZE, IMAGE_SIZE)
    for record, image in zip(loaded, images):
        assert torch.equal(image, load_image(record.path, data.image_size, data.mean, data.std))
    bad = [r for r in records if r.key == broken]
    loaded, images, failures = load_batch(bad, data)
    assert (loaded, images.shape, list(failures)) == ([], (0, 3, IMAGE_SIZE, IMAGE_SIZE), [broken])


def test_a_16_bit_png_is_scaled_like_its_8_bit_version(tmp_path: Path) -> None:


    rng = np.random.default_rng(0)
    eight = rng.integers(0, 256, size=(12, 10), dtype=np.uint8)
    Image.fromarray(eight).save(tmp_path / "eight.png")
    Image.fromarray(eight.astype(np.uint16) * 257).save(tmp_path / "sixteen.png")  # 255 -> 65535
    with Image.open(tmp_path / "sixteen.png") as image:
        assert image.mode.startswith("I")  # really read as 16-bit
    reference = load_image(tmp_path / "eight.png", (12, 10), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    sixteen = load_image(tmp_path / "sixteen.png", (12, 10), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    assert float(sixteen.max()) <= 1.0 and float(sixteen.min()) < 0.5  # not all white
    np.testing.assert_allclose(sixteen.numpy(), reference.numpy(), atol=1e-6)
    np.testing.assert_allclose(load_gt(tmp_path / "sixteen.png", (12, 10)).numpy(),
                               load_gt(tmp_path / "eight.png", (12, 10)).numpy(), atol=1e-6)


def test_a_nan_or_constant_gt_map_is_a_data_error_naming_the_file(tmp_path: Path) -> None:


    np.save(tmp_path / "nan.npy", np.full((4, 4), np.nan, np.float32))
    np.save(tmp_path / "inf.npy", np.where(np.eye(4) > 0, np.inf, 0.5).astype(np.float32))
    Image.fromarray(np.full((4, 4), 7, np.uint8)).save(tmp_path / "flat.png")
    for name, reason in (("nan.npy", "NaN or inf"), ("inf.npy", "NaN or inf"), ("flat.png", "constant")):
        with pytest.raises(DataError, match=reason) as error:
            load_gt(tmp_path / name, (4, 4))
        assert str(tmp_path / name) in str(error.value)


@pytest.mark.parametrize("workers", [0, 2])
def test_load_images_in_worker_processes_equals_load_batch(tree_copy: ImageTree, workers: int) -> None:
    broken = add_broken_image(tree_copy.root)
    data = _data(root=tree_copy.root)
    records = discover_images(data).records
    expected_loaded, expected_images, expected_failures = load_batch(records, data)
    loaded, images, failures = load_images(records, data, workers=workers)
    assert loaded == expected_loaded and failures == expected_failures and broken in failures
    assert torch.equal(images, expected_images)
    assert load_images([], data, workers=workers)[1].shape == (0, 3, IMAGE_SIZE, IMAGE_SIZE)


def test_loader_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    assert loader_workers(3) == 3 and loader_workers(0) == 0
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "8")
    assert loader_workers("auto") == 7
    monkeypatch.delenv("SLURM_CPUS_PER_TASK")
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert loader_workers("auto") == 2
