"""The SLURM executor against a fake scheduler (sbatch, sacct, scancel scripts on PATH).

Covers the generated sbatch script (golden file), array splitting and the jobs.json
record, what a job receives (paths and ids only), resuming exactly the uncommitted
shards, refusing changed configs and checkpoints, status from committed files first
and one sacct call second (also when sacct fails), cancelling, the job callable's
checkpoint/requeue against an uninterrupted run, error records with log paths, and
a plan of more than 20000 shards planned, submitted and shown in seconds.
"""
from __future__ import annotations

import json
import pickle
import shlex
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest
import torch
import yaml

from pipeline.cli import main
from pipeline.config import load_config, parse_config, save_config
from pipeline.launching.launch import launch_run
from pipeline.launching.profiles import load_profile
from pipeline.launching.slurm import ShardJob, ShardJobError, parse_sacct, read_submissions
from pipeline.methods.rise import Rise
from pipeline.planning import Plan
from pipeline.rundir import plan_run
from pipeline.status import run_status
from pipeline.store import read_shard
from pipeline.run_dir import RunDir
from pipeline.stages import ShardRunner
from tests.launching.conftest import FakeSlurm
from tests.launching.tiny import REPO, cluster_profile
from tests.tiny_experiment import CLASSES, ImageTree, write_checkpoint

GOLDEN = Path(__file__).parent / "golden" / "slurm-gpu.sbatch"
GPU_PROFILE = REPO / "jobs" / "clusters" / "slurm-gpu.yaml"


