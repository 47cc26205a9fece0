"""Cluster profiles: where the jobs of a run go, one YAML file each (``jobs/clusters/NAME.yaml``).

Schema (every key optional)::

    executor: slurm            # local (the default: shards run in this process) or slurm
    partition: gpu             # SLURM partition (--partition)
    gpus_per_node: 1           # GPUs per job (--gpus-per-node); 0 asks for none
    cpus_per_task: 8           # --cpus-per-task
    mem: 32G                   # memory per job (--mem), a number with an optional K/M/G/T suffix
    time: 120                  # time limit per job in minutes (--time)
    account: my-project        # --account
    qos: normal                # --qos
    constraint: a100           # --constraint (node features)
    array_parallelism: 64      # tasks of one stage that may run at the same time, across its arrays
    shards_per_task: 4         # shards run one after the other by one array task
    max_array_size: 1000       # the most tasks in one array (default: the cluster's MaxArraySize - 1)
    setup:                     # shell lines run in the job before python starts
      - module load cuda/12.1
    retries: 2                 # times failed or lost shards are resubmitted automatically
    max_timeouts: 3            # times a job may be requeued after reaching its time limit
    max_preemptions: 20        # times a job may be requeued after a preemption or requeue (SIGTERM)
    signal_delay_s: 120        # the job is told to checkpoint this long before its time limit
    checkpoint_every_s: 300    # a sampled shard also saves its progress this often
    job_name: xai              # the jobs' name in the queue
    sbatch: {exclude: node7}   # further sbatch options, passed as they are
    cpu_job:                   # the run's CPU-only job (reduce, or resubmit what failed)
      partition: cpu           # default: the cluster's default partition
      cpus_per_task: 2
      mem: 8G
      time: 60
      gpus_per_node: 0         # no GPU unless asked
      sbatch: {}               # further sbatch options of that job (account and qos are shared)

:func:`load_profile` validates everything at once and raises :class:`ProfileError`
listing every problem; a misspelled key lists the valid keys.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..config import ConfigError, read_yaml, validate_mapping

__all__ = ["ClusterProfile", "CpuJobProfile", "ProfileError", "load_profile", "parse_profile", "DEFAULT_PROFILE"]

_MEMORY = re.compile(r"^[1-9][0-9]*[KMGT]?$")


class ProfileError(ConfigError):
    """A cluster profile that cannot be used; the message lists every problem."""


class CpuJobProfile(BaseModel):
    """Resources of the run's CPU-only job, which reduces the run or resubmits what failed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    partition: str | None = None
    cpus_per_task: int = Field(default=2, ge=1)
    mem: str | None = "8G"
    time: int = Field(default=60, ge=1)
    gpus_per_node: int = Field(default=0, ge=0)
    sbatch: dict[str, str | int | bool] = {}

    @field_validator("mem")
    @classmethod
    def _memory(cls, value: str | None) -> str | None:
        return _check_memory(value)


def _check_memory(value: str | None) -> str | None:
    if value is not None and not _MEMORY.match(value):
        raise ValueError(f"mem must be a positive number with an optional K, M, G or T suffix (e.g. 32G), got {value!r}")
    return value


class ClusterProfile(BaseModel):
    """Where and how the shards of a run are computed (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "local"
    executor: Literal["local", "slurm"] = "local"
    partition: str | None = None
    gpus_per_node: int = Field(default=0, ge=0)
    cpus_per_task: int = Field(default=1, ge=1)
    mem: str | None = None
    time: int = Field(default=60, ge=1)
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    array_parallelism: int = Field(default=64, ge=1)
    shards_per_task: int = Field(default=1, ge=1)
    max_array_size: int | None = Field(default=None, ge=1)
    setup: list[str] = []
    retries: int = Field(default=2, ge=0)
    max_timeouts: int = Field(default=3, ge=0)
    max_preemptions: int = Field(default=20, ge=0)
    signal_delay_s: int = Field(default=120, ge=0, le=65535)
    checkpoint_every_s: float = Field(default=300.0, gt=0)
    job_name: str = "xai"
    sbatch: dict[str, str | int | bool] = {}
    cpu_job: CpuJobProfile = CpuJobProfile()

    @field_validator("mem")
    @classmethod
    def _memory(cls, value: str | None) -> str | None:
        return _check_memory(value)

    @field_validator("job_name")
    @classmethod
    def _job_name(cls, value: str) -> str:
        if not value.strip() or any(c.isspace() for c in value):
            raise ValueError(f"job_name must be a non-empty word without spaces, got {value!r}")
        return value


#: the profile used when none is given: every shard runs in this process
DEFAULT_PROFILE = ClusterProfile()


def parse_profile(raw: object, *, source: str = "profile", name: str = "profile") -> ClusterProfile:
    """Validate a mapping; ``name`` is used when the mapping has no ``name`` key."""
    if raw is None:
        raw = {}
    if isinstance(raw, dict):
        raw = {"name": name, **raw}
    return validate_mapping(ClusterProfile, raw, source, ProfileError)


#: where a profile given by name alone (``--profile slurm-gpu``) is looked up, from the working directory
PROFILE_FOLDER = Path("jobs") / "clusters"


def load_profile(path: str | Path) -> ClusterProfile:
    """Read and validate a cluster profile YAML file; its name defaults to the file's stem. A bare
    name that is not a file (``slurm-gpu``) is ``jobs/clusters/NAME.yaml``."""
    path = Path(path)
    if not path.exists() and path.parent == Path(".") and not path.suffix:
        found = PROFILE_FOLDER / f"{path.name}.yaml"
        if not found.is_file():
            known = ", ".join(sorted(p.stem for p in PROFILE_FOLDER.glob("*.yaml"))) or "(none)"
            raise ProfileError(f"no profile file {path} and no {found}; profiles in {PROFILE_FOLDER}: {known}")
        path = found
    return parse_profile(read_yaml(path, ProfileError), source=str(path), name=path.stem)
