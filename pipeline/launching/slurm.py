"""The SLURM executor: pending shards go to SLURM as job arrays through submitit.

A submission round (:func:`submit_round`) is the explain arrays, the score arrays
and one small CPU job, the *finish job* (:func:`finish_run`):

- Score arrays start after the explain arrays have ended, however they ended
  (``afterany``); a score shard whose explain shards are not all committed is
  skipped as *waiting on input*, so one lost explain task costs only the score
  shards that need it.
- The finish job starts after every array of its round has ended (``afterany``).
  When every shard is committed it reduces the run. Otherwise it resubmits the
  shards that can still succeed (every missing shard but those with bad data and
  the score shards that need them) as a new round, followed by a new finish job,
  while the profile's ``retries`` last; then it records the failures and why in
  ``jobs.json`` (``outcome``) and ends failed. It runs with the profile's
  ``cpu_job`` resources (no GPU by default).
- ``array_parallelism`` holds across all arrays of a stage: the limit is split
  among the arrays, and when there are more arrays than the limit, array ``i``
  waits for array ``i - limit`` (each running one task at a time).
- ``max_array_size`` defaults to the cluster's MaxArraySize - 1 (``scontrol show
  config``); a larger value is refused before anything is submitted. When ``sbatch``
  refuses a submission, the jobs of the round already submitted are cancelled and
  the run folder is left as before (``jobs.json`` and ``RUN_DIR/slurm``), and the
  message names the profile field at fault.

A job receives only the run folder and its shard ids (:class:`ShardJob`): it builds
one :class:`~pipeline.worker.ShardRunner` and runs them in order, decoding the images of the
next ones ahead (:mod:`pipeline.stages.prefetch`). SIGUSR2 (sent
``signal_delay_s`` before the time limit), SIGTERM (``scontrol requeue``,
preemption) and SIGINT all save the running sums of the shard in progress at once
and leave the job to requeue with the shards it has not finished (SIGUSR2: the job
requeues itself; SIGTERM: SLURM requeues a requeued or preempted job, and a job
cancelled with ``scancel`` stays cancelled, its progress kept for a retry). Timeouts and preemptions
are counted separately (``max_timeouts``, ``max_preemptions``). A shard that fails
on bad data (``ShardError`` of kind ``data``) is recorded and not retried; any
other failure is recorded, the job's other shards still run, and the job ends
failed. Logs are submitit's ``RUN_DIR/slurm/<job>_<task>_0_log.{out,err}``: ``.out``
has a ``starting <shard id>`` line before each shard, its outcome and requeue
messages; ``.err`` the tracebacks, after the same ``starting`` line.

The records (``jobs.json``) and the scheduler's answers are in
:mod:`pipeline.launching.accounting`.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from types import FrameType
from typing import Any, Sequence

import submitit
from submitit.core.utils import FailedJobError, UncompletedJobError
from submitit.helpers import Checkpointable, DelayedSubmission

from ..errors import PipelineError
from ..run_dir import RunDir
from .accounting import (
    SCHEDULER_CALL_TIMEOUT_S,
    SchedulerError,
    Submission,
    cluster_max_array_size,
    is_active,
    job_states,
    last_line,
    latest_tasks,
    read_jobs,
    read_submissions,
    write_jobs,
)
from .logs import STARTING
from .profiles import ClusterProfile, parse_profile

__all__ = [
    "ShardJob",
    "ShardJobError",
    "RunFailedError",
    "finish_run",
    "executor_parameters",
    "cpu_executor_parameters",
    "array_size",
    "submit_round",
    "active_job_ids",
    "cancel_jobs",
]

_DEFAULT_ARRAY_SIZE = 1000


class ShardJobError(RuntimeError):
    """Shards of a job failed for other reasons than bad data (see their error records)."""


class RunFailedError(PipelineError, RuntimeError):
    """The finish job found shards that will not be committed: retries are spent, or their data is bad."""


# ------------------------------------------------------------------------ jobs
def _job_log() -> str | None:
    """The stderr log of the submitit job this process runs in (None outside a job)."""
    try:
        return str(submitit.JobEnvironment().paths.stderr)
    except RuntimeError:
        return None


def _attach_log(run_dir: Path, shard_id: str, log: str | None) -> None:
    """Add the job's log path to the shard's error record."""
    folder = RunDir(run_dir)
    record = folder.read_error(shard_id)
    if log is None or record is None:
        return
    folder.record_error(shard_id, record["message"], kind=record["kind"], log=log)


def _say(message: str, *, err: bool = False) -> None:
    print(message, file=sys.stderr if err else sys.stdout, flush=True)


_SIGNALS = (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)


class ShardJob(Checkpointable):
    """The job callable: runs ``shard_ids`` of ``run_dir`` in order, in one process.

    Only the run folder, the ids and the counters are pickled. Committed shards are
    skipped (unless ``force``); a score shard whose explain shards are not all
    committed is skipped as waiting on input. See the module docstring for signals.
    """

    def __init__(
        self,
        run_dir: str | Path,
        shard_ids: Sequence[str],
        *,
        force: bool = False,
        checkpoint_every_s: float = 300.0,
        timeouts: int = 0,
        preemptions: int = 0,
        max_timeouts: int = 3,
        max_preemptions: int = 20,
    ) -> None:
        self.run_dir = str(run_dir)
        self.shard_ids = list(shard_ids)
        self.force = force
        self.checkpoint_every_s = checkpoint_every_s
        self.timeouts = timeouts
        self.preemptions = preemptions
        self.max_timeouts = max_timeouts
        self.max_preemptions = max_preemptions
        self._runner: Any = None
        self._finished: set[str] = set()
        self._signal: str | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_runner=None, _finished=set(), _signal=None)
        return state

    def _catch_signals(self) -> None:
        """SIGUSR2 (timeout): submitit's checkpoint, ``scontrol requeue`` and exit. SIGTERM and SIGINT:
        submitit's checkpoint and exit; SLURM itself requeues a preempted or requeued job, and leaves
        a cancelled one cancelled. Either way the progress of the shard in progress is saved."""
        on_timeout = signal.getsignal(signal.SIGUSR2)
        handler = getattr(on_timeout, "__self__", None)  # submitit's SignalHandler
        if handler is None:
            return

        def on_signal(signum: int, frame: FrameType | None) -> None:
            self._signal = "timeout" if signum == signal.SIGUSR2 else "preemption"
            _say(f"caught {signal.Signals(signum).name}: saving progress ({self._signal})")
            if signum == signal.SIGUSR2:
                handler.checkpoint_and_try_requeue(signum, frame)
            else:
                handler.checkpoint_and_exit(signum, frame)

        for number in _SIGNALS:
            signal.signal(number, on_signal)

    def __call__(self) -> dict[str, Any]:
        from ..stages import ShardError, ShardRunner

        run_dir = RunDir(self.run_dir)
        log = _job_log()
        if log is not None:
            self._catch_signals()
        runner = ShardRunner(run_dir.root, checkpoint_every=self.checkpoint_every_s)
        self._runner = runner
        shards = {s.id: s for s in runner.plan.shards}
        runner.schedule([i for i in self.shard_ids if self.force or not run_dir.shard(i).is_file()])
        failed: dict[str, str] = {}
        waiting: list[str] = []
        for shard_id in self.shard_ids:
            shard = shards[shard_id]
            if not self.force and runner.committed(shard_id):
                self._finished.add(shard_id)
                continue
            for err in (False, True):
                _say(f"{STARTING} {shard.describe()}", err=err)
            missing = [i for i in shard.after if not run_dir.shard(i).is_file()]
            if missing:
                _say(f"waiting on input, skipped: it needs uncommitted shard(s) {', '.join(missing)}")
                waiting.append(shard_id)
                self._finished.add(shard_id)
                continue
            if run_dir.checkpoint(shard_id).is_file():
                _say(f"continuing {shard_id} from its saved progress")
            started = time.perf_counter()
            try:
                runner.run(shard_id, force=self.force)
            except UncompletedJobError:  # out of requeues: the job ends here
                _attach_log(run_dir.root, shard_id, log)
                raise
            except Exception as error:  # recorded; the job's other shards still run
                _attach_log(run_dir.root, shard_id, log)
                failed[shard_id] = error.kind if isinstance(error, ShardError) else "error"
                _say(f"failed {shard_id} ({failed[shard_id]}): see the .err log")
                if failed[shard_id] == "data":
                    _say(f"bad data, not retried: {error}", err=True)
                else:
                    traceback.print_exc()
                    sys.stderr.flush()
            else:
                _say(f"committed {shard_id} in {time.perf_counter() - started:.1f} s")
            self._finished.add(shard_id)
        if log is not None:  # no shard left to save: a late signal must not fail the finished job
            for number in _SIGNALS:
                signal.signal(number, signal.SIG_IGN)
        errors = sorted(i for i, kind in failed.items() if kind != "data")
        if errors:
            raise ShardJobError(f"{len(errors)} shard(s) failed: {', '.join(errors)} (see {run_dir.shards})")
        bad_data = sorted(i for i, kind in failed.items() if kind == "data")
        return {"shards": len(self.shard_ids), "failed_data": bad_data, "waiting": waiting}

    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission | None:
        """Save the progress of the shard in progress; the job to requeue (None: give up)."""
        if self._runner is not None:
            self._runner.save_progress()
        kind = self._signal or "timeout"
        timeouts = self.timeouts + (kind == "timeout")
        preemptions = self.preemptions + (kind == "preemption")
        if timeouts > self.max_timeouts or preemptions > self.max_preemptions:
            count, cap, name = ((timeouts, self.max_timeouts, "max_timeouts") if kind == "timeout"
                                else (preemptions, self.max_preemptions, "max_preemptions"))
            _say(f"not requeued: {kind} {count} is over the profile's {name} ({cap})", err=True)
            return None
        remaining = [i for i in self.shard_ids if i not in self._finished]
        _say(f"requeued after a {kind} (timeouts {timeouts}/{self.max_timeouts}, "
             f"preemptions {preemptions}/{self.max_preemptions}); {len(remaining)} shard(s) left")
        follow_up = ShardJob(
            self.run_dir, remaining, force=self.force, checkpoint_every_s=self.checkpoint_every_s,
            timeouts=timeouts, preemptions=preemptions, max_timeouts=self.max_timeouts,
            max_preemptions=self.max_preemptions,
        )
        return DelayedSubmission(follow_up)


def _set_outcome(run_dir: Path, state: str, launch: int, round: int, failures: dict[str, str]) -> None:
    jobs = read_jobs(run_dir)
    jobs["outcome"] = {"state": state, "launch": launch, "round": round, "time": time.time(), "failures": failures}
    write_jobs(run_dir, jobs)


def _why_missing(run_dir: Path, missing: Sequence[str], after: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, bool]]:
    """``{shard id: (why it is not committed, whether a retry can help)}``."""
    folder = RunDir(run_dir)
    files = folder.scan()
    records = folder.errors(i for i in missing if i in files.errors)
    latest = latest_tasks(read_submissions(run_dir))
    try:
        states = job_states({latest[i][0].job_id for i in missing if i in latest})
    except SchedulerError:
        states = {}
    bad_data = {i for i, r in records.items() if r.get("kind") == "data"}
    reasons: dict[str, tuple[str, bool]] = {}
    for shard_id in missing:
        record = records.get(shard_id)
        blocked = sorted(set(after.get(shard_id, ())) & bad_data)
        where = ""
        if shard_id in latest:
            submission, index = latest[shard_id]
            where = f" (log {record.get('log') if record and record.get('log') else submission.log(index)})"
        if record and record.get("kind") == "data":
            reasons[shard_id] = (f"bad data: {last_line(record.get('message'))}{where}", False)
        elif blocked:
            reasons[shard_id] = (f"needs shard(s) with bad data: {', '.join(blocked)}", False)
        elif record:
            reasons[shard_id] = (f"error: {last_line(record.get('message'))}{where}", True)
        elif shard_id in latest:
            submission, index = latest[shard_id]
            state = states.get(submission.task_job_id(index), "not in sacct")
            missing_inputs = [i for i in after.get(shard_id, ()) if i not in files.committed]
            what = (f"waiting on input {', '.join(missing_inputs)}" if missing_inputs
                    else f"task {submission.task_job_id(index)} ended {state} before committing it")
            reasons[shard_id] = (f"{what}{where}", True)
        else:
            reasons[shard_id] = ("never submitted", True)
    return reasons


def finish_run(run_dir: str, launch: int, round: int) -> str:
    """The finish job: reduce when every shard is committed, else resubmit or record the failures."""
    from ..planning import Plan

    folder = RunDir(run_dir)
    plan = Plan.read(folder.plan)
    committed = folder.committed()
    missing = [s.id for s in plan.shards if s.id not in committed]
    if not missing:
        from ..stages import reduce_run

        results = reduce_run(folder.root, progress=False).results
        _set_outcome(folder.root, "finished", launch, round, {})
        return f"reduced into {results}"
    jobs = read_jobs(folder.root)
    profile = parse_profile(jobs["profile"], source=f"{folder.jobs} profile")
    reasons = _why_missing(folder.root, missing, {s.id: s.after for s in plan.shards})
    retry = [i for i in missing if reasons[i][1]]
    if retry and round < profile.retries:
        by_id = {s.id: s for s in plan.shards}
        submitted = submit_round(folder.root, [by_id[i] for i in retry], profile, launch=launch, round=round + 1)
        message = (f"retry {round + 1} of {profile.retries}: resubmitted {len(retry)} shard(s) as job(s) "
                   f"{', '.join(s.job_id for s in submitted)}")
        _say(message)
        return message
    _set_outcome(folder.root, "failed", launch, round, {i: reason for i, (reason, _) in reasons.items()})
    listed = "\n  ".join(f"{i}: {reasons[i][0]}" for i in missing[:20])
    more = f"\n  ... and {len(missing) - 20} more (see {folder.jobs})" if len(missing) > 20 else ""
    spent = f"after {round} retr{'y' if round == 1 else 'ies'}" if retry else "(not retried)"
    raise RunFailedError(f"{len(missing)} shard(s) not committed {spent}:\n  {listed}{more}")


# ------------------------------------------------------------------ submission
def executor_parameters(profile: ClusterProfile) -> dict[str, Any]:
    """The parameters of submitit's ``SlurmExecutor`` for the arrays (without dependencies)."""
    params: dict[str, Any] = {
        "job_name": profile.job_name,
        "time": profile.time,
        "cpus_per_task": profile.cpus_per_task,
        "array_parallelism": profile.array_parallelism,
        "signal_delay_s": profile.signal_delay_s,
        "setup": list(profile.setup),
    }
    if profile.gpus_per_node:
        params["gpus_per_node"] = profile.gpus_per_node
    for name in ("partition", "mem", "account", "qos", "constraint"):
        value = getattr(profile, name)
        if value is not None:
            params[name] = value
    params["additional_parameters"] = {"kill-on-invalid-dep": "yes", **profile.sbatch}
    return params


