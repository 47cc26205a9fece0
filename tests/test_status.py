"""pipeline.status: done, pending, failed and waiting shards read from the run folder.

States against a (fake) scheduler are in tests/launching/test_slurm_unit.py."""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from pipeline.cli import main
from pipeline.config import parse_config
from pipeline.cost import CostEstimate
from pipeline.run_dir import RunDir
from pipeline.rundir import plan_run
from pipeline.status import run_status
from pipeline.stages import run_shards
from tests.tiny_experiment import ConfigFactory, FinishedRun, ImageTree, mark_committed


@pytest.mark.parametrize("scheduler", [False, True])
def test_a_finished_run(make_config: ConfigFactory, tmp_path: Path, scheduler: bool) -> None:
    run_dir = tmp_path / "run"
    for shard in plan_run(parse_config(make_config()), run_dir).shards:
        mark_committed(run_dir, shard.id)
    RunDir(run_dir).results.write_bytes(b"")  # not a whole results file: the run still needs its reduce
    status = run_status(run_dir, scheduler=scheduler)
    planned = {s.id for s in status.plan.shards}
    assert status.done == planned and status.total == len(planned) == 27
    assert (status.pending, status.failed, status.running, status.scheduler_note) == (set(), {}, set(), None)
    assert status.finished
    text = status.describe()
    assert f"12 images, {len(planned)} shards" in text
    assert "explain  done      9  running      0  pending      0  failed      0  waiting      0" in text
    assert "score    done     18  running      0  pending      0  failed      0  waiting      0" in text
    assert not status.reduced and f"all shards done: `xai-pipeline reduce {run_dir}`" in text


def test_finished_only_while_the_results_and_tables_are_whole(run_copy: Path) -> None:
    status = run_status(run_copy, scheduler=False)
    assert status.reduced and f"finished: results in {run_copy / 'results.h5'}" in status.describe()
    summary = run_copy / "summary.md"
    summary.write_text(summary.read_text()[:40])  # a table cut short: --verify compares the digests
    assert run_status(run_copy, scheduler=False).reduced
    status = run_status(run_copy, scheduler=False, verify=True)
    assert not status.reduced and "all shards done" in status.describe()
    summary.unlink()  # a table gone: status sees it without reading anything
    assert not run_status(run_copy, scheduler=False).reduced


