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
from pipeline.launching.accounting import parse_sacct, read_jobs, read_submissions
from pipeline.launching.launch import LaunchError
from pipeline.launching.slurm import RunFailedError, ShardJob, ShardJobError, finish_run
from pipeline.methods.rise import Rise
from pipeline.planning import Plan
from pipeline.run_dir import RunDir
from pipeline.rundir import plan_run
from pipeline.status import run_status
from pipeline.store import read_shard
from pipeline.stages import ShardRunner
from tests.launching.conftest import FakeSlurm
from tests.launching.tiny import REPO, cluster_profile
from tests.tiny_experiment import CLASSES, ImageTree, mark_committed, write_checkpoint

GOLDEN = Path(__file__).parent / "golden" / "slurm-gpu.sbatch"
FINISH_GOLDEN = Path(__file__).parent / "golden" / "slurm-gpu-finish.sbatch"
GPU_PROFILE = REPO / "jobs" / "clusters" / "slurm-gpu.yaml"


def _normalized(script: str, run_dir: Path) -> str:
    return script.replace(str(run_dir), "{RUN_DIR}").replace(shlex.quote(sys.executable), "{PYTHON}")


def _write_profile(path: Path, **changes: Any) -> Path:
    path.write_text(yaml.safe_dump(cluster_profile(**changes).model_dump(mode="json")))
    return path


def _plan(run_dir: Path) -> Plan:
    return Plan.read(run_dir / "plan.json")




def _error_record(run_dir: Path, shard_id: str) -> dict[str, Any]:
    return json.loads(RunDir(run_dir).error(shard_id).read_text())


# ----------------------------------------------------------------- submission
def test_sbatch_script_of_the_gpu_profile_matches_the_golden_file(
    fake_slurm: FakeSlurm, plan_tiny: Callable[..., Path]
) -> None:
    run_dir = plan_tiny(images_per_shard=1)  # 36 explain shards: 5 tasks of 8 in one array
    launch_run(run_dir, load_profile(GPU_PROFILE))
    explain, score, finish = fake_slurm.scripts()
    assert _normalized(explain, run_dir) == GOLDEN.read_text()
    assert "#SBATCH --dependency=afterany:1\n" in score and "#SBATCH --array=0-2%3\n" in score  # 24 score shards
    assert _normalized(finish, run_dir) == FINISH_GOLDEN.read_text()  # a CPU job, after every array


def test_array_parallelism_holds_across_the_arrays_of_a_stage(
    fake_slurm: FakeSlurm, plan_tiny: Callable[..., Path]
) -> None:
    run_dir = plan_tiny(images_per_shard=1)  # 36 explain shards, 24 score shards
    launch_run(run_dir, cluster_profile(shards_per_task=1, max_array_size=10, array_parallelism=5))
    scripts = fake_slurm.scripts()
    arrays = [(s.stage, len(s.tasks), s.parallelism, s.depends_on) for s in read_submissions(run_dir)]
    assert arrays == [  # 5 tasks at a time in each stage: split among the arrays, then chained
        ("explain", 10, 2, ()), ("explain", 10, 1, ()), ("explain", 10, 1, ()), ("explain", 6, 1, ()),
        ("score", 10, 2, ("1", "2", "3", "4")), ("score", 10, 2, ("1", "2", "3", "4")),
        ("score", 4, 1, ("1", "2", "3", "4")), ("finish", 0, 0, tuple(str(i) for i in range(1, 8))),
    ]
    assert [line for s in scripts for line in s.splitlines() if line.startswith("#SBATCH --array")] == [
        "#SBATCH --array=0-9%2", "#SBATCH --array=0-9%1", "#SBATCH --array=0-9%1", "#SBATCH --array=0-5%1",
        "#SBATCH --array=0-9%2", "#SBATCH --array=0-9%2", "#SBATCH --array=0-3%1"]
    launch_run(run_dir := plan_tiny("many-arrays", images_per_shard=1), cluster_profile(
        shards_per_task=1, max_array_size=4, array_parallelism=3))
    explain = [s for s in read_submissions(run_dir) if s.stage == "explain"]
    assert [s.parallelism for s in explain] == [1] * 9  # 9 arrays, 3 lanes: array i waits for array i - 3
    assert [s.depends_on for s in explain] == [(), (), (), *[(explain[i - 3].job_id,) for i in range(3, 9)]]