def cpu_executor_parameters(profile: ClusterProfile) -> dict[str, Any]:
    """The parameters of the finish job: the profile's ``cpu_job`` section, account and qos."""
    cpu = profile.cpu_job
    params: dict[str, Any] = {
        "job_name": f"{profile.job_name}-finish",
        "time": cpu.time,
        "cpus_per_task": cpu.cpus_per_task,
        "setup": list(profile.setup),
    }
    if cpu.gpus_per_node:
        params["gpus_per_node"] = cpu.gpus_per_node
    for name, value in (("partition", cpu.partition), ("mem", cpu.mem), ("account", profile.account),
                        ("qos", profile.qos)):
        if value is not None:
            params[name] = value
    params["additional_parameters"] = {"kill-on-invalid-dep": "yes", **cpu.sbatch}
    return params


def _executor(folder: Path, profile: ClusterProfile, params: dict[str, Any]) -> submitit.SlurmExecutor:
    if shutil.which("sbatch") is None:
        raise SchedulerError("sbatch is not on PATH: submit from a machine of the SLURM cluster")
    # submitit's own cap never binds before ours: every requeue is a timeout or a preemption
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=profile.max_timeouts + profile.max_preemptions)
    executor.update_parameters(**params)
    return executor


def array_size(profile: ClusterProfile) -> int:
    """The most tasks per array: the profile's ``max_array_size``, else the cluster's MaxArraySize - 1."""
    limit = cluster_max_array_size()
    if profile.max_array_size is None:
        return limit - 1 if limit else _DEFAULT_ARRAY_SIZE
    if limit is not None and profile.max_array_size > limit - 1:
        raise SchedulerError(
            f"the profile's max_array_size ({profile.max_array_size}) is over the cluster's MaxArraySize "
            f"({limit}, from `scontrol show config`): arrays can hold at most {limit - 1} tasks; lower "
            f"max_array_size or leave it out (it defaults to the cluster's)"
        )
    return profile.max_array_size


