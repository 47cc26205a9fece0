"""Against a real SLURM cluster (``sudo tests/cluster/local-slurm.sh start``); skipped when none answers.

A tiny experiment (Grad-CAM and RISE on 12 images, insertion and deletion) is run
as SLURM arrays and compared with the same plan run locally: a whole run; a run
with one explain task cancelled, whose unaffected score shards still run and which
the finish job completes by an automatic retry; a run whose score shard is killed
while its file is being written, retried automatically; a RISE shard hitting a
one-minute time limit, requeued, finishing from its saved progress; a RISE shard
requeued with ``scontrol requeue`` (SIGTERM) mid-step, saving its progress at once;
a launch stopped by the pre-flight checks; and status when ``sacct`` fails or is
missing. The slow scenarios are submitted before the others and run beside them.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import h5py
import numpy as np
import pytest
import yaml

from pipeline.cli import main
from pipeline.config import parse_config
from pipeline.launching import run_local
from pipeline.planning import Plan
from pipeline.stages import reduce_run
from pipeline.run_dir import RunDir
from pipeline.rundir import plan_run
from pipeline.store import read_shard
from pipeline.stages import ShardRunner
from tests.launching.tiny import SLOW_ENV, STALL_ENV, cluster_profile, launch_config, sleeping_marker, stall_marker
from tests.tiny_experiment import ImageTree

WAIT_S = 240.0


def _cluster_problem() -> str | None:
    """Why no SLURM cluster can be used here (None when sinfo and sacct answer)."""
    for command in (["sinfo", "-h", "-o", "%P %a"], ["sacct", "-n", "-X", "-o", "JobID", "-S", "now"]):
        if shutil.which(command[0]) is None:
            return f"{command[0]} is not on PATH (start the test cluster: sudo tests/cluster/local-slurm.sh start)"
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=20)
        except subprocess.TimeoutExpired:
            return f"`{' '.join(command)}` did not answer within 20 s"
        if done.returncode != 0:
            return f"`{' '.join(command)}` failed: {(done.stderr or done.stdout).strip()[:200]}"
        if command[0] == "sinfo" and not re.search(r"^debug\*? up$", done.stdout, re.MULTILINE):
            return "SLURM answers but has no partition 'debug' up (these tests expect tests/cluster/local-slurm.sh)"
    return None


PROBLEM = _cluster_problem()
pytestmark = [pytest.mark.slurm, pytest.mark.skipif(PROBLEM is not None, reason=f"no SLURM cluster: {PROBLEM}")]


# ---------------------------------------------------------------------- helpers
def _jobs(run_dir: Path) -> list[dict[str, Any]]:
    return json.loads((run_dir / "jobs.json").read_text())["submissions"]


def _queued(run_dir: Path) -> list[str]:
    """The run's recorded jobs that squeue still lists."""
    ours = {s["job_id"] for s in _jobs(run_dir)}
    listed = subprocess.run(["squeue", "-h", "-o", "%F %i %T"], capture_output=True, text=True, check=True).stdout
    return [line for line in listed.splitlines() if line.split()[0] in ours]


def _diagnosis(run_dir: Path) -> str:
    logs = sorted((run_dir / "slurm").glob("*_log.err"))
    tails = "\n".join(f"--- {p.name}\n" + "\n".join(p.read_text().splitlines()[-8:]) for p in logs[-4:])
    return f"queued: {_queued(run_dir)}\n{tails}"


def _wait_until(condition: Callable[[], bool], what: str, run_dir: Path, timeout: float = WAIT_S) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{_diagnosis(run_dir)}")
        time.sleep(0.5)


def _wait_idle(run_dir: Path) -> None:
    _wait_until(lambda: not _queued(run_dir), "the run's jobs to leave the queue", run_dir)


def _state(task_id: str) -> str:
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "State", "-j", task_id],
                         capture_output=True, text=True, check=True).stdout.split()
    return out[0] if out else ""


def _task_of(run_dir: Path, shard_id: str) -> str:
    """The scheduler id of the (last) task that got ``shard_id``, read from jobs.json."""
    for submission in reversed(_jobs(run_dir)):
        for index, task in enumerate(submission["tasks"]):
            if shard_id in task:
                return f"{submission['job_id']}_{index}" if submission["array"] else submission["job_id"]
    raise AssertionError(f"{shard_id} was not submitted")


def _datasets(path: Path) -> dict[str, np.ndarray]:
    found: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, item: found.__setitem__(name, item[()]) if isinstance(item, h5py.Dataset) else None)
    return found