def test_arrays_are_split_and_every_pending_shard_is_recorded_once(
    fake_slurm: FakeSlurm, plan_tiny: Callable[..., Path]
) -> None:
    run_dir = plan_tiny()  # 6 explain shards (2 gradcam chunks, 2 chunks x 2 rise sample ranges), 4 score shards
    profile = cluster_profile(shards_per_task=2, max_array_size=2, array_parallelism=1)
    result = launch_run(run_dir, profile)
    plan = _plan(run_dir)
    submissions = read_submissions(run_dir)
    assert [(s.job_id, s.stage, len(s.tasks), s.array) for s in submissions] == [
        ("1", "explain", 2, True), ("2", "explain", 1, False), ("3", "score", 2, True), ("4", "finish", 0, False),
    ]
    assert [s.depends_on for s in submissions] == [(), ("1",), ("1", "2"), ("1", "2", "3")]
    for stage in ("explain", "score"):
        recorded = [i for s in submissions if s.stage == stage for task in s.tasks for i in task]
        assert recorded == [s.id for s in plan.stage(stage)]
    assert all(len(task) <= 2 for s in submissions for task in s.tasks)
    scripts = fake_slurm.scripts()
    assert "#SBATCH --array=0-1%1\n" in scripts[0] and "--array" not in scripts[1]
    assert "#SBATCH --dependency=afterany:1:2\n" in scripts[2]
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
            "run_dir", "shard_ids", "force", "checkpoint_every_s", "timeouts", "preemptions", "max_timeouts",
            "max_preemptions"}


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
    mark_committed(run_dir, *(shard.id for shard in explain[:4]))
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
    mark_committed(run_dir, *explain.tasks[0])
    fake_slurm.answer(["1_0|COMPLETED", "1_1|RUNNING", "1_2|CANCELLED by 0", "2_[0-1%2]|PENDING", "3|PENDING"])
    status = run_status(run_dir)
    assert status.done == set(explain.tasks[0])
    assert status.running == set(explain.tasks[1])
    assert status.pending == {s.id for s in plan.stage("score")}
    assert set(status.pending_reasons.values()) == {"waiting on dependency"}
    assert set(status.failed) == set(explain.tasks[2])
    log = run_dir / "slurm" / "1_2_0_log.out"
    for record in status.failed.values():
        assert record == {"kind": "lost", "message": "task 1_2 ended CANCELLED without committing it", "log": str(log)}
    assert len(fake_slurm.calls("sacct")) == 1
    assert "-j 1,2,3" in fake_slurm.calls("sacct")[0]
    text = status.describe()
    assert "pending: 4 waiting on dependency" in text
    assert f"[lost] task 1_2 ended CANCELLED without committing it (log: {log})" in text
    assert "reduce: job 3 PENDING: it reduces when every shard is committed, else resubmits what failed" in text
    assert "xai-pipeline reduce" not in text


def test_status_states_held_requeued_waiting_on_input_and_superseded_submissions(
    fake_slurm: FakeSlurm, plan_tiny: Callable[..., Path]
) -> None:
    run_dir = plan_tiny()
    plan = _plan(run_dir)
    launch_run(run_dir, cluster_profile(shards_per_task=2))  # jobs 1 (explain, 3 tasks), 2 (score, 2 tasks), 3
    explain = read_submissions(run_dir)[0]
    mark_committed(run_dir, *explain.tasks[0], *explain.tasks[1])
    needing = [s.id for s in plan.stage("score") if set(s.after) & set(explain.tasks[2])]
    mark_committed(run_dir, *(s.id for s in plan.stage("score") if s.id not in needing))
    fake_slurm.answer(["1_[0-1]|COMPLETED", "1_2|CANCELLED by 0", "2_[0-1]|COMPLETED", "3|COMPLETED"])
    status = run_status(run_dir)
    assert set(status.failed) == set(explain.tasks[2])
    assert set(status.waiting) == set(needing) and needing
    assert all(set(inputs) <= set(explain.tasks[2]) for inputs in status.waiting.values())
    assert f"waiting {needing[0]}: on input" in status.describe()
    # an automatic retry resubmits the lost explain shards and the score shards waiting on them
    finish_run(str(run_dir), 1, 0)
    retry = read_submissions(run_dir)[3:]
    assert [(s.stage, s.round) for s in retry] == [("explain", 1), ("score", 1), ("finish", 1)]
    fake_slurm.answer(["1_[0-1]|COMPLETED", "1_2|CANCELLED by 0", "2_[0-1]|COMPLETED", "3|COMPLETED",
                       "4|REQUEUE_HOLD", "5|PENDING", "6|PENDING"])
    status = run_status(run_dir)
    assert status.failed == {} and status.waiting == {}  # the superseded cancelled task is no loss
    assert {status.pending_reasons[i] for i in explain.tasks[2]} == {"held"}
    assert {status.pending_reasons[i] for i in needing} == {"waiting on dependency"}
    assert "-j 4,5,6" in fake_slurm.calls("sacct")[-1]
    fake_slurm.answer(["4|REQUEUED", "5|PENDING", "6|PENDING"])
    assert {run_status(run_dir).pending_reasons[i] for i in explain.tasks[2]} == {"requeued"}


