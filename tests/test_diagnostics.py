"""pipeline.diagnostics: warnings of a real run in warnings.md, the command's output and exit status, the report."""
from __future__ import annotations

from pathlib import Path

import pytest

import pipeline.stages.context as context_module
from pipeline.analysis import write_report
from pipeline.cli import main
from pipeline.config import parse_config
from pipeline.rundir import plan_run
from pipeline.stages import ShardRunner, reduce_run, run_shards
from tests.tiny_experiment import ConfigFactory, FinishedRun, YamlWriter


def test_degenerate_maps_constant_metrics_and_missing_ground_truth_are_reported(
    make_config: ConfigFactory, write_yaml: YamlWriter, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = make_config(gt_dir=None)  # PCC asked for, no ground truth
    raw["model"]["factory"] = "tests.tiny_experiment:ConstantLogitsNet"  # constant Grad-CAM maps
    rise = raw["methods"][1]
    raw["methods"] = [raw["methods"][0], dict(rise, id="rise_a"), dict(rise, id="rise_b")]
    run_dir = tmp_path / "run"
    assert main(["run", str(write_yaml(raw)), "--out", str(run_dir), "--no-progress"]) == 1
    out = capsys.readouterr().out
    warnings = (run_dir / "warnings.md").read_text()
    assert out.index("## Warnings") > out.index("## Mean ± variance")
    lines = [line for line in warnings.splitlines() if line.startswith("- ")]
    assert all(line in out for line in lines)
    for layer in ("layer2", "layer3"):
        line = next(line for line in lines if line.startswith(f"- gradcam / {layer}:"))
        assert "12 of 12 saliency maps are degenerate (is constant)" in line
        assert "`alpha/alpha_00`" in line and "and 2 more (failures.csv)" in line
    assert "- every saliency map of gradcam is degenerate: check the method and its layers" in lines
    # both RISE entries see one probability per class whatever is inserted: 1/3 everywhere
    assert "- Insertion ↑ is 0.3333 for every method and layer with a value: it does not tell them apart" in warnings
    assert "Insertion ↑ (same for all)" in (run_dir / "summary.md").read_text()
    assert "- PCC ↑ needs ground-truth maps, but no image of this run has one" in warnings
    assert main(["reduce", str(run_dir), "--no-progress"]) == 1  # again: same warnings, same status
    write_report(run_dir, progress=False)
    page = (run_dir / "report" / "index.html").read_text()
    assert '<section id="warnings"><h2>Warnings</h2>' in page and "every saliency map of gradcam" in page


def test_a_healthy_run_warns_of_nothing_and_exits_zero(finished_run: FinishedRun) -> None:
    assert (finished_run.run_dir / "warnings.md").read_text() == "## Warnings\n\nNo warnings.\n"


def test_sample_ranges_of_one_chunk_computed_with_different_batches_are_reported(
    make_config: ConfigFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two workers whose ``batch_size: auto`` chose differently for one chunk: warnings.md says the
    maps are not bit for bit a single run's."""
    raw = make_config()
    raw["methods"] = [{"name": "rise", "params": {"n_masks": 64, "grid_size": 4, "batch_size": "auto"}}]
    run_dir = tmp_path / "run"
    plan = plan_run(parse_config(raw), run_dir)
    first, second = [s for s in plan.stage("explain") if s.images == plan.chunks()[0]]
    for shard, batch in ((first, 5), (second, 160)):  # one sample, then 32 samples, per image and forward
        monkeypatch.setattr(context_module, "choose_batch_size", lambda *_args, batch=batch: (batch, "test"))
        ShardRunner(run_dir).run(shard.id)
    monkeypatch.undo()
    assert run_shards(run_dir, [s.id for s in plan.shards], progress=False) == {}
    result = reduce_run(run_dir, progress=False)
    lines = [line for line in result.warnings.lines if line.startswith("rise:")]
    assert lines == [line.removeprefix("- ") for line in (run_dir / "warnings.md").read_text().splitlines()
                     if line.startswith("- rise:")]
    assert len(lines) == 1 and "1 image chunk(s)" in lines[0] and "(cpu batch 160, cpu batch 5)" in lines[0]
    assert "not bit for bit" in lines[0]