def _touch(path: Path) -> None:
    """An empty file at ``path``: a committed shard as far as planning and status can tell."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()


def _normalized(script: str, run_dir: Path) -> str:
    return script.replace(str(run_dir), "{RUN_DIR}").replace(shlex.quote(sys.executable), "{PYTHON}")


def _write_profile(path: Path, **changes: Any) -> Path:
    path.write_text(yaml.safe_dump(cluster_profile(**changes).model_dump(mode="json")))
    return path


def _plan(run_dir: Path) -> Plan:
    return Plan.read(run_dir / "plan.json")


# ----------------------------------------------------------------- submission
def test_sbatch_script_of_the_gpu_profile_matches_the_golden_file(
    fake_slurm: FakeSlurm, plan_tiny: Callable[..., Path]
) -> None:
    run_dir = plan_tiny(images_per_shard=1)  # 36 explain shards: 5 tasks of 8 in one array
    launch_run(run_dir, load_profile(GPU_PROFILE))
    explain, score, reduce = fake_slurm.scripts()
    assert _normalized(explain, run_dir) == GOLDEN.read_text()
    assert "#SBATCH --dependency=afterok:1\n" in score and "#SBATCH --array=0-2%3\n" in score  # 24 score shards
    assert "#SBATCH --dependency=afterok:2\n" in reduce and "--array" not in reduce
    assert "#SBATCH --kill-on-invalid-dep=yes\n" in reduce


def test_arrays_are_split_and_every_pending_shard_is_recorded_once(
    fake_slurm: FakeSlurm, plan_tiny: Callable[..., Path]
) -> None:
    run_dir = plan_tiny()  # 6 explain shards (2 gradcam chunks, 2 chunks x 2 rise sample ranges), 4 score shards
    profile = cluster_profile(shards_per_task=2, max_array_size=2, array_parallelism=1)
    result = launch_run(run_dir, profile)
    plan = _plan(run_dir)
    submissions = read_submissions(run_dir)
    assert [(s.job_id, s.stage, len(s.tasks), s.array) for s in submissions] == [
        ("1", "explain", 2, True), ("2", "explain", 1, False), ("3", "score", 2, True), ("4", "reduce", 0, False),
    ]
    assert [s.depends_on for s in submissions] == [(), (), ("1", "2"), ("3",)]
    for stage in ("explain", "score"):
        recorded = [i for s in submissions if s.stage == stage for task in s.tasks for i in task]
        assert recorded == [s.id for s in plan.stage(stage)]
    assert all(len(task) <= 2 for s in submissions for task in s.tasks)
    scripts = fake_slurm.scripts()
    assert "#SBATCH --array=0-1%1\n" in scripts[0] and "--array" not in scripts[1]
    assert "#SBATCH --dependency=afterok:1:2\n" in scripts[2]
    assert "job 3 (score): 4 shard(s) in 2 task(s), after 1, 2" in result.describe()
    jobs = json.loads((run_dir / "jobs.json").read_text())
    assert jobs["config"] == yaml.safe_load((run_dir / "config.yaml").read_text())
    assert jobs["profile"]["shards_per_task"] == 2


def test_jobs_receive_only_the_run_folder_and_shard_ids(fake_slurm: FakeSlurm, plan_tiny: Callable[..., Path]) -> None:
    run_dir = plan_tiny()
    launch_run(run_dir, cluster_profile(shards_per_task=4))
    first = read_submissions(run_dir)[0]
    pickles = sorted((run_dir / "slurm").glob(f"{first.job_id}_*_submitted.pkl"))
    assert len(pickles) == len(first.tasks) == 2
    for index, path in enumerate(pickles):
        assert path.stat().st_size < 2000
        delayed = pickle.loads(path.read_bytes())
        job = delayed.function
        assert isinstance(job, ShardJob) and delayed.args == () and delayed.kwargs == {}
        assert job.run_dir == str(run_dir.resolve())
        assert job.shard_ids == list(first.tasks[int(path.name.split("_")[1])])
        assert {k for k, v in vars(job).items() if v not in (None, set())} == {
            "run_dir", "shard_ids", "force", "checkpoint_every_s", "requeues", "max_requeues"}


def test_preflight_failure_submits_nothing(
    fake_slurm: FakeSlurm, plan_tiny: Callable[..., Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    run_dir = plan_tiny(layer="layer9", check=False)
    assert main(["launch", str(run_dir), "--profile", str(_write_profile(tmp_path / "p.yaml"))]) == 2
    err = capsys.readouterr().err
    assert "pre-flight check failed, nothing was started" in err and "layer9" in err
    assert fake_slurm.scripts() == [] and not (run_dir / "jobs.json").exists()


# ----------------------------------------------------------------------- resume
def test_resume_submits_exactly_the_uncommitted_shards(fake_slurm: FakeSlurm, plan_tiny: Callable[..., Path]) -> None:
    run_dir = plan_tiny()
    plan = _plan(run_dir)
    explain = plan.stage("explain")
    for shard in explain[:4]:
        _touch(RunDir(run_dir).shard(shard.id))  # committed, as far as planning and status can tell
    launch_run(run_dir, cluster_profile(shards_per_task=3))
    submitted = {i for s in read_submissions(run_dir) for task in s.tasks for i in task}
    assert submitted == {s.id for s in plan.shards} - {s.id for s in explain[:4]}
    assert submitted == {s.id for s in plan.shards} - RunDir(run_dir).committed()


def test_resume_refuses_while_jobs_of_the_run_are_active(
    fake_slurm: FakeSlurm, plan_tiny: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = plan_tiny()
    profile = _write_profile(tmp_path / "p.yaml", shards_per_task=4)
    assert main(["launch", str(run_dir), "--profile", str(profile)]) == 0
    fake_slurm.answer(["1_0|COMPLETED", "1_1|RUNNING", "2|PENDING", "3|PENDING"])  # explain in 2 tasks, score in 1
    assert main(["resume", str(run_dir)]) == 2
    assert "job(s) 1, 2, 3 of" in capsys.readouterr().err
    assert len(fake_slurm.scripts()) == 3
    fake_slurm.answer(["1_0|COMPLETED", "1_1|CANCELLED by 0", "2|CANCELLED by 0", "3|CANCELLED by 0"])
    assert main(["resume", str(run_dir)]) == 0  # the recorded profile is used again
    assert len(fake_slurm.scripts()) == 6
    assert len(fake_slurm.calls("sacct")) == 2


def test_resume_refuses_a_changed_config_and_says_what_changed(
    fake_slurm: FakeSlurm, plan_tiny: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = plan_tiny()
    launch_run(run_dir, cluster_profile())
    config = load_config(run_dir / "config.yaml")
    save_config(parse_config({**config.model_dump(mode="json"), "seed": 5}), run_dir / "config.yaml")
    assert main(["resume", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "refusing to mix results" in err and "config.yaml changed since planning" in err
    assert "seed: 0 -> 5" in err
    assert len(fake_slurm.scripts()) == 3


def test_resume_refuses_a_replaced_checkpoint(
    fake_slurm: FakeSlurm, image_tree: ImageTree, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.launching.tiny import launch_config

    checkpoint = write_checkpoint(tmp_path / "model.pt")
    run_dir = tmp_path / "run"
    plan_run(parse_config(launch_config(image_tree.root, checkpoint)), run_dir)
    write_checkpoint(checkpoint, seed=1)
    assert main(["resume", str(run_dir), "--executor", "slurm"]) == 2
    err = capsys.readouterr().err
    assert f"the model changed since planning (checkpoint {checkpoint}" in err
    assert fake_slurm.scripts() == []


def test_resume_with_the_local_profile_runs_here_and_reduces(
    plan_tiny: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = plan_tiny(gradcam=False, first_n=4, images_per_shard=4, rise_masks=16, rise_batch=16)
    runner = ShardRunner(run_dir)
    first = _plan(run_dir).shards[0]
    runner.run(first.id)
    created = read_shard(RunDir(run_dir).shard(first.id)).attrs["created"]
    assert main(["resume", str(run_dir), "--profile", str(REPO / "jobs/clusters/local.yaml")]) == 0
    assert "ran 1 of 1 pending shard(s) locally" in capsys.readouterr().out
    assert RunDir(run_dir).committed() == {s.id for s in _plan(run_dir).shards}
    assert read_shard(RunDir(run_dir).shard(first.id)).attrs["created"] == created
    assert (run_dir / "results.h5").is_file()


# ----------------------------------------------------------------------- status
def test_parse_sacct_expands_array_ranges() -> None:
    text = "12_0|COMPLETED\n12_[1-3,5%2]|PENDING\n13|CANCELLED by 0\n12_4|RUNNING\n14_7|\nnoise\n"
    assert parse_sacct(text) == {
        "12_0": "COMPLETED", "12_1": "PENDING", "12_2": "PENDING", "12_3": "PENDING", "12_5": "PENDING",
        "13": "CANCELLED", "12_4": "RUNNING", "14_7": "UNKNOWN",
    }


def test_status_reads_files_first_and_asks_sacct_once(fake_slurm: FakeSlurm, plan_tiny: Callable[..., Path]) -> None:
    run_dir = plan_tiny()
    plan = _plan(run_dir)
    launch_run(run_dir, cluster_profile(shards_per_task=2))
    explain = read_submissions(run_dir)[0]
    for shard_id in explain.tasks[0]:
        _touch(RunDir(run_dir).shard(shard_id))
    fake_slurm.answer(["1_0|COMPLETED", "1_1|RUNNING", "1_2|CANCELLED by 0", "2_[0-1%2]|PENDING", "3|PENDING"])
    status = run_status(run_dir)
    assert status.done == set(explain.tasks[0])
    assert status.running == set(explain.tasks[1]) | {s.id for s in plan.stage("score")}
    assert status.pending == set(explain.tasks[2])
    assert len(fake_slurm.calls("sacct")) == 1
    assert "-j 1,2,3" in fake_slurm.calls("sacct")[0]
    assert f"job 1_2 (explain) CANCELLED; 2 shard(s) not committed; log {run_dir / 'slurm' / '1_2_0_log.err'}" in (
        status.scheduler_note or "")


@pytest.mark.parametrize("broken", ["failing", "missing"])
def test_status_without_a_working_sacct_still_counts_committed_shards(
    fake_slurm: FakeSlurm, plan_tiny: Callable[..., Path], broken: str, monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    run_dir = plan_tiny()
    plan = _plan(run_dir)
    launch_run(run_dir, cluster_profile())
    for shard in plan.stage("explain")[:3]:
        _touch(RunDir(run_dir).shard(shard.id))
    if broken == "failing":
        fake_slurm.fail_sacct()
    else:
        empty = tmp_path / "empty-bin"
        empty.mkdir()
        monkeypatch.setenv("PATH", str(empty))
    assert main(["status", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "  explain  done      3  running      0  pending      3  failed      0" in out
    assert "  score    done      0  running      0  pending      4  failed      0" in out
    note = "sacct failed (exit 1): sacct: error: Problem talking" if broken == "failing" else "sacct is not available"
    assert f"scheduler: {note}" in out and "counted as pending" in out


def test_cancel_asks_scancel_for_the_active_jobs_only(fake_slurm: FakeSlurm, plan_tiny: Callable[..., Path]) -> None:
    run_dir = plan_tiny()
    launch_run(run_dir, cluster_profile())
    fake_slurm.answer(["1_0|COMPLETED", "1_1|COMPLETED", "1_2|COMPLETED", "2_0|RUNNING", "2_1|PENDING", "3|PENDING"])
    assert main(["cancel", str(run_dir)]) == 0
    assert fake_slurm.calls("scancel") == ["2 3"]
    fake_slurm.fail_sacct()
    assert main(["cancel", str(run_dir)]) == 0
    assert fake_slurm.calls("scancel")[-1] == "1 2 3"


# --------------------------------------------------------------- the job itself
@pytest.fixture
def in_job(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Path, str, str], Path]]:
    """``in_job(folder, array, task)``: make submitit believe this process is that array task; returns
    its stderr log path. The SIGUSR2 handler (a job ignores it once done) is restored afterwards."""
    previous = signal.getsignal(signal.SIGUSR2)

    def enter(folder: Path, array: str, task: str) -> Path:
        for name, value in (("SUBMITIT_EXECUTOR", "slurm"), ("SUBMITIT_FOLDER", str(folder)), ("SLURM_JOB_ID", "99"),
                            ("SLURM_ARRAY_JOB_ID", array), ("SLURM_ARRAY_TASK_ID", task)):
            monkeypatch.setenv(name, value)
        return folder / f"{array}_{task}_0_log.err"

    yield enter
    signal.signal(signal.SIGUSR2, previous)


def test_job_records_failures_with_the_log_and_fails_only_for_non_data_errors(
    plan_tiny: Callable[..., Path], tree_copy: ImageTree, monkeypatch: pytest.MonkeyPatch,
    in_job: Callable[[Path, str, str], Path], capsys: pytest.CaptureFixture[str],
) -> None:
    run_dir = plan_tiny(root=tree_copy.root)
    plan = _plan(run_dir)
    runner = ShardRunner(run_dir)
    for shard in plan.stage("explain"):
        if shard.method == "gradcam":
            runner.run(shard.id)
    scores = [s for s in plan.stage("score") if s.method == "gradcam"]  # one per image chunk
    plan.records[scores[0].images[0]].path.write_bytes(b"no longer an image")  # bad data for the first chunk
    log = in_job(run_dir / "slurm", "7", "3")
    summary = ShardJob(run_dir, [scores[0].id, scores[1].id])()
    assert signal.getsignal(signal.SIGUSR2) == signal.SIG_IGN  # a late timeout signal cannot fail the done job
    assert summary["failed_data"] == [scores[0].id]
    assert not RunDir(run_dir).shard(scores[0].id).exists() and RunDir(run_dir).shard(scores[1].id).is_file()
    record = RunDir(run_dir).read_error(scores[0].id)
    assert (record["kind"], record["log"]) == ("data", str(log))
    assert main(["status", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert f"failed {scores[0].describe()}: [data]" in out and f"(log: {log})" in out

    original = Rise.group_sums

    def failing_on_the_first_samples(self: Rise, images: torch.Tensor, targets: torch.Tensor, start: int,
                                     stop: int, constants: dict[str, torch.Tensor]) -> Any:
        if start == 0:
            raise RuntimeError("CUDA error: an illegal memory access")
        return original(self, images, targets, start, stop, constants)

    monkeypatch.setattr(Rise, "group_sums", failing_on_the_first_samples)
    rise = [s for s in plan.stage("explain") if s.method == "rise" and s.images == scores[1].images]
    assert [s.samples for s in rise] == [(0, 16), (16, 32)]
    with pytest.raises(ShardJobError, match=f"1 shard\\(s\\) failed: {rise[0].id}"):
        ShardJob(run_dir, [rise[0].id, rise[1].id])()
    assert RunDir(run_dir).shard(rise[1].id).is_file()  # the job went on after the failure
    record = RunDir(run_dir).read_error(rise[0].id)
    assert record["kind"] == "error" and "illegal memory access" in record["message"] and record["log"] == str(log)
    assert "Traceback" in capsys.readouterr().err


def test_checkpoint_saves_progress_and_the_requeued_job_ends_like_an_uninterrupted_run(
    plan_tiny: Callable[..., Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    options = {"gradcam": False, "first_n": 2, "images_per_shard": 2, "samples_per_shard": 32, "rise_masks": 32,
               "rise_batch": 16}
    run_dir = plan_tiny("interrupted", **options)
    reference = plan_tiny("uninterrupted", **options)
    shard = _plan(run_dir).stage("explain")[0]  # one RISE shard, walked in 4 forwards of 2 images x 8 masks
    ShardRunner(reference).run(shard.id)
    job = ShardJob(run_dir, [shard.id], max_requeues=1)
    calls: list[tuple[int, int]] = []
    requeued = []
    original = Rise.group_sums

    def signalled_at_third_step(self: Rise, images: torch.Tensor, targets: torch.Tensor, start: int, stop: int,
                                constants: dict[str, torch.Tensor]) -> Any:
        calls.append((start, stop))
        if len(calls) == 3:
            requeued.append(job.checkpoint())  # what submitit does on the timeout signal ...
            raise SystemExit(-1)  # ... before it exits
        return original(self, images, targets, start, stop, constants)

    monkeypatch.setattr(Rise, "group_sums", signalled_at_third_step)
    with pytest.raises(SystemExit):
        job()
    assert not RunDir(run_dir).shard(shard.id).exists()
    assert read_shard(RunDir(run_dir).checkpoint(shard.id)).attrs["next_sample"] == 16
    requeued[0].dump(tmp_path / "requeued.pkl")  # as submitit stores it for the requeued job
    delayed = type(requeued[0]).load(tmp_path / "requeued.pkl")
    follow_up = delayed.function
    assert isinstance(follow_up, ShardJob)
    assert (follow_up.shard_ids, follow_up.requeues, follow_up.run_dir) == ([shard.id], 1, str(run_dir))

    def counting(self: Rise, images: torch.Tensor, targets: torch.Tensor, start: int, stop: int,
                 constants: dict[str, torch.Tensor]) -> Any:
        calls.append((start, stop))
        return original(self, images, targets, start, stop, constants)

    calls.clear()
    monkeypatch.setattr(Rise, "group_sums", counting)
    delayed.result()
    assert calls == [(16, 24), (24, 32)]
    assert not RunDir(run_dir).checkpoint(shard.id).exists()
    resumed, uninterrupted = read_shard(RunDir(run_dir).shard(shard.id)), read_shard(RunDir(reference).shard(shard.id))
    assert resumed.keys == uninterrupted.keys
    assert resumed.sums.keys() == uninterrupted.sums.keys() and resumed.sums
    for name in uninterrupted.sums:
        np.testing.assert_array_equal(resumed.sums[name], uninterrupted.sums[name])
    for name in uninterrupted.constants:
        np.testing.assert_array_equal(resumed.constants[name], uninterrupted.constants[name])
    assert follow_up.checkpoint() is None  # the requeue cap is reached


def test_job_skips_committed_shards_unless_forced(plan_tiny: Callable[..., Path]) -> None:
    run_dir = plan_tiny()
    first = _plan(run_dir).stage("explain")[0]
    ShardJob(run_dir, [first.id])()
    created = read_shard(RunDir(run_dir).shard(first.id)).attrs["created"]
    ShardJob(run_dir, [first.id])()
    assert read_shard(RunDir(run_dir).shard(first.id)).attrs["created"] == created
    ShardJob(run_dir, [first.id], force=True)()
    assert read_shard(RunDir(run_dir).shard(first.id)).attrs["created"] > created


# ------------------------------------------------------------------------ scale
def test_a_plan_of_20000_shards_is_planned_submitted_and_shown_in_seconds(
    fake_slurm: FakeSlurm, image_tree: ImageTree, checkpoint: Path, tmp_path: Path
) -> None:
    from tests.launching.tiny import launch_config

    images = 10_000
    data = tmp_path / "many"
    (data / "img").mkdir(parents=True)
    shutil.copyfile(image_tree.root / CLASSES[0] / f"{CLASSES[0]}_00.png", data / "img" / "00000.png")
    rows = "".join(f"img/{i:05d}.png,{i % len(CLASSES)}\n" for i in range(images))
    (data / "images.csv").write_text("path,label\n" + rows)  # planning lists images, it does not open them
    raw = launch_config(image_tree.root, checkpoint, gradcam=True, images_per_shard=1)
    raw["data"] = {"manifest": str(data / "images.csv"), "image_size": 32}
    raw["methods"] = raw["methods"][:1]
    run_dir = tmp_path / "run"

    started = time.perf_counter()
    plan = plan_run(parse_config(raw), run_dir)
    planned = time.perf_counter()
    launch_run(run_dir, cluster_profile(shards_per_task=10, max_array_size=400))
    submitted = time.perf_counter()
    assert len(plan.shards) == 2 * images

    submissions = read_submissions(run_dir)
    assert [(s.stage, len(s.tasks)) for s in submissions] == [
        ("explain", 400), ("explain", 400), ("explain", 200), ("score", 400), ("score", 400), ("score", 200),
        ("reduce", 0)]
    assert len(fake_slurm.scripts()) == 7
    assert sorted(i for s in submissions for t in s.tasks for i in t) == sorted(s.id for s in plan.shards)
    first_array = [i for task in submissions[0].tasks for i in task]
    for shard_id in first_array:
        _touch(RunDir(run_dir).shard(shard_id))
    fake_slurm.answer(["1_[0-399]|COMPLETED", "2_[0-9]|RUNNING", "2_[10-399%2]|PENDING", "3_[0-199]|PENDING",
                       "4_[0-399]|PENDING", "5_[0-399]|PENDING", "6_[0-199]|PENDING", "7|PENDING"])
    shown = time.perf_counter()
    status = run_status(run_dir)
    text = status.describe()
    finished = time.perf_counter()
    assert len(status.done) == 4000 and len(status.running) == 16_000 and not status.pending
    assert "explain  done   4000  running   6000  pending      0" in text
    assert len(fake_slurm.calls("sacct")) == 1
    timings = {"plan": planned - started, "submit": submitted - planned, "status": finished - shown}
    assert timings["plan"] < 10 and timings["submit"] < 15 and timings["status"] < 5, timings
