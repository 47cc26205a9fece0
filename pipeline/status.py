"""Status of a run, read from the run folder first and the scheduler second.

Committed shard files are the truth for what is done; recorded error files say what
failed (and why); ``jobs.json`` says which task last got each shard (earlier,
superseded submissions do not count), and one ``sacct`` call says whether that task
is running, pending (queued, held, requeued, or waiting on a dependency) or ended.
A shard that is not committed and not in an active task is *failed* (bad data, an
error, or its task ended without committing it: cancelled, timed out, killed) or,
for a score shard whose explain shards are not all committed while its task ended
or an explain shard failed, *waiting on input*; else it is pending.

Every committed shard is checked once (HDF5 header, schema, datasets present) and
recorded in ``shards/checked.json`` with its size and modification time; later calls
only stat it. Imports nothing heavy (no torch, pandas or submitit; h5py only to check
new shards): ``xai-pipeline status`` answers in well under a second even for tens of
thousands of shards once they have been checked.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import time
from pathlib import Path
from typing import Any

from .launching.accounting import (
    SchedulerError,
    Submission,
    is_active,
    job_states,
    last_line,
    latest_tasks,
    read_jobs,
)
from .planning import Plan
from .run_dir import RunDir, atomic_write

__all__ = ["RunStatus", "run_status"]

_RUNNING = frozenset({"RUNNING", "COMPLETING", "CONFIGURING", "SIGNALING", "STAGE_OUT", "RESIZING"})
_HELD = frozenset({"REQUEUE_HOLD", "SUSPENDED", "STOPPED", "SPECIAL_EXIT"})
_STAGES = ("explain", "score")


@dataclasses.dataclass
class RunStatus:
    """Every planned shard in exactly one state: done, running, pending, failed or waiting (on input)."""

    run_dir: Path
    plan: Plan
    done: set[str]
    failed: dict[str, dict[str, Any]]
    running: set[str]
    pending: set[str]
    waiting: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    pending_reasons: dict[str, str] = dataclasses.field(default_factory=dict)
    finish_job: dict[str, Any] | None = None
    outcome: dict[str, Any] | None = None
    scheduler_note: str | None = None
    #: committed shards found corrupt (they count as not done): cut, overwritten or missing a
    #: dataset by the cheap check, changed contents too with ``verify``
    corrupt: dict[str, str] = dataclasses.field(default_factory=dict)
    #: how the input files differ from the plan's fingerprints (``verify`` only)
    inputs_note: str | None = None
    #: whether the shards and tables were read and checked (``verify``)
    verified: bool = False

    @property
    def total(self) -> int:
        return len(self.plan.shards)

    @property
    def finished(self) -> bool:
        """Every shard is committed."""
        return len(self.done) == self.total

    @functools.cached_property
    def reduced(self) -> bool:
        """Every shard is committed and results.h5 with its tables is of this plan (with ``verify``:
        and every table unchanged since the reduce wrote it)."""
        if not self.finished or not RunDir(self.run_dir).results.is_file():
            return False
        from .integrity import results_whole

        return results_whole(self.run_dir, self.plan, deep=self.verified)

    @property
    def active(self) -> bool:
        """Jobs of the run are queued or running (as far as the scheduler answered)."""
        return bool(self.running or (self.finish_job and self.finish_job["active"])
                    or any(r != "not submitted" for r in self.pending_reasons.values()))

    def to_json(self) -> dict[str, Any]:
        """The status as plain data (``xai-pipeline status --json``)."""
        stages = {}
        for stage in _STAGES:
            ids = {s.id for s in self.plan.stage(stage)}
            stages[stage] = {"done": len(ids & self.done), "running": len(ids & self.running),
                             "pending": len(ids & self.pending), "failed": len(ids & set(self.failed)),
                             "waiting": len(ids & set(self.waiting))}
        return {
            "run_dir": str(self.run_dir), "images": self.plan.image_count, "shards": self.total,
            "finished": self.finished, "reduced": self.reduced, "active": self.active, "stages": stages,
            "running": sorted(self.running), "pending": dict(sorted(self.pending_reasons.items())),
            "failed": self.failed, "waiting": self.waiting, "finish_job": self.finish_job,
            "outcome": self.outcome, "scheduler_note": self.scheduler_note, "corrupt": self.corrupt,
            "inputs": self.inputs_note,
        }

    def describe(self) -> str:
        folder = RunDir(self.run_dir)
        lines = [f"run {self.run_dir}: {self.plan.image_count} images, {self.total} shards"]
        cost = _cost_note(folder, self.plan)
        if cost:
            lines.append(f"  cost: {cost}")
        for stage, counts in self.to_json()["stages"].items():
            lines.append(f"  {stage:8s} done {counts['done']:6d}  running {counts['running']:6d}  "
                         f"pending {counts['pending']:6d}  failed {counts['failed']:6d}  waiting {counts['waiting']:6d}")
        reasons: dict[str, int] = {}
        for reason in self.pending_reasons.values():
            reasons[reason] = reasons.get(reason, 0) + 1
        if reasons:
            lines.append("  pending: " + ", ".join(f"{n} {reason}" for reason, n in sorted(reasons.items())))
        if self.scheduler_note:
            lines.append(f"  scheduler: {self.scheduler_note}")
        for shard_id, record in list(self.failed.items())[:10]:
            where = f" (log: {record['log']})" if record.get("log") else ""
            lines.append(f"  failed {self.plan.shard(shard_id).describe()}: [{record.get('kind')}] "
                         f"{record.get('message')}{where}")
        if len(self.failed) > 10:
            lines.append(f"  ... and {len(self.failed) - 10} more failed shards (`--json` lists them all)")
        if self.inputs_note:
            lines.append(f"  inputs: {self.inputs_note}")
        for shard_id, reason in list(self.corrupt.items())[:10]:
            lines.append(f"  corrupt {self.plan.shard(shard_id).describe()}: {reason}")
        if self.corrupt:
            lines.append(f"  `xai-pipeline resume {self.run_dir}` moves the corrupt shards to "
                         f"{RunDir(self.run_dir).shards / 'corrupt'} and computes them again")
        for shard_id, inputs in list(self.waiting.items())[:5]:
            lines.append(f"  waiting {shard_id}: on input {', '.join(inputs)}")
        if len(self.waiting) > 5:
            lines.append(f"  ... and {len(self.waiting) - 5} more shards waiting on input")
        finish = self.finish_job
        if finish and finish["active"]:
            retry = (f"retry {finish['round'] + 1} of {finish['retries']} next" if finish["round"] < finish["retries"]
                     else "retries spent: else it lists the failures")
            lines.append(f"  reduce: job {finish['job_id']} {finish['state']}: it reduces when every shard is "
                         f"committed, else resubmits what failed ({retry}); log {finish['log']}")
        elif self.outcome and self.outcome.get("state") == "failed" and not self.finished:
            lines.append(f"  the run ended with {len(self.outcome.get('failures', {}))} shard(s) not committed after "
                         f"{self.outcome.get('round', 0)} automatic retr{'y' if self.outcome.get('round') == 1 else 'ies'}"
                         f"; fix the cause, then `xai-pipeline resume {self.run_dir}`")
        elif finish and not self.finished and finish["state"] not in ("COMPLETED", "unknown"):
            lines.append(f"  reduce: job {finish['job_id']} ended {finish['state']}; log {finish['log']}")
        if self.reduced:
            lines.append(f"  finished: results in {folder.results}, tables in {folder.summary_md}")
        elif self.finished and not (finish and finish["active"]):
            lines.append(f"  all shards done: `xai-pipeline reduce {self.run_dir}` writes the results")
        return "\n".join(lines)


def _cost_note(folder: RunDir, plan: Plan) -> str | None:
    """The plan's forwards, backwards and estimated time from ``cost.json`` (None without one of this plan)."""
    from .cost import format_duration, read_estimate

    estimate = read_estimate(folder.cost, plan.config_hash)
    if estimate is None:
        return None
    total, seconds = estimate.total, estimate.seconds(estimate.total)
    timed = "" if seconds is None else f", ~{format_duration(seconds)} on {estimate.throughput.device} (estimate)"
    return f"{total.forwards:,d} forwards, {total.backwards:,d} backwards planned{timed}; per method in {folder.cost}"


