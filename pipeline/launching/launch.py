"""Launching, resuming and cancelling a planned run, on this machine or on SLURM.

:func:`launch_run` is what ``xai-pipeline launch``, ``resume`` and ``run --profile``
do: it refuses a run folder whose config or model changed since planning (saying
what changed), runs the pre-flight checks, and then either runs the pending shards
here (``executor: local``) or submits them to SLURM. Only shards that are not
committed are run, unless ``force``; on SLURM, a run whose jobs are still queued or
running is not submitted again, and a launch warns when the start-up plus one
forward batch (timed by the pre-flight check) would not fit before the timeout
signal (``time`` minus ``signal_delay_s``).
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import ConfigError, ExperimentConfig, config_dict, config_hash, parse_config
from ..models import model_digest
from ..planning import Plan, Shard, input_changes
from ..run_dir import RunDir
from ..rundir import RunDirError, config_changes, load_run_plan, plan_run, preflight
from .accounting import SchedulerError, read_jobs
from .local import pending_shards, run_local
from .profiles import DEFAULT_PROFILE, ClusterProfile, load_profile, parse_profile

if TYPE_CHECKING:
    from .accounting import Submission

__all__ = ["LaunchError", "LaunchResult", "launch_run", "check_unchanged", "resolve_profile", "cancel_run"]


class LaunchError(RunDirError):
    """The run cannot be launched as asked; nothing was started."""


@dataclasses.dataclass
class LaunchResult:
    """What a launch did: the shards it ran or submitted, and how."""

    run_dir: Path
    profile: ClusterProfile
    shards: list[Shard]
    submissions: list["Submission"] = dataclasses.field(default_factory=list)
    failures: dict[str, str] = dataclasses.field(default_factory=dict)
    warnings: list[str] = dataclasses.field(default_factory=list)

    def describe(self) -> str:
        """A short report for the command line."""
        if self.profile.executor == "local":
            return f"ran {len(self.shards) - len(self.failures)} of {len(self.shards)} pending shard(s) locally"
        if not self.submissions:
            return "nothing to submit: every shard is committed"
        lines = []
        for submission in self.submissions:
            count = sum(len(t) for t in submission.tasks)
            what = (f"{count} shard(s) in {len(submission.tasks)} task(s)" if submission.tasks
                    else f"reduce into results.h5, or resubmit what failed (up to {self.profile.retries} retries)")
            after = f", after {', '.join(submission.depends_on)}" if submission.depends_on else ""
            lines.append(f"  job {submission.job_id} ({submission.stage}): {what}{after}")
        head = f"submitted to SLURM with profile {self.profile.name!r} (logs in {self.submissions[0].log_dir}):"
        tail = (f"follow with `xai-pipeline status {self.run_dir} --watch`; "
                f"jobs are recorded in {RunDir(self.run_dir).jobs}")
        return "\n".join([head, *lines, tail])


def check_unchanged(run_dir: Path, config: ExperimentConfig, plan: Plan) -> None:
    """Refuse a run whose config or model changed since planning; the message lists what changed."""
    problems = []
    current = config_hash(config)
    if current != plan.config_hash:
        launched = read_jobs(run_dir).get("config")
        detail = ""
        if launched is not None:
            try:
                changes = config_changes(parse_config(launched), config)
            except ConfigError:
                changes = []
            detail = "".join(f"\n    {change}" for change in changes)
        problems.append(f"config.yaml changed since planning (config hash {plan.config_hash} -> {current}){detail}")
    digest = model_digest(config.model)
    if digest != plan.model_digest:
        what = f"checkpoint {config.model.checkpoint}" if config.model.checkpoint else "the model description"
        problems.append(f"the model changed since planning ({what}; model digest {plan.model_digest} -> {digest})")
    if problems:
        listed = "\n  ".join(problems)
        raise LaunchError(
            f"{run_dir}: refusing to mix results of different experiments:\n  {listed}\n"
            f"plan the changed experiment into a new folder (or `xai-pipeline plan --overwrite`)"
        )


def resolve_profile(run_dir: Path, profile: str | Path | None, executor: str | None) -> ClusterProfile:
    """The profile file given, else the one of the run's last submission, else the local default;
    ``executor`` (local or slurm) overrides the profile's."""
    if profile is not None:
        chosen = load_profile(profile)
    else:
        recorded = read_jobs(run_dir).get("profile") if Path(run_dir).is_dir() else None
        chosen = parse_profile(recorded, source="jobs.json profile") if recorded else DEFAULT_PROFILE
    if executor is not None and executor != chosen.executor:
        chosen = chosen.model_copy(update={"executor": executor})
    return chosen


