"""The SLURM executor: pending shards go to SLURM as job arrays through submitit.

Submission (:func:`submit_shards`): the explain shards first, then the score shards,
then one reduce job, each stage waiting for the previous one (``afterok``; a stage
whose dependency can no longer be met is cancelled by SLURM, not left pending).
``shards_per_task`` shards share one array task; arrays hold at most
``max_array_size`` tasks, of which ``array_parallelism`` run at the same time. A
job receives only the run folder and its shard ids: it builds one
:class:`~pipeline.worker.ShardRunner` and runs them in order.

Files::

    RUN_DIR/jobs.json    every submission, appended: {"config": the config at the first launch,
                         "profile": the last profile used, "submissions": [{"job_id", "stage",
                         "array", "tasks": [[shard ids of task 0], ...], "depends_on", "profile",
                         "time", "log_dir"}, ...]}
    RUN_DIR/slurm/       submitit's folder: sbatch scripts, the pickled job callables (paths and
                         ids only) and the logs <job>_<task>_0_log.{out,err}

Timeouts and preemption: SLURM signals a job ``signal_delay_s`` before its time
limit (and on preemption); :meth:`ShardJob.checkpoint` saves the running sums of the
shard in progress and requeues the job with the shards it has not finished, which
then continue from their saved progress. A job is requeued at most
``max_requeues`` times. A shard that fails on bad data (``ShardError`` of kind
``data``) is recorded and not retried; the job goes on with its other shards and
ends successfully, so the rest of the run proceeds. Any other failure is recorded
too, and the job ends failed once its other shards are done.

Scheduler state (:func:`running_shards`, :func:`cancel_jobs`) comes from one
``sacct`` call for all the run's jobs, never one per shard.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Iterable, Sequence

import submitit
from submitit.core.utils import UncompletedJobError
from submitit.helpers import Checkpointable, DelayedSubmission

from ..planning import Shard
from ..run_dir import RunDir
from . import JOBS_FILE
from .profiles import ClusterProfile

__all__ = [
    "ShardJob",
    "ShardJobError",
    "SchedulerError",
    "Submission",
    "reduce_job",
    "executor_parameters",
    "make_executor",
    "submit_shards",
    "read_jobs",
    "read_submissions",
    "parse_sacct",
    "job_states",
    "running_shards",
    "active_job_ids",
    "cancel_jobs",
    "LOG_DIR",
    "ACTIVE_STATES",
    "ACCOUNTING_GRACE_S",
    "SCHEDULER_CALL_TIMEOUT_S",
]

#: submitit's folder inside the run folder (sbatch scripts, pickles, logs)
LOG_DIR = "slurm"

#: scheduler states of a job that is queued, running or about to run again
ACTIVE_STATES = frozenset({
    "PENDING", "RUNNING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "RESIZING", "SUSPENDED",
    "CONFIGURING", "COMPLETING", "STAGE_OUT", "SIGNALING", "SPECIAL_EXIT", "STOPPED",
})
#: how long after its submission a job that ``sacct`` does not list yet still counts as queued
#: (accounting records reach slurmdbd asynchronously)
ACCOUNTING_GRACE_S = 600.0
#: how long one ``sacct``/``scancel`` call may take
SCHEDULER_CALL_TIMEOUT_S = 60.0


class SchedulerError(RuntimeError):
    """The scheduler's commands are missing or failed; the message says which and why."""


class ShardJobError(RuntimeError):
    """Shards of a job failed for other reasons than bad data (see their error records)."""


# ------------------------------------------------------------------------ jobs
def _job_log() -> str | None:
    """The stderr log of the submitit job this process runs in (None outside a job)."""
    try:
        return str(submitit.JobEnvironment().paths.stderr)
    except RuntimeError:
        return None


def _ignore_checkpoint_signal() -> None:
    """Ignore SLURM's timeout/preemption signal from now on: the job has no shard left to save,
    and the signal arriving while the process exits would otherwise kill it and fail the job."""
    signal.signal(getattr(signal, f"SIG{submitit.JobEnvironment.USR_SIG}"), signal.SIG_IGN)


def _attach_log(run_dir: Path, shard_id: str, log: str | None) -> None:
    """Add the job's log path to the shard's error record."""
    folder = RunDir(run_dir)
    record = folder.read_error(shard_id)
    if log is None or record is None:
        return
    folder.record_error(shard_id, record["message"], kind=record["kind"], log=log)