def _assert_same_results(run_dir: Path, reference: Path) -> None:
    got, expected = _datasets(run_dir / "results.h5"), _datasets(reference / "results.h5")
    assert got.keys() == expected.keys()
    assert any(name.startswith("maps/rise") for name in got) and any(name.startswith("curves/") for name in got)
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)


def _status(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    assert main(["status", str(run_dir)]) == 0
    return capsys.readouterr().out


@dataclasses.dataclass(frozen=True)
class Experiment:
    folder: Path
    config: dict[str, Any]

    def config_file(self, name: str = "experiment.yaml", config: dict[str, Any] | None = None) -> Path:
        path = self.folder / name
        path.write_text(yaml.safe_dump(config or self.config, sort_keys=False))
        return path

    def plan(self, name: str, config: dict[str, Any] | None = None, *, check: bool = True) -> Path:
        run_dir = self.folder / name
        plan_run(parse_config(config or self.config), run_dir, check=check)
        return run_dir

    def profile(self, name: str, **changes: Any) -> Path:
        path = self.folder / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cluster_profile(**changes).model_dump(mode="json")))
        return path


# --------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def experiment(tmp_path_factory: pytest.TempPathFactory, image_tree: ImageTree, checkpoint: Path) -> Experiment:
    return Experiment(tmp_path_factory.mktemp("cluster"), launch_config(image_tree.root, checkpoint))


TIMEOUT_OPTIONS = {"gradcam": False, "first_n": 2, "images_per_shard": 2, "rise_masks": 48, "rise_batch": 2,
                   "samples_per_shard": 48}


@pytest.fixture(scope="module", autouse=True)
def timeout_run(experiment: Experiment, image_tree: ImageTree, checkpoint: Path) -> Iterator[Path]:
    """A RISE shard of 6 steps of 8 forwards of one second each, with a one-minute time limit,
    submitted first so that it runs while the other scenarios do."""
    config = launch_config(image_tree.root, checkpoint, **TIMEOUT_OPTIONS)
    run_dir = experiment.plan("timeout", config)
    slow = experiment.folder / "timeout-slow.txt"
    slow.write_text("1.0")
    profile = experiment.profile("timeout", env={SLOW_ENV: str(slow)}, time=1, signal_delay_s=10, max_timeouts=6,
                                 checkpoint_every_s=3600)
    assert main(["launch", str(run_dir), "--profile", str(profile)]) == 0
    yield run_dir
    subprocess.run(["scancel", *{s["job_id"] for s in _jobs(run_dir)}], capture_output=True)


@pytest.fixture(scope="module", autouse=True)
def sigterm_run(experiment: Experiment, image_tree: ImageTree, checkpoint: Path) -> Iterator[Path]:
    """A RISE shard of forwards of one second each, requeued by `scontrol requeue` once it has
    run for 13 s (mid-step: SIGTERM, as preemption sends), submitted first to run beside the others."""
    config = launch_config(image_tree.root, checkpoint, **TIMEOUT_OPTIONS)
    run_dir = experiment.plan("sigterm", config)
    slow = experiment.folder / "sigterm-slow.txt"
    slow.write_text("1.0")
    profile = experiment.profile("sigterm", env={SLOW_ENV: str(slow)}, time=10, checkpoint_every_s=3600)
    assert main(["launch", str(run_dir), "--profile", str(profile)]) == 0
    shard = Plan.read(run_dir / "plan.json").stage("explain")[0]
    task = _task_of(run_dir, shard.id)
    _wait_until(sleeping_marker(slow, "0").is_file, "the RISE shard to start", run_dir)
    time.sleep(13)  # the first forward, then the first step of 8 forwards: inside the second step
    subprocess.run(["scontrol", "requeue", task], check=True)
    yield run_dir
    subprocess.run(["scancel", *{s["job_id"] for s in _jobs(run_dir)}], capture_output=True)


@pytest.fixture(scope="module")
def reference(experiment: Experiment) -> Path:
    """The experiment run locally, in this process."""
    run_dir = experiment.plan("reference")
    assert run_local(run_dir, progress=False) == {}
    reduce_run(run_dir, progress=False)
    return run_dir


@pytest.fixture(scope="module")
def cluster_launch(experiment: Experiment) -> Path:
    """The experiment submitted to the cluster with `xai-pipeline run --profile`."""
    run_dir = experiment.folder / "cluster"
    assert main(["run", str(experiment.config_file()), "--out", str(run_dir),
                 "--profile", str(experiment.profile("basic", shards_per_task=3))]) == 0
    return run_dir