def _chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _shares(limit: int, sizes: Sequence[int]) -> list[int]:
    """Each array's ``%N`` so that all together run at most ``limit`` tasks (at least 1 each)."""
    if len(sizes) > limit:
        return [1] * len(sizes)
    shares = [limit // len(sizes) + (i < limit % len(sizes)) for i in range(len(sizes))]
    return [min(share, size) for share, size in zip(shares, sizes)]


#: sbatch error messages, and the profile fields that cause them
_SBATCH_CAUSES = (
    ("array", "max_array_size (the cluster's MaxArraySize: `scontrol show config`)"),
    ("partition", "partition (or cpu_job.partition)"),
    ("account", "account"),
    ("qos", "qos"),
    ("time limit", "time (or cpu_job.time)"),
    ("node configuration", "gpus_per_node, cpus_per_task, mem or constraint (or their cpu_job values)"),
    ("memory", "mem (or cpu_job.mem)"),
    ("gres", "gpus_per_node"),
    ("feature", "constraint"),
)


def _sbatch_problem(error: Exception) -> str:
    text = str(error)
    lines = [line.strip() for line in text.splitlines() if "sbatch: error" in line or "error:" in line.lower()]
    reason = lines[0] if lines else text.strip().splitlines()[-1] if text.strip() else type(error).__name__
    fields = [field for needle, field in _SBATCH_CAUSES if needle in reason.lower()]
    cause = f"; check the profile's {fields[0]}" if fields else ""
    return f"sbatch refused the submission: {reason}{cause}"


class _Round:
    """The bookkeeping of one submission round: records each submission, undoes them all on failure."""

    def __init__(self, run_dir: Path, profile: ClusterProfile, launch: int, round: int,
                 config: dict[str, Any] | None) -> None:
        self.folder = RunDir(run_dir)
        self.jobs_before = self.folder.jobs.read_text() if self.folder.jobs.is_file() else None
        self.folder.slurm.mkdir(parents=True, exist_ok=True)
        self.files_before = set(os.listdir(self.folder.slurm))
        self.jobs = read_jobs(run_dir)
        if config is not None:
            self.jobs.setdefault("config", config)
        self.jobs["profile"] = profile.model_dump(mode="json")
        self.jobs["launch"] = launch
        self.jobs["outcome"] = None
        self.profile, self.launch, self.round = profile, launch, round
        self.submitted: list[Submission] = []

    def record(self, job_id: str, stage: str, tasks: Sequence[Sequence[str]], depends: Sequence[str],
               parallelism: int = 0) -> None:
        submission = Submission(job_id, stage, len(tasks) > 1, tuple(tuple(t) for t in tasks), tuple(depends),
                                self.profile.name, time.time(), str(self.folder.slurm), self.launch, self.round,
                                parallelism)
        self.jobs["submissions"].append(submission.to_json())
        write_jobs(self.folder.root, self.jobs)
        self.submitted.append(submission)

    def undo(self) -> None:
        """Cancel what was submitted, remove the files it left, restore ``jobs.json``."""
        if self.submitted:
            subprocess.run(["scancel", *[s.job_id for s in self.submitted]], capture_output=True,
                           timeout=SCHEDULER_CALL_TIMEOUT_S)
        for name in set(os.listdir(self.folder.slurm)) - self.files_before:
            path = self.folder.slurm / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        if self.jobs_before is None:
            self.folder.jobs.unlink(missing_ok=True)
        else:
            self.folder.jobs.write_text(self.jobs_before)


def submit_round(
    run_dir: Path,
    shards: Sequence[Any],
    profile: ClusterProfile,
    *,
    launch: int,
    round: int = 0,
    force: bool = False,
    config: dict[str, Any] | None = None,
) -> list[Submission]:
    """Submit ``shards`` (explain arrays, score arrays) and the finish job; returns the submissions.

    Each submission is appended to ``jobs.json`` as soon as ``sbatch`` accepted it
    (with ``config`` recorded there at the first launch). When a submission fails,
    the round is undone (see :class:`_Round`) and :class:`SchedulerError` says why.
    """
    run_dir = Path(run_dir).resolve()
    size = array_size(profile)
    bookkeeping = _Round(run_dir, profile, launch, round, config)
    arrays = _executor(bookkeeping.folder.slurm, profile, executor_parameters(profile))
    try:
        depends: list[str] = []
        every_array: list[str] = []
        for stage in ("explain", "score"):
            ids = [s.id for s in shards if s.stage == stage]
            groups = _chunks(_chunks(ids, profile.shards_per_task), size)
            shares = _shares(profile.array_parallelism, [len(g) for g in groups]) if groups else []
            stage_jobs: list[str] = []
            for position, (tasks, share) in enumerate(zip(groups, shares)):
                lane = position - profile.array_parallelism  # more arrays than the limit: wait for this one
                after = [*depends, *([stage_jobs[lane]] if lane >= 0 else [])]
                extra = dict(executor_parameters(profile)["additional_parameters"])
                if after:
                    extra["dependency"] = "afterany:" + ":".join(after)
                arrays.update_parameters(array_parallelism=share, additional_parameters=extra)
                with arrays.batch():
                    handles = [arrays.submit(_shard_job(run_dir, task, profile, force)) for task in tasks]
                job_id = handles[0].job_id.split("_")[0]
                bookkeeping.record(job_id, stage, tasks, after, share)
                stage_jobs.append(job_id)
            depends = stage_jobs or depends
            every_array += stage_jobs
        finisher = _executor(bookkeeping.folder.slurm, profile, cpu_executor_parameters(profile))
        if every_array:
            extra = dict(cpu_executor_parameters(profile)["additional_parameters"])
            finisher.update_parameters(additional_parameters={**extra, "dependency": "afterany:" + ":".join(every_array)})
        handle = finisher.submit(finish_run, str(run_dir), launch, round)
        bookkeeping.record(handle.job_id, "finish", [], every_array)
    except (FailedJobError, subprocess.SubprocessError, OSError) as error:
        bookkeeping.undo()
        raise SchedulerError(_sbatch_problem(error)) from error
    except BaseException:
        bookkeeping.undo()
        raise
    return bookkeeping.submitted


def _shard_job(run_dir: Path, task: Sequence[str], profile: ClusterProfile, force: bool) -> ShardJob:
    return ShardJob(str(run_dir), list(task), force=force, checkpoint_every_s=profile.checkpoint_every_s,
                    max_timeouts=profile.max_timeouts, max_preemptions=profile.max_preemptions)


# ------------------------------------------------------------------- scheduler
def active_job_ids(run_dir: Path) -> list[str]:
    """The run's recorded jobs that ``sacct`` reports queued or running (raises SchedulerError)."""
    submissions = read_submissions(run_dir)
    states = job_states(s.job_id for s in submissions)
    now = time.time()
    return [
        s.job_id for s in submissions
        if any(is_active(states.get(s.task_job_id(i)), s, now) for i in range(max(len(s.tasks), 1)))
    ]


def cancel_jobs(run_dir: Path) -> list[str]:
    """``scancel`` the run's queued and running jobs (every recorded job when sacct fails)."""
    submissions = read_submissions(run_dir)
    if not submissions:
        return []
    try:
        ids = active_job_ids(run_dir)
    except SchedulerError:
        ids = sorted({s.job_id for s in submissions}, key=int)
    if not ids:
        return []
    try:
        done = subprocess.run(["scancel", *ids], capture_output=True, text=True, timeout=SCHEDULER_CALL_TIMEOUT_S)
    except FileNotFoundError:
        raise SchedulerError("scancel is not available (not on PATH)") from None
    except subprocess.TimeoutExpired:
        raise SchedulerError(f"scancel did not answer within {SCHEDULER_CALL_TIMEOUT_S:.0f} s") from None
    problems = [line for line in done.stderr.splitlines() if line.strip() and "already complet" not in line]
    if done.returncode != 0 and problems:
        raise SchedulerError(f"scancel failed (exit {done.returncode}): {problems[0]}")
    return ids
