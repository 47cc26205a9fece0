"""pipeline.stages runner, explain and score stages: committing, skipping, checkpoint/resume, image failures, scoring."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import pipeline.stages.explain as explain_stage
import pipeline.stages.runner as runner_module
from pipeline.config import parse_config
from pipeline.data import load_gt, load_image
from pipeline.demo_model import ShapesNet
from pipeline.methods.rise import Rise
from pipeline.planning import Plan, Shard
from pipeline.rundir import plan_run
from pipeline.store import read_shard
from pipeline.run_dir import RunDir
from pipeline.stages import ShardError, ShardRunner, run_shards
from tests.tiny_experiment import ConfigFactory, IMAGE_SIZE, ImageTree, add_broken_image

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _plan(raw: dict[str, Any], run_dir: Path) -> Plan:
    return plan_run(parse_config(raw), run_dir)


def _explain(plan: Plan, method: str, chunk: int = 0) -> list[Shard]:
    return [s for s in plan.stage("explain") if s.method == method and s.images == plan.chunks()[chunk]]


def _model(checkpoint: Path) -> ShapesNet:
    model = ShapesNet(num_classes=3, width=4)
    model.load_state_dict(torch.load(checkpoint, weights_only=True))
    return model.eval()


def _images(plan: Plan, keys: list[str]) -> torch.Tensor:
    records = {r.key: r for r in plan.records}
    return torch.stack([load_image(records[k].path, (IMAGE_SIZE, IMAGE_SIZE), MEAN, STD) for k in keys])


def _gradcam_layer3(model: ShapesNet, images: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
    """Grad-CAM written out: ReLU(sum_k mean(dy_c/dA_k) A_k), bilinear upsampling."""
    captured: list[torch.Tensor] = []
    handle = model.layer3.register_forward_hook(lambda _m, _i, output: captured.append(output))
    try:
        logits = model(images)
    finally:
        handle.remove()
    (activations,) = captured
    (gradients,) = torch.autograd.grad(logits[torch.arange(len(targets)), targets].sum(), activations)
    cam = torch.relu((gradients.mean(dim=(2, 3), keepdim=True) * activations).sum(dim=1))
    upsampled = F.interpolate(cam[:, None], size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return upsampled[:, 0].detach().numpy()


def _assert_same_output(first: Path, second: Path) -> None:
    a, b = read_shard(first), read_shard(second)
    assert a.keys == b.keys and a.failures == b.failures
    for name in ("labels", "targets", "predicted", "target_prob"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    for group in ("maps", "sums", "constants", "values", "curves"):
        left, right = getattr(a, group), getattr(b, group)
        assert left.keys() == right.keys(), group
        for key in left:
            assert left[key].dtype == right[key].dtype and left[key].tobytes() == right[key].tobytes(), (group, key)


def test_an_explain_shard_is_computed_and_committed(
    make_config: ConfigFactory, tmp_path: Path, checkpoint: Path
) -> None:
    plan = _plan(make_config(), tmp_path / "run")
    (shard,) = _explain(plan, "gradcam")
    runner = ShardRunner(tmp_path / "run")
    path = runner.run(shard.id)
    assert path == RunDir(tmp_path / "run").shard(shard.id) and path.is_file()
    output = read_shard(path)
    keys = plan.keys[:5]
    assert output.keys == keys and output.failures == {}
    np.testing.assert_array_equal(output.labels, [r.label for r in plan.records[:5]])
    images = _images(plan, keys)
    model = _model(checkpoint)
    with torch.no_grad():
        probabilities = model(images).softmax(dim=1).numpy()
    np.testing.assert_array_equal(output.predicted, probabilities.argmax(axis=1))
    np.testing.assert_array_equal(output.targets, output.predicted)  # target: predicted
    np.testing.assert_allclose(output.target_prob, probabilities.max(axis=1), rtol=1e-5)
    assert set(output.maps) == {"layer2", "layer3"}
    assert output.maps["layer2"].shape == (5, IMAGE_SIZE, IMAGE_SIZE)
    expected = _gradcam_layer3(model, images, torch.from_numpy(output.targets))
    assert expected.max() > 0
    np.testing.assert_allclose(output.maps["layer3"], expected, rtol=1e-4, atol=1e-6 * expected.max())
    assert (output.attrs["shard_id"], output.attrs["stage"], output.attrs["method"]) == (shard.id, "explain", "gradcam")
    assert (output.attrs["config_hash"], output.attrs["model_digest"]) == (plan.config_hash, plan.model_digest)
    assert output.attrs["device"] == "cpu"
    assert "torch" in json.loads(output.attrs["versions"])


@pytest.mark.parametrize("target", ["predicted", "label"])
def test_a_cam_shard_classifies_its_images_as_every_other_method_does(
    make_config: ConfigFactory, tmp_path: Path, target: str
) -> None:
    """Under ``target: predicted`` a CAM shard's targets come from its own pass (one forward per image;
    two under ``label``); either way its image table is a RISE shard's of the same chunk, bit for bit."""
    raw = make_config()
    raw["target"] = target
    plan = _plan(raw, tmp_path / "run")
    runner = ShardRunner(tmp_path / "run")
    rows: list[int] = []
    handle = runner.context.model.register_forward_hook(lambda _m, inputs, _o: rows.append(len(inputs[0])))
    try:
        (cam,) = _explain(plan, "gradcam")
        cam_output = read_shard(runner.run(cam.id))
    finally:
        handle.remove()
    assert sum(rows) == 5 * (1 if target == "predicted" else 2)
    rise = read_shard(runner.run(_explain(plan, "rise")[0].id))
    assert cam_output.keys == rise.keys
    for name in ("labels", "targets", "predicted", "target_prob"):
        assert getattr(cam_output, name).tobytes() == getattr(rise, name).tobytes(), name
    expected = cam_output.predicted if target == "predicted" else cam_output.labels
    np.testing.assert_array_equal(cam_output.targets, expected)