@pytest.fixture(scope="module")
def cluster_run(cluster_launch: Path, reference: Path) -> Path:
    """The submitted experiment, finished (the local reference is computed while its jobs run)."""
    _wait_idle(cluster_launch)
    return cluster_launch


# ------------------------------------------------------------------------ tests
def test_small_plan_runs_as_arrays_and_matches_a_local_run(
    cluster_run: Path, reference: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    submissions = _jobs(cluster_run)
    assert [(s["stage"], s["array"], len(s["tasks"])) for s in submissions] == [
        ("explain", True, 2), ("score", True, 2), ("finish", False, 0)]
    assert [_state(s["job_id"] + ("_0" if s["array"] else "")) for s in submissions] == ["COMPLETED"] * 3
    _assert_same_results(cluster_run, reference)
    assert f"finished: results in {cluster_run / 'results.h5'}" in _status(cluster_run, capsys)


def test_cancelled_explain_task_costs_only_its_score_shards_and_the_retry_finishes_the_run(
    experiment: Experiment, reference: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = experiment.plan("cancelled")
    slow = experiment.folder / "cancel-slow.txt"
    slow.write_text("30")  # seconds per forward: longer than SLURM's KillWait (5 s)
    profile = experiment.profile("cancel", env={SLOW_ENV: str(slow)}, shards_per_task=2)
    assert main(["launch", str(run_dir), "--profile", str(profile)]) == 0
    explain = _jobs(run_dir)[0]
    victim = f"{explain['job_id']}_1"  # the task with the first two RISE shards
    # cancel it inside a forward: submitit lets a step outlive SIGTERM until KillWait, and the
    # sleep outlasts that, so the task is killed before it commits its shards
    _wait_until(sleeping_marker(slow, "1").is_file, f"task {victim} to start its work", run_dir)
    subprocess.run(["scancel", victim], check=True)
    slow.unlink()  # the other tasks need not be slow any more
    _wait_idle(run_dir)

    plan = Plan.read(run_dir / "plan.json")
    jobs = _jobs(run_dir)
    assert [(s["stage"], s["round"]) for s in jobs] == [
        ("explain", 0), ("score", 0), ("finish", 0), ("explain", 1), ("score", 1), ("finish", 1)]
    lost = set(explain["tasks"][1])
    retried = {i for s in jobs[3:5] for task in s["tasks"] for i in task}
    needing = {s.id for s in plan.stage("score") if lost & set(s.after)}
    assert retried == lost | needing  # the unaffected score shards ran in the first round
    assert [_state(s["job_id"]) for s in jobs[2::3]] == ["COMPLETED", "COMPLETED"]
    _assert_same_results(run_dir, reference)
    out = _status(run_dir, capsys)
    assert "failed      0  waiting      0" in out and f"finished: results in {run_dir / 'results.h5'}" in out


def test_shard_killed_while_writing_leaves_no_file_and_the_retry_redoes_only_it(
    experiment: Experiment, reference: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = experiment.plan("killed")
    plan = Plan.read(run_dir / "plan.json")
    victim = plan.stage("score")[-1].id
    monkeypatch.setenv(STALL_ENV, victim)
    assert main(["launch", str(run_dir), "--profile", str(experiment.profile("kill", shards_per_task=3))]) == 0
    monkeypatch.delenv(STALL_ENV)
    _wait_until(stall_marker(run_dir, victim).is_file, f"shard {victim} to stall in its commit", run_dir)
    others = [s.id for s in plan.shards if s.id != victim]
    _wait_until(lambda: all(RunDir(run_dir).shard(i).is_file() for i in others), "the other shards", run_dir)
    written = {i: RunDir(run_dir).shard(i).stat().st_mtime_ns for i in others}
    subprocess.run(["scancel", _task_of(run_dir, victim)], check=True)
    _wait_idle(run_dir)

    assert list(RunDir(run_dir).shard(victim).parent.glob(f".{victim}.h5.tmp-*")), "the killed write left its file"
    retried = [(s["stage"], s["tasks"]) for s in _jobs(run_dir)[3:]]
    assert retried == [("score", [[victim]]), ("finish", [])]
    assert {i: RunDir(run_dir).shard(i).stat().st_mtime_ns for i in others} == written
    _assert_same_results(run_dir, reference)


def test_preflight_failure_stops_the_launch_before_anything_is_submitted(
    experiment: Experiment, capsys: pytest.CaptureFixture[str]
) -> None:
    config = {**experiment.config, "methods": [{"name": "gradcam", "layers": ["layer9"]}]}
    run_dir = experiment.plan("wrong-layer", config, check=False)
    name = f"xai-preflight-{os.getpid()}-{time.time_ns()}"
    assert main(["launch", str(run_dir), "--profile", str(experiment.profile("preflight", job_name=name))]) == 2
    err = capsys.readouterr().err
    assert "pre-flight check failed, nothing was started" in err and "'layer9'" in err
    assert not (run_dir / "jobs.json").exists()
    for command in (["squeue", "-h", "-n", name], ["sacct", "-n", "-X", "--name", name]):
        assert subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip() == ""


@pytest.mark.parametrize("sacct", ["failing", "missing"])
def test_status_without_sacct_still_reports_committed_and_missing_shards(
    cluster_run: Path, sacct: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(cluster_run, run_dir)
    plan = Plan.read(run_dir / "plan.json")
    (run_dir / "results.h5").unlink()
    RunDir(run_dir).shard(plan.stage("explain")[0].id).unlink()
    RunDir(run_dir).shard(plan.stage("score")[-1].id).unlink()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if sacct == "failing":
        fake = bin_dir / "sacct"
        fake.write_text("#!/bin/sh\necho 'sacct: error: slurmdbd: connection refused' >&2\nexit 1\n")
        fake.chmod(0o755)
        monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    else:
        monkeypatch.setenv("PATH", str(bin_dir))
    out = _status(run_dir, capsys)
    assert "explain  done      5  running      0  pending      1  failed      0" in out
    assert "score    done      3  running      0  pending      1  failed      0" in out
    expected = "sacct failed (exit 1): sacct: error: slurmdbd" if sacct == "failing" else "sacct is not available"
    assert f"scheduler: {expected}" in out


def _assert_same_as_uninterrupted(run_dir: Path, shard_id: str, uninterrupted: Path) -> None:
    """The sums of ``shard_id`` in ``run_dir`` equal those of the same shard run here without interruption."""
    ShardRunner(uninterrupted).run(shard_id)
    resumed, expected = read_shard(RunDir(run_dir).shard(shard_id)), read_shard(RunDir(uninterrupted).shard(shard_id))
    assert resumed.keys == expected.keys and expected.sums
    for name in expected.sums:
        np.testing.assert_array_equal(resumed.sums[name], expected.sums[name])


def test_timeout_requeues_the_shard_and_it_finishes_from_its_saved_progress(
    timeout_run: Path, experiment: Experiment, image_tree: ImageTree, checkpoint: Path
) -> None:
    shard = Plan.read(timeout_run / "plan.json").stage("explain")[0]
    task = _task_of(timeout_run, shard.id)
    _wait_until(RunDir(timeout_run).shard(shard.id).is_file, "the slow shard to commit", timeout_run, timeout=300)
    (experiment.folder / "timeout-slow.txt").unlink()  # the score and reduce jobs need not be slow
    log = (timeout_run / "slurm" / f"{task}_0_log.out").read_text()
    assert f"continuing {shard.id} from its saved progress" in log
    requeues = subprocess.run(["sacct", "-n", "-X", "-P", "--duplicates", "-o", "State", "-j", task],
                              capture_output=True, text=True, check=True).stdout.split()
    assert "REQUEUED" in requeues and "TIMEOUT" not in requeues, requeues
    assert not RunDir(timeout_run).checkpoint(shard.id).exists()

    _assert_same_as_uninterrupted(timeout_run, shard.id, experiment.plan(
        "timeout-local", launch_config(image_tree.root, checkpoint, **TIMEOUT_OPTIONS)))
    _wait_idle(timeout_run)
    assert (timeout_run / "results.h5").is_file()


def test_scontrol_requeue_mid_step_saves_progress_at_once_and_the_shard_ends_identical(
    sigterm_run: Path, experiment: Experiment, image_tree: ImageTree, checkpoint: Path
) -> None:
    shard = Plan.read(sigterm_run / "plan.json").stage("explain")[0]
    task = _task_of(sigterm_run, shard.id)
    _wait_until(RunDir(sigterm_run).shard(shard.id).is_file, "the requeued shard to commit", sigterm_run, timeout=300)
    (experiment.folder / "sigterm-slow.txt").unlink()
    log = (sigterm_run / "slurm" / f"{task}_0_log.out").read_text()
    assert "caught SIGTERM: saving progress (preemption)" in log
    assert f"continuing {shard.id} from its saved progress" in log
    _assert_same_as_uninterrupted(sigterm_run, shard.id, experiment.plan(
        "sigterm-local", launch_config(image_tree.root, checkpoint, **TIMEOUT_OPTIONS)))
    _wait_idle(sigterm_run)
    assert (sigterm_run / "results.h5").is_file()
