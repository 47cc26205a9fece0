"""Corrupt shards and checkpoints on a real small run: found, quarantined, computed again, never merged."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

import pipeline.store as store
from pipeline.config import parse_config
from pipeline.integrity import find_corrupt, results_whole
from pipeline.launching import run_local
from pipeline.planning import Plan
from pipeline.rundir import plan_run
from pipeline.run_dir import RunDir
from pipeline.stages import ReduceError, ShardRunner, reduce_run, run_shards
from pipeline.store import read_shard
from tests.tiny_experiment import ConfigFactory, FinishedRun, ImageTree


def _plan(run_dir: Path) -> Plan:
    return Plan.read(run_dir / "plan.json")


def _gradcam_explain(plan: Plan) -> str:
    return next(s.id for s in plan.stage("explain") if s.method == "gradcam")


def _readers(plan: Plan, shard_id: str) -> set[str]:
    return {s.id for s in plan.stage("score") if shard_id in s.after}


def test_find_corrupt_cheap_and_deep(run_copy: Path) -> None:
    plan = _plan(run_copy)
    folder = RunDir(run_copy)
    ids = [s.id for s in plan.shards]
    assert find_corrupt(run_copy, ids, deep=True) == {}
    truncated, zeroed = _gradcam_explain(plan), plan.stage("score")[0].id
    folder.shard(truncated).write_bytes(folder.shard(truncated).read_bytes()[:100])
    with h5py.File(folder.shard(zeroed), "a") as f:
        f["values/insertion"][...] = 0
    assert set(find_corrupt(run_copy, ids)) == {truncated}
    deep = find_corrupt(run_copy, ids, deep=True)
    assert set(deep) == {truncated, zeroed} and str(folder.shard(zeroed)) in deep[zeroed]


def test_reduce_never_merges_a_corrupt_shard_and_resume_fixes_it(run_copy: Path) -> None:
    plan = _plan(run_copy)
    folder = RunDir(run_copy)
    victim = _gradcam_explain(plan)
    with h5py.File(folder.shard(victim), "a") as f:
        del f["maps/layer3"]
    before = results_whole(run_copy)
    with pytest.raises(ReduceError) as error:
        reduce_run(run_copy, progress=False)
    message = str(error.value)
    assert str(folder.shard(victim)) in message and "maps/layer3" in message
    assert f"xai-pipeline resume {run_copy}" in message
    assert before and results_whole(run_copy)  # the old results stay whole
    assert victim not in folder.committed() and not _readers(plan, victim) & folder.committed()
    assert [p.name for p in folder.corrupt.iterdir() if p.suffix != ".txt"][0].startswith(f"{victim}.h5.")
    assert run_local(run_copy, progress=False) == {}
    assert folder.committed() == {s.id for s in plan.shards}
    reduce_run(run_copy, progress=False)
    assert results_whole(run_copy)


def test_run_shards_recomputes_a_corrupt_shard_and_its_readers(run_copy: Path) -> None:
    plan = _plan(run_copy)
    folder = RunDir(run_copy)
    victim = _gradcam_explain(plan)
    expected = read_shard(folder.shard(victim)).maps["layer3"]
    folder.shard(victim).write_bytes(b"")
    stamps = {i: folder.shard(i).stat().st_mtime_ns for i in _readers(plan, victim)}
    assert run_shards(run_copy, [], progress=False) == {}
    np.testing.assert_array_equal(read_shard(folder.shard(victim)).maps["layer3"], expected)
    assert all(folder.shard(i).stat().st_mtime_ns != stamp for i, stamp in stamps.items())
    assert len([p for p in folder.corrupt.iterdir() if p.suffix == ".txt"]) == 1
    assert folder.committed() == {s.id for s in plan.shards}  # the corrupt folder is not counted


def test_a_score_shard_reading_an_altered_explain_shard_recomputes_it(run_copy: Path) -> None:
    plan = _plan(run_copy)
    folder = RunDir(run_copy)
    victim = _gradcam_explain(plan)
    expected = read_shard(folder.shard(victim)).maps["layer2"]
    with h5py.File(folder.shard(victim), "a") as f:
        f["maps/layer2"][...] = 0  # passes the cheap check, fails the digest
    reader = sorted(_readers(plan, victim))[0]
    folder.shard(reader).unlink()
    runner = ShardRunner(run_copy)
    runner.run(reader)
    np.testing.assert_array_equal(read_shard(folder.shard(victim)).maps["layer2"], expected)
    assert _readers(plan, victim) - {reader} <= runner.invalidated


def _interrupted_rise(make_config: ConfigFactory, run_dir: Path) -> tuple[str, Path, Path]:
    """A RISE shard with a saved checkpoint, and its uninterrupted result."""
    raw = make_config()
    raw["methods"] = [{"name": "rise", "params": {"n_masks": 96, "grid_size": 4, "batch_size": 40}}]
    raw["metrics"] = [{"name": "pcc"}]
    raw["sharding"] = {"images_per_shard": 12, "samples_per_shard": 96}
    plan = plan_run(parse_config(raw), run_dir)
    (shard,) = plan.stage("explain")
    runner = ShardRunner(run_dir)
    whole = runner.run(shard.id)
    reference = whole.with_name("reference.h5")
    shutil.move(whole, reference)
    steps = runner.explain._steps  # save progress after the first step, then stop
    runner.explain.checkpoint_every = 0.0

    def first_step_only(*args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        iterator = steps(*args, **kwargs)  # type: ignore[arg-type]
        yield next(iterator)
        raise KeyboardInterrupt

    runner.explain._steps = first_step_only  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        runner.run(shard.id)
    return shard.id, RunDir(run_dir).checkpoint(shard.id), reference


@pytest.mark.parametrize("damage", ["truncated", "next_sample edited", "next_sample edited, digest kept"])
def test_a_bad_checkpoint_is_quarantined_and_the_shard_starts_afresh(
    make_config: ConfigFactory, tmp_path: Path, damage: str
) -> None:
    shard_id, checkpoint, reference = _interrupted_rise(make_config, tmp_path / "run")
    assert checkpoint.is_file()
    if damage == "truncated":
        checkpoint.write_bytes(checkpoint.read_bytes()[:-500])
    else:
        with h5py.File(checkpoint, "a") as f:
            f.attrs["next_sample"] = int(f.attrs["next_sample"]) + 40
            if damage.endswith("digest kept"):  # a writer that recomputed the digest: the sums' count disagrees
                attrs = {k: store._plain(v) for k, v in f.attrs.items()}
                datasets = {name: f[name][()] for name in json.loads(attrs["schema"])}
                f.attrs["digest"] = store._digest(datasets, attrs)
    path = ShardRunner(tmp_path / "run").run(shard_id)
    folder = RunDir(tmp_path / "run")
    assert not checkpoint.exists() and len(list(folder.corrupt.glob("*.partial.h5.*[0-9]"))) == 1
    assert read_shard(path).sums["weighted"].tobytes() == read_shard(reference).sums["weighted"].tobytes()


def test_results_whole_notices_a_changed_table(finished_run: FinishedRun, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(finished_run.run_dir, copy)
    assert results_whole(copy)
    with open(copy / "summary.csv", "a") as handle:
        handle.write("half a row")
    assert not results_whole(copy)
    (copy / "results.h5").unlink()
    assert not results_whole(copy)


def test_a_constant_gt_map_gives_nan_with_its_reason_and_spares_the_others(
    make_config: ConfigFactory, tree_copy: ImageTree, tmp_path: Path
) -> None:
    from PIL import Image

    key = sorted(tree_copy.gt_files)[0]
    Image.fromarray(np.full((8, 8), 9, np.uint8)).save(tree_copy.gt_files[key])
    run_dir = tmp_path / "run"
    plan = plan_run(parse_config(make_config(root=tree_copy.root, gt_dir=tree_copy.gt_dir)), run_dir)
    assert run_local(run_dir, progress=False) == {}
    (shard,) = [s for s in plan.stage("score") if "pcc" in s.metrics and s.layers == ("layer3",)
                and key in plan.keys[s.images[0]:s.images[1]]]
    output = read_shard(RunDir(run_dir).shard(shard.id))
    row = output.keys.index(key)
    assert np.isnan(output.values["pcc"][row]) and "is constant" in output.reasons["pcc"][row]
    others = [i for i, k in enumerate(output.keys) if k != key and k in tree_copy.gt_files]
    assert others and np.isfinite(output.values["pcc"][others]).all()
