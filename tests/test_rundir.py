"""pipeline.rundir: planning into a folder, guarding another config's run, pre-flight checks."""
from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pipeline.config import ConfigError, load_config, parse_config
from pipeline.data import DataError
from pipeline.demo_model import ShapesNet
from pipeline.models import ModelError
from pipeline.planning import Plan
from pipeline.launching import run_local
from pipeline.rundir import (
    PREFLIGHT_IMAGES,
    RunDirError,
    config_changes,
    load_run_plan,
    plan_run,
    replan_changes,
)
from pipeline.stages import reduce_run
from pipeline.run_dir import RunDir
from tests.tiny_experiment import ConfigFactory, ImageTree, YamlWriter, one_thread, write_checkpoint

MODULES = [name for name, _ in ShapesNet(num_classes=3, width=4).named_modules() if name]
#: what a bad layer raises today (ValueError) or once the CLI reports it cleanly (RunDirError)
LAYER_ERRORS = (ValueError, RunDirError)


def test_planning_with_the_preflight_loads_no_library_of_the_reduce(
    make_config: ConfigFactory, write_yaml: YamlWriter, tmp_path: Path
) -> None:
    """pandas, pyarrow and SciPy cost a planning process about 140 MiB and a second; it needs none."""
    config = write_yaml(make_config())
    code = (f"import sys; from pipeline.cli import main; assert main(['plan', {str(config)!r}, '--out', "
            f"{str(tmp_path / 'run')!r}]) == 0; loaded = [m for m in ('pandas', 'pyarrow', 'scipy') if m in sys.modules]; "
            "assert not loaded, loaded")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert RunDir(tmp_path / "run").cost.is_file()  # the pre-flight ran


def test_plan_run_writes_config_plan_and_cost(make_config: ConfigFactory, tmp_path: Path) -> None:
    raw = make_config()
    run_dir = tmp_path / "run"
    plan = plan_run(parse_config(raw), run_dir)
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml", "cost.json", "plan.json", "shards"]
    assert list((run_dir / "shards").iterdir()) == []
    assert load_config(run_dir / "config.yaml") == parse_config(raw)
    config, read = load_run_plan(run_dir)
    assert read == plan == Plan.read(run_dir / "plan.json")
    assert config == parse_config(raw)