def _preflight(config: ExperimentConfig, run_dir: Path) -> float:
    """Run the pre-flight checks; the seconds they took (loading the model and a forward)."""
    started = time.perf_counter()
    try:
        preflight(config, run_dir)
    except Exception as error:  # any failure here would fail every job: report it, submit nothing
        raise LaunchError(f"pre-flight check failed, nothing was started: {type(error).__name__}: {error}") from error
    return time.perf_counter() - started


def time_warning(profile: ClusterProfile, startup_s: float) -> str | None:
    """A warning when start-up plus one forward batch cannot fit before the timeout signal."""
    before_signal = profile.time * 60 - profile.signal_delay_s
    if startup_s < before_signal:
        return None
    return (f"a job has {before_signal} s before its timeout signal (time {profile.time} min minus signal_delay_s "
            f"{profile.signal_delay_s} s), but start-up plus one forward batch took {startup_s:.0f} s in the pre-flight "
            f"check: jobs may be requeued without progress; raise `time` or lower `signal_delay_s`")


def launch_run(
    run_dir: Path,
    profile: ClusterProfile = DEFAULT_PROFILE,
    *,
    force: bool = False,
    check: bool = True,
    progress: bool | None = None,
) -> LaunchResult:
    """Run or submit the run's pending shards (all with ``force``) and the reduce step; the run is
    planned again first when input files changed since planning (see :func:`~pipeline.planning.input_changes`).

    ``check=False`` skips the pre-flight checks (for a run planned a moment ago).
    Locally, the shards run here and :attr:`LaunchResult.failures` lists those that
    failed; the caller reduces. On SLURM, a finish job after the shards reduces or
    retries (see :mod:`pipeline.launching.slurm`).
    """
    run_dir = Path(run_dir).resolve()
    config, plan = load_run_plan(run_dir)
    check_unchanged(run_dir, config, plan)
    if input_changes(run_dir):  # changed input files: their shards get new ids, computed below
        plan = plan_run(config, run_dir, check=False)
    startup_s = _preflight(config, run_dir) if check else 0.0
    if force:
        shards = [s for stage in ("explain", "score") for s in plan.stage(stage)]
    else:
        shards = pending_shards(run_dir, plan)
    result = LaunchResult(run_dir, profile, shards)
    if profile.executor == "local":
        if shards:
            result.failures = run_local(run_dir, progress=progress, force=force)
        return result
    from .slurm import active_job_ids, submit_round

    if not shards and RunDir(run_dir).results.is_file():
        return result
    try:
        active = active_job_ids(run_dir)
    except SchedulerError as error:
        result.warnings.append(f"could not check for jobs of this run still queued or running: {error}")
        active = []
    if active:
        raise LaunchError(
            f"job(s) {', '.join(active)} of {run_dir} are still queued or running: wait for them, "
            f"or `xai-pipeline cancel {run_dir}` first"
        )
    warning = time_warning(profile, startup_s)
    if warning:
        result.warnings.append(warning)
    launch = int(read_jobs(run_dir).get("launch", 0)) + 1
    try:
        result.submissions = submit_round(run_dir, shards, profile, launch=launch, force=force,
                                          config=config_dict(config))
    except SchedulerError as error:
        raise LaunchError(f"submission failed, nothing was submitted and the run folder is as before: {error}") from error
    return result


def cancel_run(run_dir: Path) -> list[str]:
    """Cancel the run's queued and running SLURM jobs; returns their ids."""
    from .slurm import cancel_jobs

    try:
        return cancel_jobs(Path(run_dir))
    except SchedulerError as error:
        raise LaunchError(str(error)) from None