class ShardJob(Checkpointable):
    """The job callable: runs ``shard_ids`` of ``run_dir`` in order, in one process.

    Only the run folder and the ids are pickled. Committed shards are skipped
    (unless ``force``); a score shard whose explain shards are not all committed is
    skipped with a note in the log. On a timeout or preemption signal,
    :meth:`checkpoint` saves the progress of the shard in progress and returns this
    job, restricted to the shards it has not finished, for submitit to requeue.
    """

    def __init__(
        self,
        run_dir: str | Path,
        shard_ids: Sequence[str],
        *,
        force: bool = False,
        checkpoint_every_s: float = 300.0,
        requeues: int = 0,
        max_requeues: int = 3,
    ) -> None:
        self.run_dir = str(run_dir)
        self.shard_ids = list(shard_ids)
        self.force = force
        self.checkpoint_every_s = checkpoint_every_s
        self.requeues = requeues
        self.max_requeues = max_requeues
        self._runner: Any = None
        self._finished: set[str] = set()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_runner"] = None
        state["_finished"] = set()
        return state

    def __call__(self) -> dict[str, Any]:
        from ..stages import ShardError, ShardRunner

        run_dir = Path(self.run_dir)
        runner = ShardRunner(run_dir, checkpoint_every=self.checkpoint_every_s)
        self._runner = runner
        shards = {s.id: s for s in runner.plan.shards}
        log = _job_log()
        failed: dict[str, str] = {}
        skipped: list[str] = []
        for shard_id in self.shard_ids:
            shard = shards[shard_id]
            if not self.force and RunDir(run_dir).shard(shard_id).is_file():
                self._finished.add(shard_id)
                continue
            missing = [i for i in shard.after if not RunDir(run_dir).shard(i).is_file()]
            if missing:
                print(f"skipped {shard.describe()}: it needs uncommitted shard(s) {', '.join(missing)}", flush=True)
                skipped.append(shard_id)
                self._finished.add(shard_id)
                continue
            if RunDir(run_dir).checkpoint(shard_id).is_file():
                print(f"continuing {shard_id} from its saved progress", flush=True)
            started = time.perf_counter()
            try:
                runner.run(shard_id, force=self.force)
            except UncompletedJobError:  # out of requeues: the job ends here
                _attach_log(run_dir, shard_id, log)
                raise
            except Exception as error:  # recorded; the job's other shards still run
                _attach_log(run_dir, shard_id, log)
                failed[shard_id] = error.kind if isinstance(error, ShardError) else "error"
                if failed[shard_id] == "data":
                    print(f"bad data, not retried: {error}", file=sys.stderr, flush=True)
                else:
                    traceback.print_exc()
                    sys.stderr.flush()
            else:
                print(f"committed {shard_id} in {time.perf_counter() - started:.1f} s", flush=True)
            self._finished.add(shard_id)
        if log is not None:
            _ignore_checkpoint_signal()
        errors = sorted(i for i, kind in failed.items() if kind != "data")
        if errors:
            raise ShardJobError(f"{len(errors)} shard(s) failed: {', '.join(errors)} (see {run_dir / 'shards'})")
        bad_data = sorted(i for i, kind in failed.items() if kind == "data")
        return {"shards": len(self.shard_ids), "failed_data": bad_data, "skipped": skipped}

    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission | None:
        """Save the progress of the shard in progress; the job to requeue (None: give up)."""
        if self._runner is not None:
            self._runner.save_progress()
        if self.requeues >= self.max_requeues:
            print(f"not requeued: already requeued {self.requeues} time(s)", file=sys.stderr, flush=True)
            return None
        remaining = [i for i in self.shard_ids if i not in self._finished]
        follow_up = ShardJob(
            self.run_dir, remaining, force=self.force, checkpoint_every_s=self.checkpoint_every_s,
            requeues=self.requeues + 1, max_requeues=self.max_requeues,
        )
        return DelayedSubmission(follow_up)


def reduce_job(run_dir: str) -> str:
    """The reduce job: merge the committed shards into ``results.h5`` and the tables."""
    from ..stages import reduce_run

    return str(reduce_run(Path(run_dir), progress=False).results)


# ------------------------------------------------------------------ submission
@dataclasses.dataclass(frozen=True)
class Submission:
    """One ``sbatch`` call: an array (or a single job) of one stage."""

    job_id: str
    stage: str
    array: bool
    tasks: tuple[tuple[str, ...], ...]
    depends_on: tuple[str, ...]
    profile: str
    time: float
    log_dir: str

    def task_job_id(self, index: int) -> str:
        """The scheduler's id of task ``index`` (``<array>_<index>``, or the job id)."""
        return f"{self.job_id}_{index}" if self.array else self.job_id

    def log(self, index: int = 0) -> Path:
        """The stderr log of task ``index``."""
        return Path(self.log_dir) / f"{self.task_job_id(index)}_0_log.err"

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["tasks"] = [list(t) for t in self.tasks]
        data["depends_on"] = list(self.depends_on)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Submission":
        return cls(
            job_id=str(data["job_id"]),
            stage=data["stage"],
            array=bool(data["array"]),
            tasks=tuple(tuple(t) for t in data["tasks"]),
            depends_on=tuple(data.get("depends_on", ())),
            profile=data.get("profile", ""),
            time=float(data["time"]),
            log_dir=data["log_dir"],
        )


