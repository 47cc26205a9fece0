"""Fixtures of the launching tests: a fake SLURM (sbatch, sacct, scancel, scontrol, srun on PATH) and tiny runs."""
from __future__ import annotations

import dataclasses
import os
import stat
from pathlib import Path
from typing import Any, Callable

import pytest

from pipeline.config import parse_config
from pipeline.rundir import plan_run
from tests.launching.tiny import launch_config
from tests.tiny_experiment import ImageTree

_SBATCH = """#!/bin/bash
# fake sbatch: keeps the script, answers like sbatch (or fails with the message in sbatch-fail-<n>)
n=$(( $(cat "$FAKE_SLURM_DIR/counter" 2>/dev/null || echo 0) + 1 ))
if [[ -f "$FAKE_SLURM_DIR/sbatch-fail-$n" ]]; then
  cat "$FAKE_SLURM_DIR/sbatch-fail-$n" >&2
  exit 1
fi
echo "$n" > "$FAKE_SLURM_DIR/counter"
cp "$1" "$FAKE_SLURM_DIR/sbatch-$n.sh"
echo "Submitted batch job $n"
"""
_SACCT = """#!/bin/bash
# fake sacct: logs its arguments, prints the canned answer (or fails)
echo "$*" >> "$FAKE_SLURM_DIR/sacct-calls"
if [[ -f "$FAKE_SLURM_DIR/sacct-fail" ]]; then
  echo "sacct: error: Problem talking to the database: Connection refused" >&2
  exit 1
fi
cat "$FAKE_SLURM_DIR/sacct-output" 2>/dev/null || true
"""
_SCANCEL = """#!/bin/bash
echo "$*" >> "$FAKE_SLURM_DIR/scancel-calls"
"""
_SCONTROL = """#!/bin/bash
# fake scontrol: `show config` answers MaxArraySize (1001 unless the file max-array-size says)
echo "MaxArraySize            = $(cat "$FAKE_SLURM_DIR/max-array-size" 2>/dev/null || echo 1001)"
"""


@dataclasses.dataclass
class FakeSlurm:
    """The fake scheduler's folder: what it was asked, and what sacct answers."""

    folder: Path

    def scripts(self) -> list[str]:
        """The submitted sbatch scripts, in submission order."""
        count = int((self.folder / "counter").read_text()) if (self.folder / "counter").is_file() else 0
        return [(self.folder / f"sbatch-{n}.sh").read_text() for n in range(1, count + 1)]

    def calls(self, command: str) -> list[str]:
        path = self.folder / f"{command}-calls"
        return path.read_text().splitlines() if path.is_file() else []

    def answer(self, lines: list[str]) -> None:
        """What sacct prints from now on (``JobID|State`` lines)."""
        (self.folder / "sacct-output").write_text("".join(f"{line}\n" for line in lines))

    def fail_sacct(self) -> None:
        (self.folder / "sacct-fail").write_text("")

    def fail_sbatch(self, call: int, message: str) -> None:
        """The ``call``-th sbatch call fails with ``message`` on stderr."""
        (self.folder / f"sbatch-fail-{call}").write_text(message + "\n")

    def max_array_size(self, value: int) -> None:
        """What ``scontrol show config`` says the cluster's MaxArraySize is."""
        (self.folder / "max-array-size").write_text(str(value))


@pytest.fixture
def fake_slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeSlurm:
    """sbatch, sacct, scancel, scontrol and srun scripts first on PATH, recording into a folder."""
    folder = tmp_path / "fake-slurm"
    bin_dir = folder / "bin"
    bin_dir.mkdir(parents=True)
    for name, text in (("sbatch", _SBATCH), ("sacct", _SACCT), ("scancel", _SCANCEL), ("scontrol", _SCONTROL),
                       ("srun", "#!/bin/bash\n")):
        path = bin_dir / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM_DIR", str(folder))
    return FakeSlurm(folder)


@pytest.fixture
def plan_tiny(image_tree: ImageTree, checkpoint: Path, tmp_path: Path) -> Callable[..., Path]:
    """``plan_tiny(name="run", check=True, root=None, **launch_config options)``: the tiny launch experiment
    planned into a new folder (on the shared image tree unless ``root``)."""

    def plan(name: str = "run", check: bool = True, root: Path | None = None, **options: Any) -> Path:
        run_dir = tmp_path / name
        config = launch_config(root or image_tree.root, checkpoint, **options)
        plan_run(parse_config(config), run_dir, check=check)
        return run_dir

    return plan
