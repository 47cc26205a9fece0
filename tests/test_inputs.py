"""Input fingerprints: a changed image or ground-truth file recomputes exactly the shards that read it."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from pipeline.config import parse_config
from pipeline.launching import run_local
from pipeline.launching.launch import launch_run
from pipeline.planning import InputChanges, Plan, input_changes
from pipeline.run_dir import RunDir
from pipeline.rundir import plan_run
from pipeline.stages import reduce_run
from tests.tiny_experiment import ConfigFactory, ImageTree, add_broken_image


def _small(raw: dict[str, Any]) -> dict[str, Any]:
    """The tiny experiment with Grad-CAM on one layer, insertion and PCC: quick to run twice."""
    raw["methods"] = [{"name": "gradcam", "layers": ["layer3"]}]
    raw["metrics"] = [{"name": "insertion", "params": {"step": 64}}, {"name": "pcc"}]
    return raw


def _rewrite(path: Path, seed: int) -> None:
    """New pixels in ``path`` (same format), with a modification time one second later."""
    before = path.stat().st_mtime_ns
    with Image.open(path) as image:
        mode, size = image.mode, image.size
    channels = 3 if mode == "RGB" else 1
    pixels = np.random.default_rng(seed).integers(0, 255, size=(size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(pixels.squeeze()).save(path)
    os.utime(path, ns=(before + 10**9, before + 10**9))


def _chunk_of(plan: Plan, key: str) -> tuple[int, int]:
    index = plan.keys.index(key)
    return next(chunk for chunk in plan.chunks() if chunk[0] <= index < chunk[1])


def _new_ids(before: Plan, after: Plan) -> set[str]:
    return {s.id for s in after.shards} - {s.id for s in before.shards}


def test_a_changed_image_recomputes_only_its_chunk(
    make_config: ConfigFactory, tree_copy: ImageTree, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    before = plan_run(parse_config(_small(make_config(root=tree_copy.root, gt_dir=tree_copy.gt_dir))), run_dir)
    assert run_local(run_dir, progress=False) == {}
    first = pd.read_parquet(reduce_run(run_dir, progress=False).metrics_path)
    key = before.keys[6]
    _rewrite(tree_copy.root / f"{key}.png", seed=1)
    assert input_changes(run_dir) == InputChanges(changed=(key,))
    result = launch_run(run_dir, check=False, progress=False)  # plans again, then runs the pending shards
    after = Plan.read(RunDir(run_dir).plan)
    chunk = _chunk_of(after, key)
    assert {s.id for s in result.shards} == _new_ids(before, after) == {s.id for s in after.shards if s.images == chunk}
    assert result.failures == {} and not input_changes(run_dir)
    second = pd.read_parquet(reduce_run(run_dir, progress=False).metrics_path)
    chunk_keys = set(after.keys[chunk[0] : chunk[1]])
    others = ~first["key"].isin(chunk_keys)
    pd.testing.assert_frame_equal(first[others].reset_index(drop=True), second[others].reset_index(drop=True))
    changed = (first["key"] == key) & (first["metric"] == "insertion")
    assert not np.allclose(first.loc[changed, "value"], second.loc[changed, "value"])


def test_a_changed_gt_map_recomputes_only_the_gt_score_shards_of_its_chunk(
    make_config: ConfigFactory, tree_copy: ImageTree, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    config = parse_config(make_config(root=tree_copy.root, gt_dir=tree_copy.gt_dir))
    before = plan_run(config, run_dir)
    key = sorted(tree_copy.gt_files)[-1]
    _rewrite(tree_copy.gt_files[key], seed=2)
    assert input_changes(run_dir) == InputChanges(changed=(key,))
    after = plan_run(config, run_dir)
    chunk = _chunk_of(after, key)
    expected = {s.id for s in after.stage("score") if s.images == chunk and s.metrics == ("pcc",)}
    assert len(expected) == 3 and _new_ids(before, after) == expected  # gradcam x 2 layers + rise


def test_a_fixed_unreadable_image_is_retried_and_leaves_failures(
    make_config: ConfigFactory, tree_copy: ImageTree, tmp_path: Path
) -> None:
    broken = add_broken_image(tree_copy.root)
    run_dir = tmp_path / "run"
    before = plan_run(parse_config(_small(make_config(root=tree_copy.root, gt_dir=tree_copy.gt_dir))), run_dir)
    assert run_local(run_dir, progress=False) == {}
    assert list(reduce_run(run_dir, progress=False).failures) == [broken]
    healthy = tree_copy.root / f"{before.keys[0]}.png"
    (tree_copy.root / f"{broken}.png").write_bytes(healthy.read_bytes())
    assert input_changes(run_dir).changed == (broken,)
    result = launch_run(run_dir, check=False, progress=False)
    after = Plan.read(RunDir(run_dir).plan)
    assert {s.images for s in result.shards} == {_chunk_of(after, broken)}
    assert reduce_run(run_dir, progress=False).failures == {}
    assert pd.read_csv(run_dir / "failures.csv").empty
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert metrics.loc[(metrics["key"] == broken) & (metrics["metric"] == "insertion"), "value"].notna().all()


def test_input_changes_lists_changed_added_and_removed_images(
    make_config: ConfigFactory, tree_copy: ImageTree, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    plan = plan_run(parse_config(make_config(root=tree_copy.root, gt_dir=tree_copy.gt_dir)), run_dir, check=False)
    assert not input_changes(run_dir) and input_changes(run_dir).describe() == "inputs unchanged since planning"
    changed, removed = plan.keys[1], plan.keys[2]
    _rewrite(tree_copy.root / f"{changed}.png", seed=3)
    (tree_copy.root / f"{removed}.png").unlink()
    (tree_copy.root / "gamma" / "gamma_99.png").write_bytes((tree_copy.root / f"{changed}.png").read_bytes())
    changes = input_changes(run_dir)
    assert changes == InputChanges(changed=(changed,), added=("gamma/gamma_99",), removed=(removed,))
    assert "1 changed" in changes.describe() and "gamma/gamma_99" in changes.describe()
    plan_run(parse_config(make_config(root=tree_copy.root, gt_dir=tree_copy.gt_dir)), run_dir, check=False)
    assert not input_changes(run_dir)


def test_hashed_inputs_ignore_times_and_the_way_is_kept(
    make_config: ConfigFactory, tree_copy: ImageTree, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    config = parse_config(make_config(root=tree_copy.root, gt_dir=tree_copy.gt_dir))
    plan = plan_run(config, run_dir, check=False, hash_inputs=True)
    assert plan.fingerprint == "sha256" and all(s.startswith("sha256:") for s in plan.images.stamps)
    assert all((g is None) == (p is None) for g, p in zip(plan.images.gt_stamps, plan.images.gt))
    path = tree_copy.root / f"{plan.keys[0]}.png"
    os.utime(path, ns=(path.stat().st_mtime_ns + 10**9,) * 2)
    assert not input_changes(run_dir)  # same bytes
    again = plan_run(config, run_dir, check=False)  # the plan's way is kept
    assert again.fingerprint == "sha256" and again.shards == plan.shards
    _rewrite(path, seed=4)
    assert input_changes(run_dir).changed == (plan.keys[0],)


def test_input_changes_needs_no_torch(make_config: ConfigFactory, tree_copy: ImageTree, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    plan_run(parse_config(make_config(root=tree_copy.root, gt_dir=tree_copy.gt_dir)), run_dir, check=False)
    code = ("import sys; from pipeline.planning import input_changes; "
            f"assert not input_changes({str(run_dir)!r}); assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
