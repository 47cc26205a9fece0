"""pipeline.cli: the xai-pipeline command end to end, exit codes and messages."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pandas as pd
import pytest
import yaml

from pipeline.cli import main
from pipeline.config import ConfigError
from pipeline.methods import METHODS
from pipeline.methods.base import MAX_SAMPLES
from pipeline.metrics import BUILTIN_METRICS
from pipeline.planning import Plan
from pipeline.run_dir import RunDir
from pipeline.stages import run_shards
from pipeline.store import read_shard
from tests.tiny_experiment import ConfigFactory, ImageTree, YamlWriter

OUTPUTS = ["results.h5", "metrics.csv", "summary.csv", "summary.md", "summary.tex", "failures.csv"]


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_run_end_to_end_then_again_skipping_every_shard(
    make_config: ConfigFactory, write_yaml: YamlWriter, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_yaml(make_config())
    run_dir = tmp_path / "run"
    assert main(["run", str(config), "--out", str(run_dir), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "planned 12 images: 9 explain and 18 score shards" in out
    assert "Insertion ↑" in out and f"results: {run_dir / 'results.h5'}" in out
    for name in OUTPUTS:
        assert (run_dir / name).is_file(), name
    plan = Plan.read(run_dir / "plan.json")
    shards = _mtimes(run_dir / "shards")
    assert sorted(shards) == sorted(f"{s.id}.h5" for s in plan.shards)
    with h5py.File(run_dir / "results.h5", "r") as f:
        assert f["images/keys"].shape == (12,) and not f["images/failed"][()].any()
    assert len(pd.read_csv(run_dir / "metrics.csv")) == 12 * 3 * 3

    assert main(["run", str(config), "--out", str(run_dir), "--no-progress"]) == 0
    assert _mtimes(run_dir / "shards") == shards
    assert "planned 12 images" in capsys.readouterr().out


def test_a_bad_config_exits_with_2_and_a_clear_message(
    make_config: ConfigFactory, write_yaml: YamlWriter, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = make_config()
    raw["sharding"]["images_per_shard"] = 0
    raw["methods"][1]["params"]["n_mask"] = 10
    config = write_yaml(raw, "bad.yaml")
    run_dir = tmp_path / "run"
    assert main(["run", str(config), "--out", str(run_dir)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert lines[0] == f"error: {config}: 2 problems"
    assert "sharding.images_per_shard: Input should be greater than or equal to 1 (got 0)" in captured.err
    assert "methods[1]: method 'rise' has no parameter n_mask; valid parameters:" in captured.err
    assert "Traceback" not in captured.err
    assert not run_dir.exists()
    assert main(["plan", str(tmp_path / "absent.yaml"), "--out", str(run_dir)]) == 2
    assert "absent.yaml: cannot be read" in capsys.readouterr().err
    with pytest.raises(ConfigError):
        main(["--traceback", "plan", str(config), "--out", str(run_dir)])


def test_a_bad_parameter_value_fails_the_plan_with_2_naming_its_field(
    make_config: ConfigFactory, write_yaml: YamlWriter, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = make_config()
    raw["methods"][1]["params"]["p1"] = 1.5
    raw["metrics"][0]["params"]["step"] = 0
    run_dir = tmp_path / "run"
    assert main(["plan", str(write_yaml(raw)), "--out", str(run_dir)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [
        "error: 2 bad parameter values:",
        "  methods[1].params.p1: p1 should be less than or equal to 1, got 1.5",
        "  metrics[0].params.step: step should be greater than or equal to 1, got 0",
    ]
    assert not run_dir.exists()


def test_another_configs_folder_needs_overwrite(
    make_config: ConfigFactory, write_yaml: YamlWriter, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    assert main(["plan", str(write_yaml(make_config(), "a.yaml")), "--out", str(run_dir)]) == 0
    raw = make_config()
    raw["seed"] = 9
    other = write_yaml(raw, "b.yaml")
    capsys.readouterr()
    assert main(["plan", str(other), "--out", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "holds the run of another config" in err and "seed: 0 -> 9" in err
    assert main(["plan", str(other), "--out", str(run_dir), "--overwrite"]) == 0


def test_failing_shards_exit_with_1(
    make_config: ConfigFactory, write_yaml: YamlWriter, tree_copy: ImageTree, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    raw = make_config(root=tree_copy.root, gt_dir=tree_copy.gt_dir)
    raw["methods"] = raw["methods"][:1]
    raw["metrics"] = [{"name": "pcc"}]
    config = write_yaml(raw)
    run_dir = tmp_path / "run"
    assert main(["plan", str(config), "--out", str(run_dir)]) == 0
    plan = Plan.read(run_dir / "plan.json")
    last = [s.id for s in plan.stage("explain") if s.images == (10, 12)]
    assert run_shards(run_dir, last, progress=False) == {}
    damaged = plan.records[11]
    before = damaged.path.stat()  # explained, but no longer readable for scoring; its size and time are
    damaged.path.write_bytes(b"\0" * before.st_size)  # kept, so its stamp does not change and nothing is re-planned
    os.utime(damaged.path, ns=(before.st_atime_ns, before.st_mtime_ns))
    capsys.readouterr()
    assert main(["run", str(config), "--out", str(run_dir), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "2 shard(s) failed:" in err  # the two layers' score shards of the last chunk
    assert f"images that were explained can no longer be read: cannot read image {damaged.path}" in err
    assert "xai-pipeline status" in err
    assert not (run_dir / "results.h5").exists()
    assert main(["status", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "score    done      4  running      0  pending      0  failed      2" in out
    assert "[data] images that were explained can no longer be read" in out


def test_status_and_reduce_commands(run_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", str(run_copy)]) == 0
    assert "finished: results in" in capsys.readouterr().out
    (run_copy / "results.h5").unlink()
    assert main(["reduce", str(run_copy), "--no-progress"]) == 0
    assert (run_copy / "results.h5").is_file()
    plan = Plan.read(run_copy / "plan.json")
    RunDir(run_copy).shard(plan.shards[0].id).unlink()
    capsys.readouterr()
    assert main(["reduce", str(run_copy)]) == 2
    assert f"1 of {len(plan.shards)} shards are not committed" in capsys.readouterr().err
    assert main(["status", str(run_copy / "absent")]) == 2
    assert "plan the run first" in capsys.readouterr().err


def test_a_bad_layer_exits_with_2(
    make_config: ConfigFactory, write_yaml: YamlWriter, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = make_config()
    raw["methods"][0]["layers"] = ["layer9"]
    assert main(["plan", str(write_yaml(raw)), "--out", str(tmp_path / "run")]) == 2
    assert "unknown layer 'layer9'" in capsys.readouterr().err


def test_python_dash_m_pipeline_help() -> None:
    result = subprocess.run([sys.executable, "-m", "pipeline", "--help"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: xai-pipeline")
    for command in ("plan", "run", "reduce", "status", "demo"):
        assert command in result.stdout


def test_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["run", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--out" in out and "--overwrite" in out
    with pytest.raises(SystemExit) as exit_:
        main(["frobnicate"])
    assert exit_.value.code == 2 and "invalid choice" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["run", "config.yaml"])  # --out is required
    assert exit_.value.code == 2 and "--out" in capsys.readouterr().err


def test_reduce_by_class_groups_the_summary_by_class(run_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["reduce", str(run_copy), "--by-class", "--no-progress"]) == 0
    summary = pd.read_csv(run_copy / "summary.csv")
    metrics = pd.read_csv(run_copy / "metrics.csv", keep_default_na=False, na_values=[""])
    expected = metrics.dropna(subset=["value"]).groupby(["method", "layer", "class_name", "metric"]).size()
    assert len(summary) == len(expected)
    assert set(summary["class_name"]) == set(metrics["class_name"])
    assert "class_name" in capsys.readouterr().out


def test_compare_command_writes_the_comparison(run_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", str(run_copy)]) == 0
    assert "comparison.csv" in capsys.readouterr().out
    table = pd.read_csv(run_copy / "comparison.csv", keep_default_na=False)
    # gradcam on layer2 and layer3 against rise (no layers) in each layer's group
    assert sorted(set(zip(table["layer"], table["method_a"], table["method_b"]))) == [
        ("layer2", "gradcam", "rise"), ("layer3", "gradcam", "rise"),
    ]
    assert set(table["metric"]) == {"insertion", "deletion", "pcc"}
    assert (run_copy / "comparison.md").read_text().startswith("# Method comparison")


def test_update_reuses_the_shards_a_changed_config_still_plans(
    make_config: ConfigFactory, write_yaml: YamlWriter, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    assert main(["run", str(write_yaml(make_config(), "a.yaml")), "--out", str(run_dir), "--no-progress"]) == 0
    before = Plan.read(run_dir / "plan.json")
    gradcam = {s.id: RunDir(run_dir).shard(s.id).stat().st_mtime_ns for s in before.shards if s.method == "gradcam"}
    raw = make_config()
    raw["methods"][1]["params"]["n_masks"] = 32  # only RISE changes
    changed = write_yaml(raw, "b.yaml")
    capsys.readouterr()
    assert main(["run", str(changed), "--out", str(run_dir), "--no-progress"]) == 2
    assert "--update" in capsys.readouterr().err
    assert main(["run", str(changed), "--out", str(run_dir), "--no-progress", "--update"]) == 0
    out = capsys.readouterr().out
    assert f"({len(gradcam)} already committed)" in out
    rise = {s.id for s in before.shards if s.method != "gradcam"}
    after = Plan.read(run_dir / "plan.json")
    added = [s for s in after.shards if s.method != "gradcam"]
    assert f"re-planned shards: {len(gradcam)} kept, {len(added)} added, {len(rise)} dropped" in out
    assert sorted(p.name for p in RunDir(run_dir).dropped.iterdir()) == sorted(f"{i}.h5" for i in rise)
    assert {s.id for s in after.shards if s.method == "gradcam"} == set(gradcam)
    assert {i: RunDir(run_dir).shard(i).stat().st_mtime_ns for i in gradcam} == gradcam  # not computed again
    assert all(RunDir(run_dir).shard(s.id).is_file() for s in after.shards)
    assert (run_dir / "results.h5").is_file()


def test_a_second_command_on_a_folder_in_use_is_refused(
    make_config: ConfigFactory, write_yaml: YamlWriter, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    config = write_yaml(make_config())
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pipeline.run_dir import RunDir\n"
         f"with RunDir({str(run_dir)!r}).locked():\n    print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        assert main(["plan", str(config), "--out", str(run_dir)]) == 2
        err = capsys.readouterr().err
        assert f"is in use by another xai-pipeline command (pid {holder.pid} on host" in err
        assert not (run_dir / "plan.json").exists()
    finally:
        holder.kill()
        holder.wait()
    assert main(["plan", str(config), "--out", str(run_dir)]) == 0  # the dead holder's lock is taken over
    assert not (run_dir / ".lock").exists()  # released when the command ended


def test_ctrl_c_says_what_is_committed_and_how_to_continue(
    make_config: ConfigFactory, write_yaml: YamlWriter, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipeline.launching.local as local

    run_dir = tmp_path / "run"

    def interrupted(*args: object, **kwargs: object) -> dict[str, str]:
        plan = Plan.read(run_dir / "plan.json")
        run_shards(run_dir, [s.id for s in plan.stage("explain")[:2]], progress=False)
        raise KeyboardInterrupt

    monkeypatch.setattr(local, "run_local", interrupted)
    monkeypatch.setattr("pipeline.launching.launch.run_local", interrupted)
    assert main(["run", str(write_yaml(make_config())), "--out", str(run_dir), "--no-progress"]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"interrupted: 2 shard(s) are committed in {run_dir} (and the samples done" in err
    assert "run the same command again" in err


def test_sigterm_stops_like_ctrl_c_and_saves_the_samples_done(
    make_config: ConfigFactory, write_yaml: YamlWriter, tmp_path: Path
) -> None:
    raw = make_config()
    raw["methods"] = [{"name": "gradcam", "layers": ["layer3"]},
                      {"name": "rise", "params": {"n_masks": 40000, "grid_size": 4, "batch_size": 10}}]
    raw["sharding"] = {"images_per_shard": 40, "samples_per_shard": 40000}
    config, run_dir = write_yaml(raw), tmp_path / "run"
    command = [sys.executable, "-m", "pipeline", "run", str(config), "--out", str(run_dir), "--no-progress"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    try:
        deadline = time.monotonic() + 120
        while not RunDir(run_dir).committed() and time.monotonic() < deadline:  # Grad-CAM's shard first
            time.sleep(0.2)
        time.sleep(8)  # inside RISE's shard, some forward batches done
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130 and "Traceback" not in err
    assert f"interrupted: 1 shard(s) are committed in {run_dir} (and the samples done" in err
    rise = Plan.read(run_dir / "plan.json").stage("explain")[1]
    saved = read_shard(RunDir(run_dir).checkpoint(rise.id))
    assert 0 < saved.attrs["next_sample"] < 40000  # the samples done, not lost
    assert not (run_dir / ".lock").exists()


def test_layers_lists_candidate_layers_with_shapes_and_the_default(
    make_config: ConfigFactory, write_yaml: YamlWriter, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["layers", str(write_yaml(make_config()))]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("layers of the model for 32x32 images (shapes per image):")
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert rows["layer3"][1:] == ["(default)", "Sequential", "16", "x", "4", "x", "4", "16", "x", "4", "x", "4"]
    assert "fc" not in rows and "layer2.0.conv1" in rows


def test_plan_update_prints_what_it_kept_added_and_dropped(
    run_copy: Path, write_yaml: YamlWriter, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = yaml.safe_load((run_copy / "config.yaml").read_text())
    raw["metrics"] = [m for m in raw["metrics"] if m["name"] != "pcc"]
    config = write_yaml(raw)
    assert main(["plan", str(config), "--out", str(run_copy), "--delete-dropped"]) == 2
    assert "--delete-dropped goes with --update" in capsys.readouterr().err
    assert main(["plan", str(config), "--out", str(run_copy), "--update"]) == 0
    out = capsys.readouterr().out
    # three chunks of 13 images; Grad-CAM on two layers; RISE in two sample ranges per chunk:
    # explain 3 + 6 and insertion/deletion 6 + 3 are kept, the 6 + 3 PCC shards dropped
    assert "re-planned shards: 18 kept, 0 added, 9 dropped" in out
    assert "  score gradcam: pcc: 0 kept, 0 added, 6 dropped" in out
    assert "  score rise: pcc: 0 kept, 0 added, 3 dropped" in out
    assert "  explain rise: 6 kept, 0 added, 0 dropped" in out
    assert f"the files of the dropped shards: moved to {run_copy / 'shards' / 'dropped'}, never read again" in out
    assert len(list((run_copy / "shards" / "dropped").iterdir())) == 9


def _rows(out: str, heading: str) -> dict[str, list[str]]:
    """The parameter rows printed under the line starting with ``heading``: name -> cells."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading)) + 2  # past the column titles
    rows = {}
    for line in lines[start:]:
        if not line.startswith("  ") or line.strip() == "(no parameters)":
            break
        cells = re.split(r"\s{2,}", line.strip())
        rows[cells[0]] = cells
    return rows