def test_planning_the_same_config_again_keeps_the_run(make_config: ConfigFactory, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    plan = plan_run(parse_config(make_config()), run_dir)
    marker = RunDir(run_dir).shard(plan.shards[0].id)
    marker.parent.mkdir()
    marker.write_bytes(b"committed")
    assert plan_run(parse_config(make_config()), run_dir) == plan
    assert marker.read_bytes() == b"committed"


def test_another_configs_run_is_refused_listing_the_changes(make_config: ConfigFactory, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    plan = plan_run(parse_config(make_config()), run_dir)
    marker = RunDir(run_dir).shard(plan.shards[0].id)
    marker.parent.mkdir()
    marker.write_bytes(b"committed")
    plan_text = (run_dir / "plan.json").read_text()
    raw = make_config()
    raw["methods"][0]["layers"] = ["layer3"]
    raw["seed"] = 3
    raw["sharding"]["images_per_shard"] = 4
    with pytest.raises(RunDirError) as error:
        plan_run(parse_config(raw), run_dir)
    message = str(error.value)
    assert "holds the run of another config" in message and "--overwrite" in message
    changes = message.split("Changes:\n")[1].splitlines()
    assert [line.strip() for line in changes] == [
        "methods[0].layers: ['layer2', 'layer3'] -> ['layer3']",
        "seed: 0 -> 3",
        "sharding.images_per_shard: 5 -> 4",
    ]
    assert (run_dir / "plan.json").read_text() == plan_text  # nothing touched
    assert marker.read_bytes() == b"committed"


def test_overwrite_replaces_the_run(make_config: ConfigFactory, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    old = plan_run(parse_config(make_config()), run_dir)
    RunDir(run_dir).shard(old.shards[0].id).parent.mkdir()
    RunDir(run_dir).shard(old.shards[0].id).write_bytes(b"committed")
    RunDir(run_dir).record_error(old.shards[1].id, "boom", kind="error")
    for name in ("results.h5", "metrics.csv", "summary.csv", "summary.md", "summary.tex", "failures.csv"):
        (run_dir / name).write_text("old")
    (run_dir / "notes.txt").write_text("the user's own file")
    raw = make_config()
    raw["methods"] = raw["methods"][:1]
    new = plan_run(parse_config(raw), run_dir, overwrite=True)
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml", "cost.json", "notes.txt", "plan.json", "shards"]
    assert list((run_dir / "shards").iterdir()) == []
    assert RunDir(run_dir).committed() == set()
    assert load_config(run_dir / "config.yaml") == parse_config(raw)
    assert Plan.read(run_dir / "plan.json") == new
    assert {s.method for s in new.shards} == {"gradcam"}


def test_config_changes_lists_added_and_removed_fields(make_config: ConfigFactory) -> None:
    old = make_config()
    new = make_config()
    new["methods"].append({"name": "rise", "id": "rise-2", "params": {"n_masks": 8}})
    new["data"]["subset"] = {"first_n": 4}
    changes = config_changes(parse_config(old), parse_config(new))
    assert "data.subset.first_n: None -> 4" in changes
    assert "methods[2].name: '(absent)' -> 'rise'" in changes
    assert "methods[2].params.n_masks: '(absent)' -> 8" in changes
    assert config_changes(parse_config(old), parse_config(make_config())) == []


def _assert_nothing_written(run_dir: Path) -> None:
    assert not (run_dir / "shards").exists()
    assert not (run_dir / "plan.json").exists()
    assert not (run_dir / "config.yaml").exists()


def test_an_unknown_layer_fails_listing_the_modules_before_anything_is_written(
    make_config: ConfigFactory, tmp_path: Path
) -> None:
    raw = make_config()
    raw["methods"][0]["layers"] = ["layer2", "layer9"]
    run_dir = tmp_path / "run"
    with pytest.raises(LAYER_ERRORS) as error:
        plan_run(parse_config(raw), run_dir)
    message = str(error.value)
    assert "unknown layer 'layer9'" in message
    listed = message.split("the model's modules are: ")[1].split(", ")
    assert listed == MODULES
    _assert_nothing_written(run_dir)


def test_a_non_spatial_layer_fails_naming_it(make_config: ConfigFactory, tmp_path: Path) -> None:
    raw = make_config()
    raw["methods"][0]["layers"] = ["layer3", "fc"]
    run_dir = tmp_path / "run"
    with pytest.raises(LAYER_ERRORS, match=r"layer 'fc' has output shape \(1, 3\); CAM methods need \[B, C, h, w\]"):
        plan_run(parse_config(raw), run_dir)
    _assert_nothing_written(run_dir)


def test_a_checkpoint_mismatch_fails_before_any_shard(make_config: ConfigFactory, tmp_path: Path) -> None:
    wrong = write_checkpoint(tmp_path / "five.pt", num_classes=5)
    run_dir = tmp_path / "run"
    with pytest.raises(ModelError, match=f"checkpoint {wrong} does not fit the model") as error:
        plan_run(parse_config(make_config(checkpoint_path=wrong)), run_dir)
    assert "fc.weight: checkpoint (5, 16) vs model (3, 16)" in str(error.value)
    _assert_nothing_written(run_dir)


def test_a_truncated_first_image_is_a_failure_at_run_time_not_at_planning(
    make_config: ConfigFactory, tree_copy: ImageTree, tmp_path: Path
) -> None:
    first_key = sorted(tree_copy.keys)[0]
    first = tree_copy.root / f"{first_key}.png"
    with Image.open(first) as image:
        image.save(first.with_suffix(".jpg"), quality=95)
    first.unlink()
    data = first.with_suffix(".jpg").read_bytes()
    first.with_suffix(".jpg").write_bytes(data[: len(data) // 2])  # a truncated JPEG
    run_dir = tmp_path / "run"
    plan_run(parse_config(make_config(root=tree_copy.root)), run_dir)  # the pre-flight reads the next image
    assert run_local(run_dir, progress=False) == {}
    result = reduce_run(run_dir, progress=False)
    assert list(result.failures) == [first_key] and "cannot read image" in result.failures[first_key]


def test_a_sample_of_unreadable_images_fails_the_preflight(
    make_config: ConfigFactory, tree_copy: ImageTree, tmp_path: Path
) -> None:
    for key in sorted(tree_copy.keys)[:PREFLIGHT_IMAGES]:
        (tree_copy.root / f"{key}.png").write_bytes(b"garbage")
    first = tree_copy.root / f"{sorted(tree_copy.keys)[0]}.png"
    run_dir = tmp_path / "run"
    with pytest.raises(DataError, match=f"none of the first {PREFLIGHT_IMAGES} image.s. can be read "
                                        f"\\(the first: cannot read image {first}"):
        plan_run(parse_config(make_config(root=tree_copy.root)), run_dir)
    _assert_nothing_written(run_dir)
    plan_run(parse_config(make_config(root=tree_copy.root)), run_dir, check=False)  # planning itself opens nothing
    assert (run_dir / "plan.json").is_file()


def test_load_run_plan_of_an_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(RunDirError, match="holds no planned run .*xai-pipeline plan"):
        load_run_plan(tmp_path)


def test_omitted_cam_layers_are_planned_and_saved_as_the_default(make_config: ConfigFactory, tmp_path: Path) -> None:
    raw = make_config()
    del raw["methods"][0]["layers"]
    run_dir = tmp_path / "run"
    plan = plan_run(parse_config(raw), run_dir)
    assert load_config(run_dir / "config.yaml").methods[0].layers == ["layer3"]
    assert {s.layers for s in plan.stage("score") if s.method == "gradcam"} == {("layer3",)}
    assert plan_run(parse_config(raw), run_dir) == plan  # the same config again: the same run



def test_num_classes_other_than_the_class_folders_needs_the_models_class_names(
    make_config: ConfigFactory, image_tree: ImageTree, tmp_path: Path
) -> None:
    raw = make_config(checkpoint_path=write_checkpoint(tmp_path / "four.pt", num_classes=4))
    raw["model"]["num_classes"] = 4
    raw["methods"] = [{"name": "gradcam", "layers": ["layer3"]}]
    raw["metrics"] = [{"name": "insertion", "params": {"step": 64}}]
    raw["target"] = "label"
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"model.num_classes is 4 but data.root .*images has 3 class folder.s. "
                                          r"\(alpha, beta, gamma\).*Give data.class_names"):
        plan_run(parse_config(raw), run_dir)
    _assert_nothing_written(run_dir)
    names = ["delta", "gamma", "alpha", "beta"]  # the model's outputs in order; delta has no folder
    raw["data"]["class_names"] = names
    plan = plan_run(parse_config(raw), run_dir)
    assert plan.class_names == tuple(names)
    assert run_local(run_dir, progress=False) == {}
    reduce_run(run_dir, progress=False)
    table = pd.read_csv(RunDir(run_dir).metrics_csv)
    folders = table["key"].str.split("/").str[0]
    assert (table["class_name"] == folders).all()
    assert (table["label"] == folders.map(names.index)).all() and (table["target"] == table["label"]).all()


def _run_and_reduce(config: dict[str, Any], run_dir: Path, **planning: bool) -> Plan:
    with one_thread():
        plan = plan_run(parse_config(config), run_dir, **planning)
        assert run_local(run_dir, progress=False) == {}
        reduce_run(run_dir, progress=False)
    return plan


def _metrics(run_dir: Path) -> pd.DataFrame:
    table = pd.read_csv(RunDir(run_dir).metrics_csv)
    return table.sort_values(["key", "method", "layer", "metric"]).reset_index(drop=True)


def test_an_update_keeps_exactly_the_unchanged_shards_and_ends_as_a_fresh_run(
    make_config: ConfigFactory, tmp_path: Path
) -> None:
    raw = make_config()
    run_dir = tmp_path / "run"
    first = _run_and_reduce(raw, run_dir)
    folder = RunDir(run_dir)
    committed = folder.committed()
    written = {i: folder.shard(i).stat().st_mtime_ns for i in committed}
    raw["methods"][1]["params"]["n_masks"] = 32  # RISE changes: all its shards
    raw["metrics"] = raw["metrics"][:2]  # PCC goes: the ground-truth score shards of Grad-CAM
    with pytest.raises(RunDirError, match="--update"):
        plan_run(parse_config(raw), run_dir)
    second = plan_run(parse_config(raw), run_dir, update=True)
    unchanged = {s.id for s in first.shards if s.method == "gradcam" and "pcc" not in s.metrics}
    assert {s.id for s in second.shards} & {s.id for s in first.shards} == unchanged
    assert folder.committed() == unchanged
    assert sorted(p.name for p in folder.dropped.iterdir()) == sorted(f"{i}.h5" for i in committed - unchanged)
    changes = replan_changes(first, second, committed)
    chunks = 3  # 12 images, 5 per shard
    assert changes.kept == Counter({"explain gradcam": chunks, "score gradcam: insertion, deletion": 2 * chunks})
    assert set(changes.added) == {"explain rise", "score rise: insertion, deletion"}
    assert sum(changes.added.values()) == sum(s.method == "rise" for s in second.shards)
    assert changes.dropped == Counter({"explain rise": sum(s.stage == "explain" and s.method == "rise"
                                                          for s in first.shards),
                                       "score rise: insertion, deletion": chunks, "score rise: pcc": chunks,
                                       "score gradcam: pcc": 2 * chunks})
    with one_thread():
        assert run_local(run_dir, progress=False) == {}
        reduce_run(run_dir, progress=False)
    assert all(folder.shard(i).stat().st_mtime_ns == written[i] for i in unchanged)  # kept, not computed again
    _run_and_reduce(raw, tmp_path / "fresh")
    pd.testing.assert_frame_equal(_metrics(run_dir), _metrics(tmp_path / "fresh"), check_exact=True)


def test_an_update_may_delete_the_dropped_shards(make_config: ConfigFactory, tmp_path: Path) -> None:
    raw = make_config()
    raw["methods"] = raw["methods"][:1]
    run_dir = tmp_path / "run"
    _run_and_reduce(raw, run_dir)
    raw["metrics"] = raw["metrics"][:2]
    plan = plan_run(parse_config(raw), run_dir, update=True, delete_dropped=True)
    folder = RunDir(run_dir)
    assert folder.committed() == {s.id for s in plan.shards} and not folder.dropped.exists()


def test_a_centre_cropped_run_scores_against_ground_truth_cropped_as_torchvision_does(
    make_config: ConfigFactory, image_tree: ImageTree, tmp_path: Path
) -> None:
    from torchvision import transforms

    from pipeline.analysis import load_run

    raw = make_config()
    raw["data"].update(resize="shorter_side_then_centre_crop", resize_size=44, crop_size=[28, 32])
    del raw["data"]["image_size"]
    raw["methods"] = [{"name": "gradcam", "layers": ["layer3"]}]
    raw["metrics"] = [{"name": "pcc"}]
    _run_and_reduce(raw, tmp_path / "run")
    run = load_run(tmp_path / "run")
    table = _metrics(tmp_path / "run").set_index("key")
    crop = transforms.Compose([transforms.Resize(44), transforms.CenterCrop((28, 32))])
    for key, gt_path in image_tree.gt_files.items():
        with Image.open(gt_path) as gt_image:
            gt = torch.from_numpy(np.asarray(gt_image.convert("L"), dtype=np.float32) / 255)[None]
        gt = transforms.CenterCrop((28, 32))(transforms.Resize(44, antialias=False)(gt))[0].numpy()
        saliency = run.maps("gradcam", "layer3", keys=key)
        assert saliency.shape == gt.shape == (28, 32)
        expected = np.corrcoef(saliency.ravel().astype(np.float64), gt.ravel())[0, 1]
        assert table.loc[key, "value"] == pytest.approx(expected, rel=1e-5, abs=1e-6)
        with Image.open(image_tree.root / f"{key}.png") as image:
            pixels = np.asarray(crop(image.convert("RGB")), dtype=np.float32) / 255
        np.testing.assert_allclose(run.image(key), pixels, atol=1e-5)
