"""A run folder: planning into it, guarding it, and checking a run before it starts.

:func:`plan_run` writes ``config.yaml`` (the resolved config, default CAM layers filled in) and ``plan.json``.
A folder that holds another config's run is refused (the message lists what
changed) unless ``update`` is given, which keeps the shards the new plan still has and
moves the files of those it no longer plans to ``shards/dropped/`` (or deletes them,
``delete_dropped``), or ``overwrite``, which clears its shards and results.
:func:`replan_changes` counts what a re-plan kept, added and dropped. Planning the same config again
takes changed input files into account (new ids for the shards that read them, see
:mod:`pipeline.planning`); without ``update`` the files of superseded shards are left in
``shards/`` (unused, and used again if the inputs change back).
:func:`preflight` checks on the submitting machine what would otherwise fail on
every node: the model and checkpoint load, the layers exist and give grids, every
method and metric entry accepts its parameter values (:func:`~pipeline.checks.check_entries`),
the data is readable (one of the first :data:`PREFLIGHT_IMAGES` images reads: an unreadable or
truncated one is recorded as a failure at run time, not here), the folder is writable; then it
times one forward (and backward) batch of the model on the configured device
(:func:`~pipeline.throughput.time_model`). :func:`plan_run` turns that into the cost estimate
of the plan (:mod:`pipeline.cost`), written to ``cost.json``.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

from .checks import check_class_count, check_entries, check_layers, with_default_layers
from .config import ExperimentConfig, config_dict, config_hash, load_config, save_config
from .cost import Throughput, UnitCosts, estimate_cost, read_estimate, unit_costs
from .data import DataError, ImageSet, discover_images, load_data_image
from .errors import PipelineError
from .models import build_model, model_digest
from .planning import Plan, Shard, make_plan
from .run_dir import RunDir
from .throughput import time_model

__all__ = [
    "RunDirError",
    "PreflightError",
    "Preflight",
    "Replan",
    "plan_run",
    "preflight",
    "config_changes",
    "load_run_plan",
    "replan_changes",
]


class RunDirError(PipelineError, RuntimeError):
    """The run folder cannot be used as asked."""


class PreflightError(RunDirError, ValueError):
    """A check before the run failed; the message names the item."""


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(data, list) and data and all(isinstance(x, dict) for x in data):
        out = {}
        for index, value in enumerate(data):
            out.update(_flatten(value, f"{prefix}[{index}]"))
        return out
    return {prefix: data}


def config_changes(old: ExperimentConfig, new: ExperimentConfig) -> list[str]:
    """Human-readable differences between two configs, one per changed field."""
    before, after = _flatten(config_dict(old)), _flatten(config_dict(new))
    return [
        f"{key}: {before.get(key, '(absent)')!r} -> {after.get(key, '(absent)')!r}"
        for key in sorted(set(before) | set(after))
        if before.get(key) != after.get(key)
    ]


#: how many images (the first) the pre-flight tries before it says the data is unreadable
PREFLIGHT_IMAGES = 8


def _one_image_reads(images: ImageSet, config: ExperimentConfig) -> None:
    """Return at the first of the first :data:`PREFLIGHT_IMAGES` images that reads; raise if none does."""
    errors = []
    for record in images.records[:PREFLIGHT_IMAGES]:
        try:
            load_data_image(record.path, config.data)
            return
        except DataError as error:
            errors.append(str(error))
    raise DataError(f"none of the first {len(errors)} image(s) can be read (the first: {errors[0]}); "
                    "check data.root / data.manifest")


@dataclasses.dataclass(frozen=True)
class Preflight:
    """What the pre-flight found: the images, each method's and metric's work per image, and the
    model's speed on the configured device (``None`` when it is not available here)."""

    images: ImageSet
    units: UnitCosts
    throughput: Throughput | None


def preflight(config: ExperimentConfig, run_dir: Path, images: ImageSet | None = None) -> Preflight:
    """Fail early, naming the item, if the run cannot work, then time the model (see module docstring)."""
    images = images or discover_images(config.data)
    _one_image_reads(images, config)
    model = build_model(config.model)
    check_entries(config, model)
    channels = check_layers(config, model)
    run_dir.mkdir(parents=True, exist_ok=True)
    probe_file = run_dir / f".write-test-{os.getpid()}"
    try:
        probe_file.write_text("ok")
        probe_file.unlink()
    except OSError as error:
        raise RunDirError(f"run folder {run_dir} is not writable: {error.strerror}") from None
    units = unit_costs(config, channels, model)
    return Preflight(images, units, time_model(model, config, backwards=units.needs_backwards()))


def load_run_plan(run_dir: Path) -> tuple[ExperimentConfig, Plan]:
    """The config and plan saved in a run folder."""
    folder = RunDir(run_dir)
    if not folder.plan.is_file():
        raise RunDirError(f"{run_dir} holds no planned run (no {folder.plan.name}); run `xai-pipeline plan` first")
    return load_config(folder.config), Plan.read(folder.plan)