def read_jobs(run_dir: Path) -> dict[str, Any]:
    """The content of ``RUN_DIR/jobs.json`` (empty when nothing was submitted)."""
    path = Path(run_dir) / JOBS_FILE
    if not path.is_file():
        return {"submissions": []}
    return json.loads(path.read_text())


def read_submissions(run_dir: Path) -> list[Submission]:
    """Every recorded submission of the run, oldest first."""
    return [Submission.from_json(s) for s in read_jobs(run_dir)["submissions"]]


def _write_jobs(run_dir: Path, data: dict[str, Any]) -> None:
    path = Path(run_dir) / JOBS_FILE
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, separators=(",", ":")))
    os.replace(tmp, path)


def executor_parameters(profile: ClusterProfile) -> dict[str, Any]:
    """The parameters of submitit's ``SlurmExecutor`` for ``profile`` (without dependencies)."""
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


def make_executor(profile: ClusterProfile, run_dir: Path) -> submitit.SlurmExecutor:
    """A submitit executor writing into ``RUN_DIR/slurm``, with the profile's parameters."""
    if shutil.which("sbatch") is None:
        raise SchedulerError("sbatch is not on PATH: submit from a machine of the SLURM cluster")
    executor = submitit.SlurmExecutor(folder=Path(run_dir) / LOG_DIR, max_num_timeout=profile.max_requeues)
    executor.update_parameters(**executor_parameters(profile))
    return executor


def _with_dependency(executor: submitit.SlurmExecutor, profile: ClusterProfile, depends_on: Sequence[str]) -> None:
    extra = dict(executor_parameters(profile)["additional_parameters"])
    if depends_on:
        extra["dependency"] = "afterok:" + ":".join(depends_on)
    executor.update_parameters(additional_parameters=extra)


def _chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def submit_shards(
    run_dir: Path,
    shards: Sequence[Shard],
    profile: ClusterProfile,
    *,
    force: bool = False,
    reduce: bool = True,
    config: dict[str, Any] | None = None,
) -> list[Submission]:
    """Submit ``shards`` (explain, then score) and the reduce job; returns the submissions.

    Each submission is appended to ``jobs.json`` as soon as ``sbatch`` accepted it,
    with ``config`` recorded there at the first launch.
    """
    run_dir = Path(run_dir).resolve()
    executor = make_executor(profile, run_dir)
    jobs = read_jobs(run_dir)
    if config is not None:
        jobs.setdefault("config", config)
    jobs["profile"] = profile.model_dump(mode="json")
    submitted: list[Submission] = []

    def record(job_id: str, stage: str, array: bool, tasks: Sequence[Sequence[str]], depends: Sequence[str]) -> None:
        submission = Submission(job_id, stage, array, tuple(tuple(t) for t in tasks), tuple(depends),
                                profile.name, time.time(), str(executor.folder))
        jobs["submissions"].append(submission.to_json())
        _write_jobs(run_dir, jobs)
        submitted.append(submission)

    depends: list[str] = []
    for stage in ("explain", "score"):
        ids = [s.id for s in shards if s.stage == stage]
        stage_jobs: list[str] = []
        for tasks in _chunks(_chunks(ids, profile.shards_per_task), profile.max_array_size):
            _with_dependency(executor, profile, depends)
            with executor.batch():
                handles = [
                    executor.submit(ShardJob(
                        str(run_dir), list(task), force=force, checkpoint_every_s=profile.checkpoint_every_s,
                        max_requeues=profile.max_requeues,
                    ))
                    for task in tasks
                ]
            job_id = handles[0].job_id.split("_")[0]
            record(job_id, stage, len(handles) > 1, tasks, depends)
            stage_jobs.append(job_id)
        depends = stage_jobs or depends
    if reduce:
        _with_dependency(executor, profile, depends)
        handle = executor.submit(reduce_job, str(run_dir))
        record(handle.job_id, "reduce", False, [], depends)
    return submitted


# ------------------------------------------------------------------- scheduler
_ARRAY_RANGE = re.compile(r"^(?P<job>\d+)_\[(?P<ranges>[0-9,\-]+)(%\d+)?\]$")