def test_status_json_and_watch_until_the_run_ends(
    fake_slurm: FakeSlurm, plan_tiny: Callable[..., Path], capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run_dir = plan_tiny()
    plan = _plan(run_dir)
    launch_run(run_dir, cluster_profile(shards_per_task=2))
    fake_slurm.answer(["1_[0-2]|RUNNING", "2_[0-1]|PENDING", "3|PENDING"])
    capsys.readouterr()
    assert main(["status", str(run_dir), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["stages"]["explain"] == {"done": 0, "running": 6, "pending": 0, "failed": 0, "waiting": 0}
    assert data["pending"] == {s.id: "waiting on dependency" for s in plan.stage("score")}
    assert data["finish_job"]["job_id"] == "3" and data["finish_job"]["active"] and data["active"]
    mark_committed(run_dir, *(s.id for s in plan.shards))
    RunDir(run_dir).results.touch()
    monkeypatch.setattr("pipeline.integrity.results_whole", lambda *args, **kwargs: True)  # as the finish job leaves it
    fake_slurm.answer(["1_[0-2]|COMPLETED", "2_[0-1]|COMPLETED", "3|COMPLETED"])
    assert main(["status", str(run_dir), "--watch", "--interval", "0.01"]) == 0
    assert f"finished: results in {RunDir(run_dir).results}" in capsys.readouterr().out


def test_status_of_a_large_run_imports_nothing_heavy_and_answers_within_a_second(
    fake_slurm: FakeSlurm, plan_tiny: Callable[..., Path]
) -> None:
    import subprocess

    heavy = ("torch", "h5py", "pandas", "submitit")
    code = "import sys, pipeline.planning; print(','.join(m for m in {heavy!r} if m in sys.modules))"
    planning = subprocess.run([sys.executable, "-c", code.format(heavy=heavy)], capture_output=True, text=True,
                              cwd=REPO, check=True).stdout.strip()
    if planning:
        pytest.skip(f"pipeline.planning itself still imports {planning} (until its move off torch)")
    code = ("import sys, time; t = time.perf_counter(); from pipeline.cli import main; main(['status', {run!r}]); "
            "print(f'{{time.perf_counter() - t}};' + ','.join(m for m in {heavy!r} if m in sys.modules))")
    run_dir = plan_tiny()
    done = subprocess.run([sys.executable, "-c", code.format(run=str(run_dir), heavy=heavy)], capture_output=True,
                          text=True, cwd=REPO, check=True)
    seconds, imported = done.stdout.splitlines()[-1].split(";")
    assert imported == "" and float(seconds) < 1.0, done.stdout


@pytest.mark.parametrize("broken", ["failing", "missing"])
def test_status_without_a_working_sacct_still_counts_committed_shards(
    fake_slurm: FakeSlurm, plan_tiny: Callable[..., Path], broken: str, monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    run_dir = plan_tiny()
    plan = _plan(run_dir)
    launch_run(run_dir, cluster_profile())
    mark_committed(run_dir, *(shard.id for shard in plan.stage("explain")[:3]))
    if broken == "failing":
        fake_slurm.fail_sacct()
    else:
        empty = tmp_path / "empty-bin"
        empty.mkdir()
        monkeypatch.setenv("PATH", str(empty))
    assert main(["status", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "  explain  done      3  running      0  pending      3  failed      0  waiting      0" in out
    assert "  score    done      0  running      0  pending      4  failed      0  waiting      0" in out
    note = "sacct failed (exit 1): sacct: error: Problem talking" if broken == "failing" else "sacct is not available"
    assert f"scheduler: {note}" in out and "counted as pending" in out


def test_cancel_asks_scancel_for_the_active_jobs_only(fake_slurm: FakeSlurm, plan_tiny: Callable[..., Path]) -> None:
    run_dir = plan_tiny()
    launch_run(run_dir, cluster_profile())
    fake_slurm.answer(["1_0|COMPLETED", "1_1|COMPLETED", "1_2|COMPLETED", "2_0|RUNNING", "2_1|PENDING", "3|PENDING"])
    assert main(["cancel", str(run_dir)]) == 0  # the finish job too
    assert fake_slurm.calls("scancel") == ["2 3"]
    fake_slurm.fail_sacct()
    assert main(["cancel", str(run_dir)]) == 0
    assert fake_slurm.calls("scancel")[-1] == "1 2 3"


# --------------------------------------------------------------- the job itself
@pytest.fixture
def in_job(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Path, str, str], Path]]:
    """``in_job(folder, array, task)``: make submitit believe this process is that array task; returns
    its stderr log path. The SIGUSR2, SIGTERM and SIGINT handlers (a job ignores them once done) are restored."""
    previous = {number: signal.getsignal(number) for number in (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)}

    def enter(folder: Path, array: str, task: str) -> Path:
        for name, value in (("SUBMITIT_EXECUTOR", "slurm"), ("SUBMITIT_FOLDER", str(folder)), ("SLURM_JOB_ID", "99"),
                            ("SLURM_ARRAY_JOB_ID", array), ("SLURM_ARRAY_TASK_ID", task)):
            monkeypatch.setenv(name, value)
        return folder / f"{array}_{task}_0_log.err"

    yield enter
    for number, handler in previous.items():
        signal.signal(number, handler)


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
    assert signal.getsignal(signal.SIGUSR2) == signal.SIG_IGN  # a late signal cannot fail the done job
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    assert summary["failed_data"] == [scores[0].id]
    assert not RunDir(run_dir).shard(scores[0].id).exists() and RunDir(run_dir).shard(scores[1].id).is_file()
    record = _error_record(run_dir, scores[0].id)
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
    record = _error_record(run_dir, rise[0].id)
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
    job = ShardJob(run_dir, [shard.id], max_timeouts=1)
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
    assert (follow_up.shard_ids, follow_up.timeouts, follow_up.run_dir) == ([shard.id], 1, str(run_dir))

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
    assert follow_up.checkpoint() is None  # max_timeouts is reached


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
        ("finish", 0)]
    assert len(fake_slurm.scripts()) == 7
    assert sorted(i for s in submissions for t in s.tasks for i in t) == sorted(s.id for s in plan.shards)
    first_array = [i for task in submissions[0].tasks for i in task]
    mark_committed(run_dir, *first_array)
    fake_slurm.answer(["1_[0-399]|COMPLETED", "2_[0-9]|RUNNING", "2_[10-399%2]|PENDING", "3_[0-199]|PENDING",
                       "4_[0-399]|PENDING", "5_[0-399]|PENDING", "6_[0-199]|PENDING", "7|PENDING"])
    shown = time.perf_counter()
    status = run_status(run_dir)
    text = status.describe()
    finished = time.perf_counter()
    assert len(status.done) == 4000 and len(status.running) == 100 and len(status.pending) == 15_900
    assert "explain  done   4000  running    100  pending   5900" in text
    assert len(fake_slurm.calls("sacct")) == 1
    timings = {"plan": planned - started, "submit": submitted - planned, "status": finished - shown}
    assert timings["plan"] < 10 and timings["submit"] < 15 and timings["status"] < 5, timings


# ------------------------------------------------- finish job: reduce, retry or fail
def test_finish_job_retries_what_can_succeed_then_lists_the_failures(
    fake_slurm: FakeSlurm, plan_tiny: Callable[..., Path]
) -> None:
    run_dir = plan_tiny()
    plan = _plan(run_dir)
    launch_run(run_dir, cluster_profile(shards_per_task=2, retries=1))  # jobs 1 (explain), 2 (score), 3 (finish)
    explain = read_submissions(run_dir)[0]
    lost, bad = explain.tasks[2][0], explain.tasks[1][0]
    bad_needs = [s.id for s in plan.stage("score") if bad in s.after]
    mark_committed(run_dir, *(i for i in {s.id for s in plan.shards} - {lost, bad} - {
        s.id for s in plan.stage("score") if {lost, bad} & set(s.after)}))
    RunDir(run_dir).record_error(bad, "DataError: image x.png cannot be read", kind="data")
    fake_slurm.answer(["1_[0-1]|COMPLETED", "1_2|CANCELLED by 0", "2_[0-1]|COMPLETED", "3|RUNNING"])
    message = finish_run(str(run_dir), 1, 0)
    assert message.startswith("retry 1 of 1: resubmitted")
    retry = read_submissions(run_dir)[3:]
    resubmitted = {i for s in retry for task in s.tasks for i in task}
    lost_needs = {s.id for s in plan.stage("score") if lost in s.after} - set(bad_needs)
    assert resubmitted == {lost} | lost_needs  # not the bad data, nor what needs it
    assert [(s.stage, s.round, s.launch) for s in retry] == [("explain", 1, 1), ("score", 1, 1), ("finish", 1, 1)]
    assert "#SBATCH --dependency=afterany:4:5\n" in fake_slurm.scripts()[-1]

    fake_slurm.answer(["4|TIMEOUT", "5|COMPLETED", "6|RUNNING"])  # the retry fails too: retries are spent
    with pytest.raises(RunFailedError) as caught:
        finish_run(str(run_dir), 1, 1)
    text = str(caught.value)
    assert text.startswith(f"{2 + len(bad_needs) + len(lost_needs)} shard(s) not committed after 1 retry")
    assert f"{lost}: task 4 ended TIMEOUT before committing it (log {run_dir / 'slurm' / '4_0_log.err'})" in text
    assert f"{bad}: bad data: DataError: image x.png cannot be read" in text
    assert f"{bad_needs[0]}: needs shard(s) with bad data: {bad}" in text
    outcome = read_jobs(run_dir)["outcome"]
    assert outcome["state"] == "failed" and set(outcome["failures"]) == {lost, bad, *bad_needs, *lost_needs}
    assert len(fake_slurm.scripts()) == 6
    fake_slurm.answer(["4|TIMEOUT", "5|COMPLETED", "6|FAILED"])
    status = run_status(run_dir)
    assert "the run ended with" in status.describe() and "after 1 automatic retry" in status.describe()


def test_finish_job_reduces_a_complete_run(plan_tiny: Callable[..., Path]) -> None:
    run_dir = plan_tiny(gradcam=False, first_n=2, images_per_shard=2, rise_masks=8, rise_batch=8,
                        samples_per_shard=8)
    runner = ShardRunner(run_dir)
    for shard in _plan(run_dir).shards:
        runner.run(shard.id)
    (run_dir / "jobs.json").write_text(json.dumps({"submissions": [], "profile": cluster_profile().model_dump()}))
    assert finish_run(str(run_dir), 1, 0) == f"reduced into {RunDir(run_dir).results}"
    assert read_jobs(run_dir)["outcome"]["state"] == "finished"


# ------------------------------------------------------------ submission failures
def test_max_array_size_over_the_clusters_is_refused_before_submitting(
    fake_slurm: FakeSlurm, plan_tiny: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = plan_tiny()
    fake_slurm.max_array_size(3)
    profile = _write_profile(tmp_path / "p.yaml", max_array_size=5, shards_per_task=1)
    assert main(["launch", str(run_dir), "--profile", str(profile)]) == 2
    err = capsys.readouterr().err
    assert "max_array_size (5) is over the cluster's MaxArraySize (3" in err and "at most 2 tasks" in err
    assert fake_slurm.scripts() == [] and not (run_dir / "jobs.json").exists()
    assert not (run_dir / "slurm").exists()
    launch_run(run_dir, cluster_profile(shards_per_task=1))  # by default, the cluster's limit is respected
    assert [len(s.tasks) for s in read_submissions(run_dir)] == [2, 2, 2, 2, 2, 0]


def test_an_sbatch_failure_names_the_field_and_leaves_the_run_folder_as_before(
    fake_slurm: FakeSlurm, plan_tiny: Callable[..., Path]
) -> None:
    run_dir = plan_tiny()
    launch_run(run_dir, cluster_profile(shards_per_task=2))
    before = {p.name: p.read_bytes() for p in (run_dir / "slurm").iterdir() if p.is_file()}
    jobs_before = (run_dir / "jobs.json").read_text()
    fake_slurm.answer(["1_[0-2]|CANCELLED", "2_[0-1]|CANCELLED", "3|CANCELLED"])
    fake_slurm.fail_sbatch(5, "sbatch: error: Batch job submission failed: Invalid job array specification")
    with pytest.raises(LaunchError) as caught:
        launch_run(run_dir, cluster_profile(shards_per_task=2), force=True)
    message = str(caught.value)
    assert "Invalid job array specification" in message and "check the profile's max_array_size" in message
    assert "the run folder is as before" in message
    assert fake_slurm.calls("scancel") == ["4"]  # the round's first array, accepted before the failure
    assert {p.name: p.read_bytes() for p in (run_dir / "slurm").iterdir() if p.is_file()} == before
    assert (run_dir / "jobs.json").read_text() == jobs_before


# -------------------------------------------------------------- signals and logs
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR2])
def test_every_signal_saves_progress_at_once_and_counts_timeouts_apart(
    plan_tiny: Callable[..., Path], monkeypatch: pytest.MonkeyPatch, in_job: Callable[[Path, str, str], Path],
    signum: signal.Signals, capsys: pytest.CaptureFixture[str],
) -> None:
    import os

    options = {"gradcam": False, "first_n": 2, "images_per_shard": 2, "samples_per_shard": 32, "rise_masks": 32,
               "rise_batch": 16}
    run_dir = plan_tiny(**options)
    shard = _plan(run_dir).stage("explain")[0]  # 4 forwards of 2 images x 8 masks
    in_job(run_dir / "slurm", "7", "0")
    requeued: list[Any] = []

    class SubmititHandler:  # what submitit installs for SIGUSR2 (its SignalHandler's bound method)
        def checkpoint_and_try_requeue(self, number: int, frame: Any) -> None:
            requeued.append(("requeue", job.checkpoint()))
            raise SystemExit(-1)

        def checkpoint_and_exit(self, number: int, frame: Any) -> None:
            requeued.append(("exit", job.checkpoint()))
            raise SystemExit(-1)

    signal.signal(signal.SIGUSR2, SubmititHandler().checkpoint_and_try_requeue)
    job = ShardJob(run_dir, [shard.id], checkpoint_every_s=3600, max_timeouts=0, max_preemptions=1)
    original = Rise.group_sums
    calls: list[int] = []

    def signalled_at_third_step(self: Rise, images: torch.Tensor, targets: torch.Tensor, start: int, stop: int,
                                constants: dict[str, torch.Tensor]) -> Any:
        calls.append(start)
        if len(calls) == 3:
            os.kill(os.getpid(), signum)
        return original(self, images, targets, start, stop, constants)

    monkeypatch.setattr(Rise, "group_sums", signalled_at_third_step)
    monkeypatch.setattr("pipeline.launching.slurm._job_log", lambda: str(run_dir / "slurm" / "7_0_0_log.err"))
    with pytest.raises(SystemExit):
        job()
    assert read_shard(RunDir(run_dir).checkpoint(shard.id)).attrs["next_sample"] == 16
    how, delayed = requeued[0]
    assert how == ("requeue" if signum == signal.SIGUSR2 else "exit")  # SLURM requeues on SIGTERM itself
    follow_up = delayed.function if delayed is not None else None
    if signum == signal.SIGUSR2:  # a timeout, and max_timeouts is 0
        assert follow_up is None
        assert "not requeued: timeout 1 is over the profile's max_timeouts (0)" in capsys.readouterr().err
    else:
        assert (follow_up.timeouts, follow_up.preemptions) == (0, 1)
        assert "requeued after a preemption (timeouts 0/0, preemptions 1/1)" in capsys.readouterr().out


def test_logs_prints_the_section_of_the_shards_last_attempt(
    fake_slurm: FakeSlurm, plan_tiny: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = plan_tiny()
    launch_run(run_dir, cluster_profile(shards_per_task=2))
    first = read_submissions(run_dir)[0]
    a, b = first.tasks[0]
    first.log(0, "out").write_text(f"starting shard {a} (old)\nold attempt\nstarting shard {a} (x)\ncontinuing {a}\n"
                                   f"committed {a}\nstarting shard {b} (y)\nother\n")
    first.log(0, "err").write_text(f"starting shard {a} (x)\nTraceback (most recent call last):\nRuntimeError: boom\n"
                                   f"starting shard {b} (y)\n")
    capsys.readouterr()
    assert main(["logs", str(run_dir), a]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [f"==> {first.log(0, 'out')} <==", f"starting shard {a} (x)", f"continuing {a}", f"committed {a}",
                   f"==> {first.log(0, 'err')} <==", f"starting shard {a} (x)",
                   "Traceback (most recent call last):", "RuntimeError: boom"]
    assert main(["logs", str(run_dir), "nope"]) == 2
    assert "was never submitted" in capsys.readouterr().err
