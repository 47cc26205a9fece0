"""What was submitted (``jobs.json``) and what the scheduler says about it (``sacct``, ``scontrol``).

Light on purpose: no submitit, torch or h5py here, so that ``xai-pipeline status``
starts in a fraction of a second.

``RUN_DIR/jobs.json``::

    {"config": the config at the first launch,
     "profile": the last profile used,
     "launch": how many times the run was launched (launch, resume, or run --profile),
     "submissions": [{"job_id", "stage" (explain, score or finish), "array",
                      "tasks": [[shard ids of task 0], ...], "depends_on", "profile", "time",
                      "log_dir", "launch", "round" (0: the launch, 1..: automatic retries),
                      "parallelism"}, ...],
     "outcome": null, or what the last finish job concluded: {"state": "finished" | "failed",
                "launch", "round", "time", "failures": {shard id: why}}}

A shard's last submission is the one that counts; earlier ones are superseded.
"""
from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any, Iterable

from ..errors import PipelineError
from ..run_dir import RunDir, atomic_write

__all__ = [
    "SchedulerError",
    "Submission",
    "read_jobs",
    "write_jobs",
    "read_submissions",
    "latest_tasks",
    "last_line",
    "parse_sacct",
    "job_states",
    "is_active",
    "cluster_max_array_size",
    "ACTIVE_STATES",
    "ACCOUNTING_GRACE_S",
    "SCHEDULER_CALL_TIMEOUT_S",
]

#: scheduler states of a job that is queued, running or about to run again
ACTIVE_STATES = frozenset({
    "PENDING", "RUNNING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "RESIZING", "SUSPENDED",
    "CONFIGURING", "COMPLETING", "STAGE_OUT", "SIGNALING", "SPECIAL_EXIT", "STOPPED",
})
#: how long after its submission a job that ``sacct`` does not list yet still counts as queued
#: (accounting records reach slurmdbd asynchronously)
ACCOUNTING_GRACE_S = 600.0
#: how long one ``sacct``/``scancel``/``scontrol`` call may take
SCHEDULER_CALL_TIMEOUT_S = 60.0


class SchedulerError(PipelineError, RuntimeError):
    """The scheduler's commands are missing or failed; the message says which and why."""


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
    launch: int = 0
    round: int = 0
    parallelism: int = 0

    def task_job_id(self, index: int) -> str:
        """The scheduler's id of task ``index`` (``<array>_<index>``, or the job id)."""
        return f"{self.job_id}_{index}" if self.array else self.job_id

    def log(self, index: int = 0, suffix: str = "err") -> Path:
        """The log of task ``index``: ``err`` holds tracebacks, ``out`` progress and requeues."""
        return Path(self.log_dir) / f"{self.task_job_id(index)}_0_log.{suffix}"

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
            launch=int(data.get("launch", 0)),
            round=int(data.get("round", 0)),
            parallelism=int(data.get("parallelism", 0)),
        )


def read_jobs(run_dir: Path) -> dict[str, Any]:
    """The content of ``RUN_DIR/jobs.json`` (no submissions when nothing was submitted)."""
    path = RunDir(run_dir).jobs
    if not path.is_file():
        return {"submissions": []}
    return json.loads(path.read_text())


def write_jobs(run_dir: Path, data: dict[str, Any]) -> None:
    atomic_write(RunDir(run_dir).jobs, json.dumps(data, separators=(",", ":")))


def read_submissions(run_dir: Path) -> list[Submission]:
    """Every recorded submission of the run, oldest first."""
    return [Submission.from_json(s) for s in read_jobs(run_dir)["submissions"]]


def latest_tasks(submissions: Iterable[Submission]) -> dict[str, tuple[Submission, int]]:
    """``{shard id: (submission, task index)}`` of each shard's last submission."""
    latest: dict[str, tuple[Submission, int]] = {}
    for submission in submissions:
        for index, task in enumerate(submission.tasks):
            for shard_id in task:
                latest[shard_id] = (submission, index)
    return latest


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


def last_line(message: object) -> str:
    """The last non-empty line of an error message (a traceback's conclusion)."""
    lines = [line for line in str(message or "").strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def _call(command: list[str]) -> str:
    """Run a scheduler command; its stdout (raises SchedulerError naming the command)."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=SCHEDULER_CALL_TIMEOUT_S)
    except FileNotFoundError:
        raise SchedulerError(f"{command[0]} is not available (not on PATH)") from None
    except subprocess.TimeoutExpired:
        raise SchedulerError(f"{command[0]} did not answer within {SCHEDULER_CALL_TIMEOUT_S:.0f} s") from None
    if done.returncode != 0:
        reason = (done.stderr or done.stdout).strip().splitlines()
        raise SchedulerError(f"{command[0]} failed (exit {done.returncode}): {reason[0] if reason else 'no message'}")
    return done.stdout


def job_states(job_ids: Iterable[str]) -> dict[str, str]:
    """The state of every task of ``job_ids``, from one ``sacct`` call."""
    ids = sorted(set(job_ids), key=int)
    if not ids:
        return {}
    return parse_sacct(_call(["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ",".join(ids)]))


def is_active(state: str | None, submission: Submission, now: float | None = None) -> bool:
    """Whether a task in ``state`` (None: not in sacct yet) is queued or running."""
    if state is None:
        return (now or time.time()) - submission.time < ACCOUNTING_GRACE_S
    return state in ACTIVE_STATES


def cluster_max_array_size() -> int | None:
    """The cluster's MaxArraySize from ``scontrol show config`` (None when scontrol does not say)."""
    try:
        text = _call(["scontrol", "show", "config"])
    except SchedulerError:
        return None
    match = re.search(r"^MaxArraySize\s*=\s*(\d+)", text, re.MULTILINE)
    return int(match[1]) if match else None