def _corrupt_committed(folder: RunDir, shard_ids: list[str]) -> dict[str, str]:
    """``{shard id: reason}`` of the committed ``shard_ids`` that are corrupt, by the cheap check of
    :func:`~pipeline.store.verify_shard` (HDF5 header, schema, every dataset present), made once per
    file: a shard found whole is recorded with its size and modification time in
    ``shards/checked.json`` and not opened again while both stay the same."""
    try:
        known = json.loads(folder.checked.read_bytes())
    except (OSError, ValueError):
        known = {}
    stamps: dict[str, str] = {}
    fresh: dict[str, str] = {}
    for shard_id, path in folder.shard_paths(shard_ids).items():
        try:
            stat = os.stat(path)
        except FileNotFoundError:  # removed since the listing: not committed any more
            continue
        stamps[shard_id] = f"{stat.st_size}:{stat.st_mtime_ns}"
        if known.get(shard_id) != stamps[shard_id]:
            fresh[shard_id] = path
    corrupt: dict[str, str] = {}
    if fresh:
        from .store import verify_shard  # h5py, only when there are files to open

        opened = ((i, verify_shard(Path(path), deep=False)) for i, path in fresh.items())
        corrupt = {i: reason for i, reason in opened if reason is not None}
    whole = {i: stamp for i, stamp in stamps.items() if i not in corrupt}
    if fresh and folder.shards.is_dir():
        with contextlib.suppress(OSError):  # a read-only run folder: checked again next time
            atomic_write(folder.checked, json.dumps(whole, separators=(",", ":")))
    return {i: corrupt[i] for i in shard_ids if i in corrupt}