def _clear(folder: RunDir) -> None:
    shutil.rmtree(folder.shards, ignore_errors=True)
    for path in (folder.plan, folder.config, *folder.outputs()):
        path.unlink(missing_ok=True)


def plan_run(config: ExperimentConfig, run_dir: Path, *, overwrite: bool = False, update: bool = False,
             check: bool = True, hash_inputs: bool | None = None, delete_dropped: bool = False) -> Plan:
    """Plan ``config`` into ``run_dir`` (after the pre-flight checks unless ``check=False``).

    A folder holding another config's run is refused, unless ``update`` (the committed
    shards whose ids the new plan keeps are reused: a method entry that did not change
    keeps its shards; the files of shards no longer planned are moved to ``shards/dropped/``,
    or deleted with ``delete_dropped``; the results and tables are removed) or ``overwrite`` (everything
    is deleted). ``hash_inputs`` fingerprints the inputs by their SHA-256 instead of size
    and time; ``None`` keeps the way of the folder's plan (size and time for a new one).
    """
    folder = RunDir(run_dir)
    config = with_default_layers(config)
    if folder.config.is_file():
        previous = load_config(folder.config)
        if config_hash(previous) != config_hash(config):
            if not (overwrite or update):
                changes = "\n  ".join(config_changes(previous, config))
                raise RunDirError(
                    f"{run_dir} holds the run of another config; use a new folder, --update (which keeps "
                    f"the shards the new config still plans) or --overwrite (which deletes every result). "
                    f"Changes:\n  {changes}"
                )
            if overwrite:
                _clear(folder)
            else:
                for path in folder.outputs():
                    path.unlink(missing_ok=True)
    if hash_inputs is None:
        hash_inputs = folder.plan.is_file() and Plan.read(folder.plan).fingerprint == "sha256"
    images = discover_images(config.data, hash_inputs=hash_inputs)
    check_class_count(config, images)
    checked = preflight(config, folder.root, images) if check else None
    plan = make_plan(config, images, model_digest(config.model))
    folder.shards.mkdir(parents=True, exist_ok=True)
    save_config(config, folder.config)
    plan.write(folder.plan)
    if update:
        files = folder.scan()
        planned = {s.id for s in plan.shards}
        for shard_id in (files.committed | files.checkpoints | files.errors) - planned:
            folder.drop(shard_id, delete=delete_dropped)
    _write_cost(folder, plan, checked)
    return plan


def _write_cost(folder: RunDir, plan: Plan, checked: Preflight | None) -> None:
    """Write the plan's cost estimate: from the pre-flight, else from the folder's last estimate of the
    same config (a re-plan for changed input files); an estimate that no longer applies is removed."""
    if checked is not None:
        units, throughput = checked.units, checked.throughput
    else:
        previous = read_estimate(folder.cost, plan.config_hash)
        if previous is None:
            folder.cost.unlink(missing_ok=True)
            return
        units, throughput = previous.units, previous.throughput
    estimate_cost(plan, units, throughput, folder.committed()).write(folder.cost)


def _group(shard: Shard) -> str:
    return f"{shard.stage} {shard.method}" + (f": {', '.join(shard.metrics)}" if shard.metrics else "")


@dataclasses.dataclass(frozen=True)
class Replan:
    """What planning into a folder did to its shards, counted per group (``explain METHOD`` or
    ``score METHOD: metrics``): ``kept``: committed and still planned; ``added``: planned and not in
    the previous plan; ``dropped``: committed and no longer planned (``earlier plans`` when the
    previous plan did not have them either)."""

    kept: Counter[str]
    added: Counter[str]
    dropped: Counter[str]

    def describe(self) -> list[str]:
        """A line of totals, then one line per group that changed or kept work."""
        groups = sorted(set(self.kept) | set(self.added) | set(self.dropped))
        totals = [f"{sum(counts.values())} {what}" for what, counts in
                  (("kept", self.kept), ("added", self.added), ("dropped", self.dropped))]
        return [f"shards: {', '.join(totals)}"] + [
            f"  {group}: {self.kept[group]} kept, {self.added[group]} added, {self.dropped[group]} dropped"
            for group in groups
        ]


def replan_changes(before: Plan | None, after: Plan, committed: Iterable[str]) -> Replan:
    """The :class:`Replan` of planning ``after`` into a folder that held plan ``before`` (None: none)
    and the ``committed`` shards (as they were before planning)."""
    previous = {s.id: s for s in before.shards} if before else {}
    planned = {s.id for s in after.shards}
    committed = set(committed)
    return Replan(
        Counter(_group(s) for s in after.shards if s.id in committed),
        Counter(_group(s) for s in after.shards if s.id not in previous),
        Counter(_group(previous[i]) if i in previous else "earlier plans" for i in committed - planned),
    )
