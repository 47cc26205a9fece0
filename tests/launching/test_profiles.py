"""Cluster profiles: the example files, validation messages, defaults and how a profile is chosen."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main
from pipeline.launching.launch import resolve_profile
from pipeline.launching.profiles import DEFAULT_PROFILE, ProfileError, load_profile, parse_profile
from tests.launching.tiny import REPO

CLUSTERS = REPO / "jobs" / "clusters"


def test_example_profiles_load_with_the_values_written_in_them() -> None:
    local = load_profile(CLUSTERS / "local.yaml")
    assert (local.name, local.executor) == ("local", "local")
    gpu = load_profile(CLUSTERS / "slurm-gpu.yaml")
    assert gpu.name == "slurm-gpu"
    assert (gpu.executor, gpu.partition, gpu.gpus_per_node, gpu.cpus_per_task) == ("slurm", "gpu", 1, 8)
    assert (gpu.mem, gpu.time, gpu.account) == ("32G", 120, "my-project")
    assert (gpu.qos, gpu.constraint) == ("normal", "a100|v100")
    assert (gpu.array_parallelism, gpu.shards_per_task, gpu.max_array_size) == (32, 8, 1000)
    assert gpu.setup == ["module load cuda/12.1", "export OMP_NUM_THREADS=8"]
    test_cluster = load_profile(CLUSTERS / "localcluster.yaml")
    assert (test_cluster.executor, test_cluster.partition, test_cluster.gpus_per_node) == ("slurm", "debug", 0)


def test_a_misspelled_key_lists_the_valid_keys(tmp_path: Path) -> None:
    path = tmp_path / "typo.yaml"
    path.write_text("executor: slurm\npartiton: gpu\n")
    with pytest.raises(ProfileError) as caught:
        load_profile(path)
    message = str(caught.value)
    assert str(path) in message
    assert "partiton: unknown key 'partiton'" in message
    assert "valid keys:" in message and "partition" in message.split("valid keys:")[1]
    assert "max_array_size" in message


def test_every_bad_value_is_reported_at_once() -> None:
    raw = {"executor": "pbs", "mem": "32 GB", "time": 0, "shards_per_task": 0, "job_name": "two words"}
    with pytest.raises(ProfileError) as caught:
        parse_profile(raw, source="bad.yaml")
    message = str(caught.value)
    assert message.startswith("bad.yaml: 5 problems")
    for field in ("executor", "mem", "time", "shards_per_task", "job_name"):
        assert f"\n  {field}:" in message, field
    assert "'local' or 'slurm'" in message
    assert "32G" in message  # the memory error shows the expected form


def test_empty_or_missing_profiles() -> None:
    assert parse_profile(None, name="empty") == DEFAULT_PROFILE.model_copy(update={"name": "empty"})
    assert DEFAULT_PROFILE.executor == "local"
    with pytest.raises(ProfileError, match="expected a mapping"):
        parse_profile(["executor", "slurm"])
    with pytest.raises(ProfileError, match="cannot be read"):
        load_profile(Path("/nonexistent/profile.yaml"))


def test_profile_choice_file_then_recorded_then_local(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    assert resolve_profile(run_dir, None, None) == DEFAULT_PROFILE
    assert resolve_profile(run_dir, None, "slurm").executor == "slurm"
    recorded = load_profile(CLUSTERS / "slurm-gpu.yaml")
    (run_dir / "jobs.json").write_text(json.dumps({"submissions": [], "profile": recorded.model_dump(mode="json")}))
    assert resolve_profile(run_dir, None, None) == recorded
    assert resolve_profile(run_dir, CLUSTERS / "local.yaml", None).executor == "local"
    forced = resolve_profile(run_dir, CLUSTERS / "slurm-gpu.yaml", "local")
    assert (forced.executor, forced.partition) == ("local", "gpu")


def test_cli_reports_a_bad_profile_without_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    profile = tmp_path / "bad.yaml"
    profile.write_text(yaml.safe_dump({"executor": "slurm", "gpus": 2}))
    (tmp_path / "run").mkdir()
    assert main(["launch", str(tmp_path / "run"), "--profile", str(profile)]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'gpus'" in err and "gpus_per_node" in err


def test_the_cpu_job_section_asks_for_no_gpu_by_default() -> None:
    gpu = load_profile(CLUSTERS / "slurm-gpu.yaml")
    assert (gpu.cpu_job.partition, gpu.cpu_job.gpus_per_node, gpu.cpu_job.cpus_per_task, gpu.cpu_job.mem) == (
        "cpu", 0, 4, "16G")
    default = parse_profile({"executor": "slurm", "partition": "gpu", "gpus_per_node": 1})
    assert (default.cpu_job.partition, default.cpu_job.gpus_per_node, default.retries) == (None, 0, 2)
    with pytest.raises(ProfileError, match="cpu_job.mem"):
        parse_profile({"cpu_job": {"mem": "lots"}})


def test_launch_warns_when_start_up_cannot_fit_before_the_timeout_signal() -> None:
    from pipeline.launching.launch import time_warning

    profile = parse_profile({"executor": "slurm", "time": 1, "signal_delay_s": 30})
    assert time_warning(profile, 10.0) is None
    warning = time_warning(profile, 45.0)
    assert warning is not None
    assert "30 s before its timeout signal (time 1 min minus signal_delay_s 30 s)" in warning
    assert "took 45 s" in warning


def test_a_profile_is_found_by_name_in_jobs_clusters(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "jobs" / "clusters").mkdir(parents=True)
    (tmp_path / "jobs" / "clusters" / "gpu.yaml").write_text((CLUSTERS / "slurm-gpu.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    profile = resolve_profile(tmp_path / "run", "gpu", None)
    assert profile == load_profile(tmp_path / "jobs" / "clusters" / "gpu.yaml")
    assert profile.name == "gpu" and profile.executor == "slurm"
    with pytest.raises(ProfileError, match=r"no profile file gpu2 and no jobs/clusters/gpu2.yaml; profiles in "
                                           r"jobs/clusters: gpu"):
        load_profile("gpu2")
    with pytest.raises(ProfileError):  # a path is never looked up by name
        load_profile("other/gpu")