def test_a_committed_shard_is_skipped(
    make_config: ConfigFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = _plan(make_config(), tmp_path / "run")
    (shard,) = _explain(plan, "gradcam", chunk=1)
    runner = ShardRunner(tmp_path / "run")
    path = runner.run(shard.id)
    stamp = path.stat().st_mtime_ns

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a committed shard was computed again")

    monkeypatch.setattr(explain_stage, "build_method", refuse)
    assert runner.run(shard.id) == path
    assert run_shards(tmp_path / "run", [shard.id], progress=False) == {}
    assert path.stat().st_mtime_ns == stamp
    with pytest.raises(AssertionError, match="computed again"):
        runner.run(shard.id, force=True)


def test_an_interrupted_sampled_shard_resumes_to_the_same_result(
    make_config: ConfigFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = make_config()
    raw["methods"] = [{"name": "rise", "params": {"n_masks": 96, "grid_size": 4, "batch_size": 40}}]
    raw["metrics"] = [{"name": "pcc"}]
    raw["sharding"] = {"images_per_shard": 5, "samples_per_shard": 96}  # forwards of 5 images x 8 masks
    run_dir = tmp_path / "run"
    plan = _plan(raw, run_dir)
    (shard,) = _explain(plan, "rise")
    reference = tmp_path / "uninterrupted.h5"
    ShardRunner(run_dir).run(shard.id).rename(reference)

    original = Rise.group_sums
    calls: list[tuple[int, int]] = []

    def interrupted(self: Rise, images: torch.Tensor, targets: torch.Tensor, start: int, stop: int,
                    constants: dict[str, torch.Tensor]) -> Any:
        calls.append((start, stop))
        if len(calls) == 3:
            raise RuntimeError("node preempted")
        return original(self, images, targets, start, stop, constants)

    monkeypatch.setattr(Rise, "group_sums", interrupted)
    with pytest.raises(RuntimeError, match="node preempted"):
        ShardRunner(run_dir, checkpoint_every=0).run(shard.id)
    assert calls == [(0, 8), (8, 16), (16, 24)]
    assert not RunDir(run_dir).shard(shard.id).exists()
    assert shard.id not in RunDir(run_dir).committed()
    partial = RunDir(run_dir).checkpoint(shard.id)
    assert partial.is_file()
    saved = read_shard(partial)
    assert saved.attrs["next_sample"] == 16
    np.testing.assert_array_equal(saved.sums["count"], np.full(5, 16))
    assert RunDir(run_dir).read_error(shard.id)["kind"] == "error"

    calls.clear()
    monkeypatch.setattr(Rise, "group_sums", lambda self, *a: (calls.append(a[2:4]), original(self, *a))[1])
    path = ShardRunner(run_dir, checkpoint_every=0).run(shard.id)
    assert calls == [(start, start + 8) for start in range(16, 96, 8)]  # only the missing masks were computed
    _assert_same_output(path, reference)
    assert not partial.exists()
    assert not RunDir(run_dir).error(shard.id).exists()


def test_a_stale_checkpoint_of_other_images_is_ignored(make_config: ConfigFactory, tmp_path: Path) -> None:
    raw = make_config()
    raw["methods"] = [{"name": "rise", "params": {"n_masks": 64, "grid_size": 4, "batch_size": 8}}]
    raw["metrics"] = [{"name": "pcc"}]
    run_dir = tmp_path / "run"
    plan = _plan(raw, run_dir)
    first, second = _explain(plan, "rise", chunk=0)[0], _explain(plan, "rise", chunk=1)[0]
    reference = ShardRunner(run_dir).run(first.id)
    reference = reference.rename(tmp_path / "reference.h5")
    other = ShardRunner(run_dir).run(second.id)
    other.rename(RunDir(run_dir).checkpoint(first.id))  # progress of other images under this shard's name
    path = ShardRunner(run_dir).run(first.id)
    _assert_same_output(path, reference)
    assert not RunDir(run_dir).checkpoint(first.id).exists()


def test_save_progress_without_a_shard_in_progress_does_nothing(make_config: ConfigFactory, tmp_path: Path) -> None:
    _plan(make_config(), tmp_path / "run")
    ShardRunner(tmp_path / "run").save_progress()
    assert list((tmp_path / "run" / "shards").iterdir()) == []


def test_an_unreadable_image_fails_alone(make_config: ConfigFactory, tree_copy: ImageTree, tmp_path: Path) -> None:
    broken = add_broken_image(tree_copy.root)
    plan = _plan(make_config(root=tree_copy.root, gt_dir=tree_copy.gt_dir), tmp_path / "run")
    index = plan.keys.index(broken)
    chunk = next(i for i, (lo, hi) in enumerate(plan.chunks()) if lo <= index < hi)
    lo, hi = plan.chunks()[chunk]
    runner = ShardRunner(tmp_path / "run")
    for method in ("gradcam", "rise"):
        for shard in _explain(plan, method, chunk):
            output = read_shard(runner.run(shard.id))
            assert output.keys == [k for k in plan.keys[lo:hi] if k != broken]
            assert list(output.failures) == [broken]
            assert str(tree_copy.root / f"{broken}.png") in output.failures[broken]
            layer_data = output.maps or output.sums
            assert all(len(v) == hi - lo - 1 for v in layer_data.values())
    for shard in plan.stage("score"):
        if shard.images == (lo, hi):
            output = read_shard(runner.run(shard.id))
            assert broken not in output.keys
            assert all(len(v) == hi - lo - 1 for v in output.values.values())


def test_a_shard_whose_images_all_fail_commits_the_failures(
    make_config: ConfigFactory, tree_copy: ImageTree, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    plan = _plan(make_config(root=tree_copy.root, gt_dir=tree_copy.gt_dir), run_dir)
    for record in plan.records[:5]:  # the whole first chunk becomes unreadable after planning
        record.path.write_bytes(b"garbage")
    runner = ShardRunner(run_dir)
    for shard in _explain(plan, "gradcam", chunk=0) + _explain(plan, "rise", chunk=0):
        output = read_shard(runner.run(shard.id))
        assert output.keys == [] and output.maps == {} and output.labels.shape == (0,)
        assert list(output.failures) == plan.keys[:5]
        for record in plan.records[:5]:
            assert f"cannot read image {record.path}" in output.failures[record.key]
    for shard in plan.stage("score"):
        if shard.images == (0, 5):
            output = read_shard(runner.run(shard.id))
            assert output.keys == [] and output.values == {} and output.curves == {}
    assert not RunDir(run_dir).scan().errors
    ordered = [s.id for s in plan.stage("explain")] + [s.id for s in plan.stage("score")]
    assert run_shards(run_dir, ordered, progress=False) == {}
    assert RunDir(run_dir).committed() == {s.id for s in plan.shards}


def test_an_image_that_cannot_be_read_again_for_scoring_is_a_data_error(
    make_config: ConfigFactory, tree_copy: ImageTree, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    plan = _plan(make_config(root=tree_copy.root, gt_dir=tree_copy.gt_dir), run_dir)
    runner = ShardRunner(run_dir)
    (explain,) = _explain(plan, "gradcam", chunk=1)
    runner.run(explain.id)
    damaged = plan.records[6]
    damaged.path.write_bytes(b"garbage")  # readable when explained, not when scored
    score = next(s for s in plan.stage("score") if s.after == (explain.id,))
    with pytest.raises(ShardError) as error:
        runner.run(score.id)
    assert error.value.kind == "data"
    record = RunDir(run_dir).read_error(score.id)
    assert record["kind"] == "data"
    assert "images that were explained can no longer be read" in record["message"]
    assert str(damaged.path) in record["message"]
    assert not RunDir(run_dir).shard(score.id).exists()
    later = next(s for s in plan.stage("score") if s.images == (10, 12))
    failed = run_shards(run_dir, [score.id, later.after[0], later.id], progress=False)
    assert list(failed) == [score.id]  # the others go on


def test_score_shards_hold_the_metrics_of_the_merged_maps(
    make_config: ConfigFactory, tmp_path: Path, checkpoint: Path
) -> None:
    run_dir = tmp_path / "run"
    plan = _plan(make_config(), run_dir)
    runner = ShardRunner(run_dir)
    (explain,) = _explain(plan, "gradcam")
    explained = read_shard(runner.run(explain.id))
    scores = {s.metrics: s for s in plan.stage("score") if s.after == (explain.id,) and s.layers == ("layer3",)}
    pcc = read_shard(runner.run(scores[("pcc",)].id))
    records = {r.key: r for r in plan.records}
    assert pcc.keys == explained.keys
    for row, key in enumerate(pcc.keys):
        gt_path = records[key].gt_path
        if gt_path is None:
            assert np.isnan(pcc.values["pcc"][row])
            continue
        gt = load_gt(gt_path, (IMAGE_SIZE, IMAGE_SIZE)).numpy().ravel()
        expected = np.corrcoef(explained.maps["layer3"][row].ravel().astype(np.float64), gt)[0, 1]
        assert pcc.values["pcc"][row] == pytest.approx(expected, rel=1e-6)
    assert np.isfinite(pcc.values["pcc"]).sum() == sum(records[k].gt_path is not None for k in pcc.keys)

    perturbation = read_shard(runner.run(scores[("insertion", "deletion")].id))
    insertion, deletion = perturbation.curves["insertion"], perturbation.curves["deletion"]
    steps = IMAGE_SIZE * IMAGE_SIZE // 64
    assert insertion.shape == deletion.shape == (5, steps + 1)
    for name, curve in (("insertion", insertion), ("deletion", deletion)):
        trapezoid = (curve.sum(axis=1, dtype=np.float64) - (curve[:, 0] + curve[:, -1]) / 2) / steps
        np.testing.assert_allclose(perturbation.values[name], trapezoid, rtol=1e-5)
    np.testing.assert_allclose(insertion[:, -1], explained.target_prob, rtol=1e-5)  # everything inserted
    np.testing.assert_allclose(deletion[:, 0], explained.target_prob, rtol=1e-5)  # nothing deleted yet
    assert set(perturbation.values) == {"insertion", "deletion"} and perturbation.maps == {}


def test_run_shards_commits_the_whole_plan(make_config: ConfigFactory, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    plan = _plan(make_config(), run_dir)
    ordered = [s.id for s in plan.stage("explain")] + [s.id for s in plan.stage("score")]
    assert run_shards(run_dir, ordered, progress=False) == {}
    assert RunDir(run_dir).committed() == {s.id for s in plan.shards}
    assert not RunDir(run_dir).scan().errors
    files = sorted(p.relative_to(run_dir / "shards").as_posix() for p in (run_dir / "shards").rglob("*"))
    assert files == sorted({i[:2] for i in ordered} | {f"{i[:2]}/{i}.h5" for i in ordered})


def test_an_unreadable_gt_map_does_not_fail_the_perturbation_metrics(
    make_config: ConfigFactory, tree_copy: ImageTree, tmp_path: Path
) -> None:
    key = sorted(tree_copy.gt_files)[0]
    tree_copy.gt_files[key].write_bytes(b"garbage")
    run_dir = tmp_path / "run"
    plan = _plan(make_config(root=tree_copy.root, gt_dir=tree_copy.gt_dir), run_dir)
    chunk = plan.chunks()[next(i for i, (lo, hi) in enumerate(plan.chunks()) if key in plan.keys[lo:hi])]
    runner = ShardRunner(run_dir)
    (explain,) = [s for s in plan.stage("explain") if s.method == "gradcam" and s.images == chunk]
    runner.run(explain.id)
    (perturbation,) = [s for s in plan.stage("score") if s.after == (explain.id,) and s.layers == ("layer3",)
                       and s.metrics == ("insertion", "deletion")]
    output = read_shard(runner.run(perturbation.id))
    assert key in output.keys


def test_a_failing_commit_is_recorded(
    make_config: ConfigFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "run"
    plan = _plan(make_config(), run_dir)
    (shard,) = _explain(plan, "gradcam")

    def full_disk(path: Path, output: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runner_module, "write_shard", full_disk)
    with pytest.raises(OSError):
        ShardRunner(run_dir).run(shard.id)
    assert "No space left on device" in RunDir(run_dir).read_error(shard.id)["message"]