def parse_sacct(text: str) -> dict[str, str]:
    """``{job id or <array>_<task>: state}`` from ``sacct -X -n -P -o JobID,State`` output."""
    states: dict[str, str] = {}
    for line in text.splitlines():
        if "|" not in line:
            continue
        job, state = line.split("|")[:2]
        state = state.split()[0] if state.strip() else "UNKNOWN"
        match = _ARRAY_RANGE.match(job.strip())
        if match is None:
            states[job.strip()] = state
            continue
        for part in match["ranges"].split(","):
            low, _, high = part.partition("-")
            for index in range(int(low), int(high or low) + 1):
                states[f"{match['job']}_{index}"] = state
    return states


def job_states(job_ids: Iterable[str]) -> dict[str, str]:
    """The state of every task of ``job_ids``, from one ``sacct`` call."""
    ids = sorted(set(job_ids), key=int)
    if not ids:
        return {}
    command = ["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ",".join(ids)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=SCHEDULER_CALL_TIMEOUT_S)
    except FileNotFoundError:
        raise SchedulerError("sacct is not available (not on PATH)") from None
    except subprocess.TimeoutExpired:
        raise SchedulerError(f"sacct did not answer within {SCHEDULER_CALL_TIMEOUT_S:.0f} s") from None
    if done.returncode != 0:
        reason = (done.stderr or done.stdout).strip().splitlines()
        raise SchedulerError(f"sacct failed (exit {done.returncode}): {reason[0] if reason else 'no message'}")
    return parse_sacct(done.stdout)


def _is_active(state: str | None, submission: Submission, now: float) -> bool:
    if state is None:
        return now - submission.time < ACCOUNTING_GRACE_S
    return state in ACTIVE_STATES


def _relevant(run_dir: Path, candidates: set[str]) -> list[Submission]:
    """Submissions holding a candidate shard, and the last reduce job while there are no results."""
    submissions = read_submissions(run_dir)
    relevant = [s for s in submissions if any(i in candidates for task in s.tasks for i in task)]
    reduces = [s for s in submissions if s.stage == "reduce"]
    if reduces and not RunDir(run_dir).results.is_file():
        relevant.append(reduces[-1])
    return relevant


def _task_line(submission: Submission, state: str, indices: list[int], uncommitted: int) -> str:
    if len(indices) == 1:
        what, log = f"job {submission.task_job_id(indices[0])}", submission.log(indices[0])
    else:
        what = f"job {submission.job_id}: {len(indices)} tasks"
        log = Path(submission.log_dir) / f"{submission.job_id}_*_0_log.err"
    shards = f"; {uncommitted} shard(s) not committed" if submission.stage != "reduce" else ""
    return f"{what} ({submission.stage}) {state}{shards}; log {log}"


def running_shards(run_dir: Path, candidates: set[str]) -> tuple[set[str], str | None]:
    """Which of ``candidates`` are in a queued or running job, and a note on the run's jobs.

    One ``sacct`` call for all the run's jobs that still matter. When ``sacct`` is
    missing or fails, no shard counts as running and the note says why.
    """
    run_dir = Path(run_dir)
    relevant = _relevant(run_dir, candidates)
    if not relevant:
        return set(), None
    try:
        states = job_states(s.job_id for s in relevant)
    except SchedulerError as error:
        return set(), f"{error}; shards that are queued or running are counted as pending"
    now = time.time()
    running: set[str] = set()
    ended: dict[tuple[int, str], list[int]] = {}
    uncommitted: dict[tuple[int, str], int] = {}
    active_tasks = 0
    for position, submission in enumerate(relevant):
        for index, ids in enumerate(submission.tasks or ((),)):
            state = states.get(submission.task_job_id(index))
            waiting = [i for i in ids if i in candidates]
            if _is_active(state, submission, now):
                running.update(waiting)
                active_tasks += 1
            elif state != "COMPLETED" and (waiting or submission.stage == "reduce"):
                key = (position, state or "UNKNOWN (not in sacct)")
                ended.setdefault(key, []).append(index)
                uncommitted[key] = uncommitted.get(key, 0) + len(waiting)
    lines = [f"sacct: {active_tasks} job(s) or array task(s) of this run queued or running"]
    shown = sorted(ended)[:8]
    lines += [f"    {_task_line(relevant[p], state, ended[(p, state)], uncommitted[(p, state)])}" for p, state in shown]
    if len(ended) > len(shown):
        lines.append(f"    ... and {len(ended) - len(shown)} more groups of ended tasks")
    return running, "\n".join(lines)


def active_job_ids(run_dir: Path) -> list[str]:
    """The run's recorded jobs that ``sacct`` reports queued or running (raises SchedulerError)."""
    submissions = read_submissions(run_dir)
    states = job_states(s.job_id for s in submissions)
    now = time.time()
    return [
        s.job_id for s in submissions
        if any(_is_active(states.get(s.task_job_id(i)), s, now) for i in range(max(len(s.tasks), 1)))
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