def test_verify_finds_a_damaged_shard_and_resume_recomputes_it(
    run_copy: Path, finished_run: FinishedRun, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = run_status(run_copy, scheduler=False).plan
    victim = plan.stage("explain")[0]
    path = RunDir(run_copy).shard(victim.id)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte deep inside the file
    path.write_bytes(bytes(data))
    assert victim.id in run_status(run_copy, scheduler=False).done  # the listing alone cannot tell
    status = run_status(run_copy, scheduler=False, verify=True)
    assert victim.id in status.corrupt and victim.id not in status.done and not status.reduced
    text = status.describe()
    assert f"corrupt {victim.describe()}" in text and "xai-pipeline resume" in text
    assert main(["status", str(run_copy), "--verify"]) == 0
    assert "corrupt" in capsys.readouterr().out
    assert main(["resume", str(run_copy), "--no-progress"]) == 0
    assert run_status(run_copy, scheduler=False, verify=True).corrupt == {}
    assert list((RunDir(run_copy).shards / "corrupt").iterdir())  # kept for inspection
    with h5py.File(run_copy / "results.h5", "r") as got, h5py.File(finished_run.run_dir / "results.h5", "r") as ref:
        for name in ("maps/gradcam/layer2", "maps/rise/-"):
            np.testing.assert_array_equal(got[name][()], ref[name][()])
    pd.testing.assert_frame_equal(pd.read_parquet(run_copy / "metrics.parquet"),
                                  pd.read_parquet(finished_run.run_dir / "metrics.parquet"))


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage"])
def test_every_status_finds_cut_and_overwritten_shards(run_copy: Path, damage: str) -> None:
    plan = run_status(run_copy, scheduler=False).plan
    victim = plan.stage("score")[-1]
    path = RunDir(run_copy).shard(victim.id)
    data = path.read_bytes()
    path.write_bytes({"empty": b"", "truncated": data[:-100], "garbage": bytes(len(data))}[damage])
    status = run_status(run_copy, scheduler=False)  # no --verify: the header check alone
    assert victim.id not in status.done and not status.finished and not status.reduced
    expected = {"empty": "the file is empty", "truncated": f"truncated ({len(data) - 100} bytes of the {len(data)}",
                "garbage": "not an HDF5 file"}[damage]
    assert list(status.corrupt) == [victim.id] and expected in status.corrupt[victim.id]
    assert f"corrupt {victim.describe()}: {path}" in status.describe()


def test_every_status_finds_a_missing_dataset_and_opens_each_shard_once(
    run_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipeline.store as store

    opened: list[Path] = []
    check = store.verify_shard
    monkeypatch.setattr(store, "verify_shard", lambda path, deep: opened.append(path) or check(path, deep=deep))
    plan = run_status(run_copy, scheduler=False).plan
    assert len(opened) == len(plan.shards)  # the first status checks every committed shard
    opened.clear()
    assert run_status(run_copy, scheduler=False).reduced and opened == []  # then only their sizes and times
    victim = plan.stage("explain")[0]
    with h5py.File(RunDir(run_copy).shard(victim.id), "a") as f:
        del f["images/keys"]  # a dataset deleted after the commit (the file's time changes)
    status = run_status(run_copy, scheduler=False)
    assert opened == [RunDir(run_copy).shard(victim.id)]
    assert victim.id not in status.done and "images/keys are missing" in status.corrupt[victim.id]
    assert victim.id in run_status(run_copy, scheduler=False).corrupt  # a corrupt shard is checked every time


def test_a_planned_run_is_all_pending(make_config: ConfigFactory, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    plan = plan_run(parse_config(make_config()), run_dir)
    status = run_status(run_dir)
    assert status.pending == {s.id for s in plan.shards}
    assert status.done == set() and status.failed == {} and not status.finished
    mark_committed(run_dir, plan.shards[0].id)  # committed files are the truth
    RunDir(run_dir).record_error(plan.shards[0].id, "an old failure", kind="error")  # ... over an older error record
    RunDir(run_dir).record_error("not-in-the-plan", "from another run", kind="error")
    status = run_status(run_dir, scheduler=False)
    assert status.done == {plan.shards[0].id}
    assert status.failed == {}
    assert len(status.pending) == len(plan.shards) - 1


def test_status_shows_the_planned_cost(make_config: ConfigFactory, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    plan_run(parse_config(make_config()), run_dir)
    estimate = CostEstimate.read(RunDir(run_dir).cost)
    text = run_status(run_dir, scheduler=False).describe()
    assert f"cost: {estimate.total.forwards:,d} forwards, {estimate.total.backwards:,d} backwards planned" in text
    assert "on cpu (estimate)" in text


@pytest.mark.parametrize("scheduler", [False, True])
def test_done_pending_and_failed_shards(
    make_config: ConfigFactory, tree_copy: ImageTree, tmp_path: Path, scheduler: bool
) -> None:
    run_dir = tmp_path / "run"
    plan = plan_run(parse_config(make_config(root=tree_copy.root, gt_dir=tree_copy.gt_dir)), run_dir)
    assert run_shards(run_dir, [s.id for s in plan.stage("explain")], progress=False) == {}
    damaged = plan.records[1]
    damaged.path.write_bytes(b"garbage")  # explained, but no longer readable for scoring
    chunk_scores = {c: [s.id for s in plan.stage("score") if s.images == c] for c in plan.chunks()}
    failures = run_shards(run_dir, chunk_scores[(0, 5)] + chunk_scores[(5, 10)], progress=False)
    assert set(failures) == set(chunk_scores[(0, 5)])

    status = run_status(run_dir, scheduler=scheduler)
    assert set(status.failed) == set(chunk_scores[(0, 5)]) and len(status.failed) == 6
    for record in status.failed.values():
        assert record["kind"] == "data"
        assert "images that were explained can no longer be read" in record["message"]
        assert str(damaged.path) in record["message"]
    assert status.pending == set(chunk_scores[(10, 12)])  # never attempted
    assert status.done == {s.id for s in plan.stage("explain")} | set(chunk_scores[(5, 10)])
    assert not status.finished and status.running == set() and status.scheduler_note is None
    text = status.describe()
    assert "explain  done      9  running      0  pending      0  failed      0  waiting      0" in text
    assert "score    done      6  running      0  pending      6  failed      6  waiting      0" in text
    for shard_id in status.failed:
        line = next(line for line in text.splitlines() if shard_id in line)
        assert line.strip().startswith(f"failed {plan.shard(shard_id).describe()}: [data] ")
        assert "images that were explained can no longer be read" in line


def test_score_shards_of_a_failed_explain_shard_wait_on_input(make_config: ConfigFactory, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    plan = plan_run(parse_config(make_config()), run_dir)
    explain = plan.stage("explain")[0]
    RunDir(run_dir).record_error(explain.id, "RuntimeError: CUDA error: out of memory", kind="error")
    status = run_status(run_dir)
    assert status.failed[explain.id]["message"] == "RuntimeError: CUDA error: out of memory"
    assert set(status.waiting) == {s.id for s in plan.stage("score") if explain.id in s.after}
    assert all(inputs == [explain.id] for inputs in status.waiting.values())


def test_verify_reports_changed_inputs(make_config: ConfigFactory, tree_copy: ImageTree, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    plan = plan_run(parse_config(make_config(root=tree_copy.root, gt_dir=tree_copy.gt_dir)), run_dir)
    assert run_status(run_dir, scheduler=False).inputs_note is None  # only --verify walks the data
    assert run_status(run_dir, scheduler=False, verify=True).inputs_note == "unchanged since planning"
    record = plan.records[0]
    record.path.write_bytes(record.path.read_bytes() + b"\0")  # the same image, one byte longer
    note = run_status(run_dir, scheduler=False, verify=True).inputs_note
    assert note is not None and record.key in note and "xai-pipeline resume" in note
    assert f"inputs: {note}" in run_status(run_dir, scheduler=False, verify=True).describe()