def test_methods_lists_every_method_with_its_parameters(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in METHODS:
        assert re.search(rf"^{re.escape(name)}[ :(]", out, re.MULTILINE), name
    rise = _rows(out, "rise:")
    assert rise["n_masks"] == ["n_masks", "int", "4000", f"[1, {MAX_SAMPLES}]", "masks", "masks drawn per image"]
    assert rise["p1"] == ["p1", "float", "0.5", "(0, 1]", "probability that a grid cell is kept"]
    assert list(_rows(out, "gradcam (CAM")) == ["layer", "reshape"]
    assert _rows(out, "gradcam (CAM")["layer"][2] == "(required)"
    extremal = _rows(out, "extremal:")
    assert extremal["sigma"][1:5] == ["float", "21", "> 0", "pixels"] and "224 px" in extremal["sigma"][5]
    assert extremal["area_mode"][3] == "one of torchray, margin, image"
    assert "captum:NAME and grad-cam:NAME" in out


def test_metrics_lists_every_metric_and_named_plugins(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["metrics"]) == 0
    out = capsys.readouterr().out
    for name in BUILTIN_METRICS:
        assert re.search(rf"^{name} \(", out, re.MULTILINE), name
    assert _rows(out, "insertion (Insertion ↑; needs the model)")["step"] == [
        "step", "int", "224", ">= 1", "pixels", "pixels changed per step of the curve"]
    assert _rows(out, "average_drop (")["top_percent"][1:5] == ["float | None", "None", "(0, 100]", "%"]
    assert "pcc (PCC ↑; needs ground truth)" in out and "(no parameters)" in out
    assert main(["metrics", "tests.plugin_example:sparsity"]) == 0
    assert _rows(capsys.readouterr().out, "tests.plugin_example:sparsity")["quantile"] == ["quantile", "float", "0.9"]
    assert main(["methods", "tests.plugin_example:Occlusion"]) == 0
    assert list(_rows(capsys.readouterr().out, "tests.plugin_example:Occlusion")) == ["n_samples", "seed", "batch_size"]
    assert main(["methods", "rsie"]) == 2
    assert "unknown method 'rsie'; known methods: rise" in capsys.readouterr().err