def _inputs_note(folder: RunDir) -> str:
    """How the image and ground-truth files differ from the plan's fingerprints, and what to do."""
    from .data import DataError
    from .planning import input_changes

    try:
        changes = input_changes(folder)
    except DataError as error:
        return f"cannot be compared with the plan: {error}"
    if not changes:
        return "unchanged since planning"
    return f"{changes.describe()}; `xai-pipeline resume {folder.root}` recomputes the shards that read them"


def _pending_reason(state: str | None, submission: Submission, active_jobs: set[str]) -> str:
    if any(job in active_jobs for job in submission.depends_on):
        return "waiting on dependency"
    if state is None:
        return "submitted (not in sacct yet)"
    if state in _HELD:
        return "held"
    if state.startswith("REQUEUE"):
        return "requeued"
    return "queued"


def run_status(run_dir: Path, *, scheduler: bool = True, verify: bool = False) -> RunStatus:
    """The run's status; ``scheduler=False`` never asks the scheduler. Every committed shard gets the
    cheap check once (HDF5 header, schema and datasets present; a file that changed since is checked
    again); ``verify`` reads every shard and checks its checksums and digest. A corrupt shard counts
    as not done."""
    folder = RunDir(run_dir)
    plan = Plan.read(folder.plan)
    files = folder.scan()
    planned = {s.id for s in plan.shards}
    done = set(files.committed & planned)
    inputs_note = None
    if verify:
        from .integrity import find_corrupt

        corrupt = find_corrupt(folder, sorted(done), deep=True)
        inputs_note = _inputs_note(folder)
    else:
        corrupt = _corrupt_committed(folder, sorted(done))
    done -= set(corrupt)
    open_ids = planned - done
    records = folder.errors(open_ids & files.errors)
    jobs = read_jobs(folder.root)
    submissions = [Submission.from_json(s) for s in jobs["submissions"]]
    latest = latest_tasks(submissions)
    finishes = [s for s in submissions if s.stage == "finish"]
    states: dict[str, str] = {}
    note = None
    asked = scheduler and bool(submissions)
    wanted: set[str] = set()
    if asked:
        relevant = {latest[i][0] for i in open_ids if i in latest}
        wanted = {s.job_id for s in relevant} | {d for s in relevant for d in s.depends_on}
        if finishes:
            wanted.add(finishes[-1].job_id)
        try:
            states = job_states(wanted)
        except SchedulerError as error:
            asked = False
            note = f"{error}; shards that are queued or running are counted as pending"
    now = time.time()
    active_jobs = {
        s.job_id for s in submissions
        if asked and s.job_id in wanted
        and any(is_active(states.get(s.task_job_id(i)), s, now) for i in range(max(len(s.tasks), 1)))
    }
    running: set[str] = set()
    pending: dict[str, str] = {}
    failed: dict[str, dict[str, Any]] = {}
    waiting: dict[str, list[str]] = {}
    by_id = {s.id: s for s in plan.shards}
    for shard_id in sorted(open_ids):
        task = latest.get(shard_id)
        if asked and task is not None:
            submission, index = task
            state = states.get(submission.task_job_id(index))
            if is_active(state, submission, now):
                if state in _RUNNING:
                    running.add(shard_id)
                else:
                    pending[shard_id] = _pending_reason(state, submission, active_jobs)
                continue
        record = records.get(shard_id)
        inputs = [i for i in by_id[shard_id].after if i not in done]
        if record is not None and (record.get("kind") == "data" or not inputs):
            failed[shard_id] = {"kind": record.get("kind"), "message": last_line(record.get("message")),
                                "log": record.get("log") or (str(task[0].log(task[1])) if task else None)}
        elif inputs and ((asked and task is not None) or any(i in records for i in inputs)):
            waiting[shard_id] = inputs
        elif asked and task is not None and not inputs:
            submission, index = task
            state = states.get(submission.task_job_id(index), "UNKNOWN")
            failed[shard_id] = {"kind": "lost", "log": str(submission.log(index, "out")),
                                "message": f"task {submission.task_job_id(index)} ended {state} without committing it"}
        else:
            pending[shard_id] = "not submitted" if task is None else "unknown (no answer from the scheduler)"
    finish_job = None
    if finishes:
        last = finishes[-1]
        state = states.get(last.job_id) if asked else None
        profile = jobs.get("profile") or {}
        finish_job = {"job_id": last.job_id, "state": (state or "submitted") if asked else "unknown",
                      "active": asked and is_active(state, last, now), "round": last.round,
                      "retries": int(profile.get("retries", 0)), "log": str(last.log(0, "out"))}
    outcome = jobs.get("outcome")
    return RunStatus(folder.root, plan, done, failed, running, set(pending), waiting, pending, finish_job, outcome,
                     note, corrupt, inputs_note, verify)
