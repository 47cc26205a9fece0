"""pipeline.planning: shard layout, deterministic ids, what changes them, plan.json."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import config_hash, parse_config
from pipeline.data import discover_images
from pipeline.models import model_digest
from pipeline.planning import NO_LAYER, Plan, make_plan, sampled_method
from tests.tiny_experiment import ConfigFactory, ImageTree, write_checkpoint

DIGEST = "model-digest-0"


def _plan(raw: dict[str, Any], digest: str = DIGEST) -> Plan:
    config = parse_config(raw)
    return make_plan(config, discover_images(config.data), digest)


def _ids(plan: Plan, method: str, stage: str | None = None) -> dict[tuple[Any, ...], str]:
    """Shard ids of one method entry by what the shard covers."""
    return {
        (s.stage, s.images, s.samples, s.layers, s.metrics): s.id
        for s in plan.shards
        if s.method == method and (stage is None or s.stage == stage)
    }


def test_layout_of_the_tiny_plan(make_config: ConfigFactory) -> None:
    plan = _plan(make_config())
    chunks = [(0, 5), (5, 10), (10, 12)]
    assert plan.chunks() == chunks
    assert len(plan.records) == 12 and plan.class_names == ("alpha", "beta", "gamma")
    explain = plan.stage("explain")
    assert [(s.method, s.images, s.samples, s.layers) for s in explain] == [
        ("gradcam", c, None, ("layer2", "layer3")) for c in chunks
    ] + [("rise", c, r, (NO_LAYER,)) for c in chunks for r in [(0, 32), (32, 64)]]
    score = plan.stage("score")
    expected = [
        (method, chunk, (layer,), metrics)
        for method, layers in (("gradcam", ("layer2", "layer3")), ("rise", (NO_LAYER,)))
        for chunk in chunks
        for layer in layers
        for metrics in (("insertion", "deletion"), ("pcc",))
    ]
    assert sorted((s.method, s.images, s.layers, s.metrics) for s in score) == sorted(expected)
    for shard in score:
        readers = [e.id for e in explain if e.method == shard.method and e.images == shard.images]
        assert list(shard.after) == readers
        assert shard.samples is None
    ids = [s.id for s in plan.shards]
    assert len(set(ids)) == len(ids) == 9 + 18
    assert plan.config_hash == config_hash(parse_config(make_config()))
    assert plan.model_digest == DIGEST


def test_planning_twice_gives_the_same_ids(make_config: ConfigFactory) -> None:
    assert _plan(make_config()) == _plan(make_config())


@pytest.mark.parametrize(("n_masks", "per_shard"), [(100, 32), (64, 64), (64, 100), (7, 1)])
def test_sample_ranges_cover_every_mask_once(make_config: ConfigFactory, n_masks: int, per_shard: int) -> None:
    raw = make_config()
    raw["methods"][1]["params"]["n_masks"] = n_masks
    raw["sharding"]["samples_per_shard"] = per_shard
    plan = _plan(raw)
    for chunk in plan.chunks():
        ranges = sorted(s.samples for s in plan.stage("explain") if s.method == "rise" and s.images == chunk)
        covered = [i for start, stop in ranges for i in range(start, stop)]  # type: ignore[misc]
        assert covered == list(range(n_masks))
        per_forward = 5 // min(chunk[1] - chunk[0], 5)  # the tiny RISE's batch_size is 5
        size = max(per_forward, per_shard // per_forward * per_forward)
        assert all(start % per_forward == 0 for start, _ in ranges)  # type: ignore[misc]
        assert all(stop - start == size for start, stop in ranges[:-1])  # type: ignore[misc]
        assert len(ranges) == -(-n_masks // size)


def test_sample_ranges_are_whole_forward_batches(make_config: ConfigFactory) -> None:
    raw = make_config()
    raw["methods"] = [{"name": "rise", "params": {"n_masks": 100, "batch_size": 16}}]
    raw["sharding"]["samples_per_shard"] = 32
    plan = _plan(raw)
    ranges = {chunk: sorted(s.samples for s in plan.stage("explain") if s.images == chunk)  # type: ignore[type-var]
              for chunk in plan.chunks()}
    assert ranges[(0, 5)] == [(0, 30), (30, 60), (60, 90), (90, 100)]  # 16 // 5 = 3 masks per forward
    assert ranges[(10, 12)] == [(0, 32), (32, 64), (64, 96), (96, 100)]  # 16 // 2 = 8 masks per forward


def test_lime_is_split_by_its_samples(make_config: ConfigFactory) -> None:
    raw = make_config()
    raw["methods"] = [{"name": "lime"}]
    raw["sharding"]["samples_per_shard"] = 300
    raw["methods"] = [{"name": "lime", "params": {"batch_size": 60}}]
    config = parse_config(raw)
    lime = sampled_method(config, config.methods[0])
    assert lime is not None and lime.n_samples == 1000
    plan = make_plan(config, discover_images(config.data), DIGEST)
    ranges = sorted({s.samples for s in plan.stage("explain") if s.images == (0, 5)})  # type: ignore[type-var]
    assert ranges == [(0, 300), (300, 600), (600, 900), (900, 1000)]  # 12 samples per forward
    config = parse_config(make_config())
    assert sampled_method(config, config.methods[0]) is None  # gradcam draws no samples


def _compare(before: Plan, after: Plan, method: str) -> tuple[set[tuple[Any, ...]], set[tuple[Any, ...]]]:
    """Which shards of ``method`` kept their id and which got a new one."""
    old, new = _ids(before, method), _ids(after, method)
    assert old.keys() == new.keys()
    kept = {k for k in old if old[k] == new[k]}
    return kept, set(old) - kept


def test_changing_gradcam_layers_changes_only_gradcam_shards(make_config: ConfigFactory) -> None:
    raw = make_config()
    before = _plan(raw)
    raw["methods"][0]["layers"] = ["layer3", "layer2"]
    after = _plan(raw)
    assert _ids(after, "rise") == _ids(before, "rise")
    old_ids = set(_ids(before, "gradcam").values())
    assert not old_ids & set(_ids(after, "gradcam").values())


def test_changing_a_rise_parameter_or_the_seed_changes_only_rise_shards(make_config: ConfigFactory) -> None:
    raw = make_config()
    before = _plan(raw)
    for change in (lambda r: r["methods"][1]["params"].update(p1=0.3), lambda r: r.update(seed=1)):
        changed = make_config()
        change(changed)
        after = _plan(changed)
        assert _ids(after, "gradcam") == _ids(before, "gradcam")
        kept, renewed = _compare(before, after, "rise")
        assert not kept and len(renewed) == 12


def test_changing_the_image_set_changes_only_the_affected_chunks(
    make_config: ConfigFactory, image_tree: ImageTree, tmp_path: Path
) -> None:
    before = _plan(make_config())
    raw = make_config()
    split = tmp_path / "split.txt"
    split.write_text("\n".join(sorted(image_tree.keys)[:11]))  # the last chunk loses an image
    raw["data"]["subset"] = {"split_file": str(split)}
    after = _plan(raw)
    old, new = _ids(before, "rise"), _ids(after, "rise")
    assert {k: v for k, v in old.items() if k[1] != (10, 12)} == {k: v for k, v in new.items() if k[1] != (10, 11)}
    last_old = {v for k, v in old.items() if k[1] == (10, 12)}
    last_new = {v for k, v in new.items() if k[1] == (10, 11)}
    assert last_old and last_new and not last_old & last_new
    gradcam_old, gradcam_new = _ids(before, "gradcam"), _ids(after, "gradcam")
    assert {k: v for k, v in gradcam_old.items() if k[1] != (10, 12)} == {
        k: v for k, v in gradcam_new.items() if k[1] != (10, 11)
    }


def test_a_new_checkpoint_or_preprocessing_changes_every_id(make_config: ConfigFactory) -> None:
    raw = make_config()
    before = {s.id for s in _plan(raw).shards}
    assert not before & {s.id for s in _plan(raw, digest="model-digest-1").shards}
    for change in (
        lambda r: r["data"].update(image_size=40),
        lambda r: r["data"].update(mean=[0.5, 0.5, 0.5]),
        lambda r: r.update(target="label"),
    ):
        changed = make_config()
        change(changed)
        assert not before & {s.id for s in _plan(changed).shards}


def test_a_metric_parameter_changes_only_the_score_shards_that_use_it(make_config: ConfigFactory) -> None:
    raw = make_config()
    before = _plan(raw)
    raw["metrics"][0]["params"]["step"] = 32
    after = _plan(raw)
    for method in ("gradcam", "rise"):
        kept, renewed = _compare(before, after, method)
        assert {k[0] for k in kept if k[4] != ("pcc",)} == {"explain"}
        assert all(k[0] == "score" and k[4] == ("insertion", "deletion") for k in renewed)
        assert {k for k in kept if k[4] == ("pcc",)}  # the ground-truth shards keep their ids


def test_labels_that_do_not_change_outputs_keep_the_ids(make_config: ConfigFactory) -> None:
    raw = make_config()
    before = _plan(raw)
    raw["name"] = "renamed"
    raw["device"] = "auto"
    after = _plan(raw)
    assert [s.id for s in after.shards] == [s.id for s in before.shards]
    assert after.config_hash != before.config_hash


def test_plan_json_round_trip(make_config: ConfigFactory, tmp_path: Path) -> None:
    plan = _plan(make_config())
    path = tmp_path / "plan.json"
    plan.write(path)
    assert Plan.read(path) == plan
    data = json.loads(path.read_text())
    assert data["config_hash"] == plan.config_hash and data["model_digest"] == DIGEST
    assert data["images"]["keys"] == plan.keys
    assert sum(gt is not None for gt in data["images"]["gt"]) == 9
    assert Plan.read(path).records == plan.records
    assert "\n" not in path.read_text()  # compact
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]  # no temporary file left


def test_plan_lookups_and_descriptions(make_config: ConfigFactory, tmp_path: Path) -> None:
    plan = _plan(make_config())
    rise = next(s for s in plan.stage("explain") if s.method == "rise" and s.samples == (32, 64))
    assert plan.shard(rise.id) is rise
    assert rise.describe() == f"{rise.id} (explain rise images 0-4 samples 32-63)"
    gradcam = next(s for s in plan.stage("score") if s.method == "gradcam" and s.metrics == ("pcc",))
    assert gradcam.describe() == f"{gradcam.id} (score gradcam [layer2] images 0-4 metrics pcc)"
    with pytest.raises(KeyError, match="shard nope is not in this plan"):
        plan.shard("nope")
    with pytest.raises(FileNotFoundError, match="plan the run first"):
        Plan.read(tmp_path / "plan.json")


def test_shard_ids_follow_the_checkpoint_bytes_not_its_path(make_config: ConfigFactory, tmp_path: Path) -> None:
    first = write_checkpoint(tmp_path / "a.pt", seed=0)
    moved = tmp_path / "elsewhere" / "a.pt"
    moved.parent.mkdir()
    shutil.copyfile(first, moved)
    retrained = write_checkpoint(tmp_path / "b.pt", seed=1)

    def ids(checkpoint: Path) -> list[str]:
        config = parse_config(make_config(checkpoint_path=checkpoint))
        return [s.id for s in make_plan(config, discover_images(config.data), model_digest(config.model)).shards]

    assert ids(moved) == ids(first)
    assert not set(ids(retrained)) & set(ids(first))


def test_the_centre_crop_and_the_labels_explained_under_target_label_change_every_id(
    make_config: ConfigFactory,
) -> None:
    def ids(raw: dict[str, Any]) -> set[str]:
        return {s.id for s in _plan(raw).shards}

    squashed = ids(make_config())
    raw = make_config()
    raw["data"].update(resize="shorter_side_then_centre_crop", resize_size=40)
    assert not ids(raw) & squashed
    raw = make_config()
    raw["target"] = "label"
    labelled = ids(raw)
    raw["data"]["class_names"] = ["gamma", "beta", "alpha"]  # alpha and gamma swap labels: every chunk has one
    assert not ids(raw) & labelled
    raw["target"] = "predicted"  # the labels are not explained: the ids stay
    assert ids(raw) == squashed
