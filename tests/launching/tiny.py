"""The tiny experiment of the launching tests, and switches that make a SLURM job slow or stall.

:class:`SlowShapesNet` is :class:`pipeline.demo_model.ShapesNet` (same weights, same
outputs) whose forward first sleeps as many seconds as the file named by
``$XAI_TEST_SLOW_FILE`` says, while that file exists (a test removes it to make the
jobs fast again).
Importing this module with ``$XAI_TEST_STALL_SHARD`` set makes the commit of that
shard stall forever once its data is written, before the file is renamed into place,
after writing ``<id>.stalled`` beside the shard file: a test can then kill the job mid-write.
Only the first attempt stalls (the marker exists afterwards), so a retry commits the shard.
Jobs import this module through the model factory ``tests.launching.tiny:SlowShapesNet``
(``tests`` must be importable there: :func:`cluster_profile` puts the repository on
``PYTHONPATH`` through the profile's setup lines).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from torch import Tensor

from pipeline.demo_model import ShapesNet
from pipeline.launching.profiles import ClusterProfile, load_profile
from pipeline.run_dir import RunDir, temporary_path
from tests.tiny_experiment import CLASSES, IMAGE_SIZE

__all__ = ["SlowShapesNet", "sleeping_marker", "SLOW_ENV", "STALL_ENV", "REPO", "launch_config", "cluster_profile", "stall_marker"]

SLOW_ENV = "XAI_TEST_SLOW_FILE"
STALL_ENV = "XAI_TEST_STALL_SHARD"
REPO = Path(__file__).resolve().parents[2]


class SlowShapesNet(ShapesNet):
    """ShapesNet whose forward first sleeps the seconds written in ``$XAI_TEST_SLOW_FILE``, if it exists.

    Before sleeping it touches ``<slow file>.<array task id>.sleeping``, so a test knows
    when a task is inside its (slow) work.
    """

    def forward(self, x: Tensor) -> Tensor:
        slow_file = os.environ.get(SLOW_ENV)
        if slow_file:
            try:
                seconds = float(Path(slow_file).read_text())
                sleeping_marker(Path(slow_file), os.environ.get("SLURM_ARRAY_TASK_ID", "0")).touch()
                time.sleep(seconds)
            except (OSError, ValueError):
                pass
        return super().forward(x)


def sleeping_marker(slow_file: Path, task: str) -> Path:
    """The file array task ``task`` touches when it starts a slow forward."""
    return slow_file.with_name(f"{slow_file.name}.{task}.sleeping")


def stall_marker(run_dir: Path, shard_id: str) -> Path:
    """The file a stalled commit writes before it stalls."""
    return RunDir(run_dir).shard(shard_id).with_suffix(".stalled")


def _install_stall(shard_id: str) -> None:
    import pipeline.store as store

    original = store.atomic_write

    def stalling_write(path: Path, data: str | bytes) -> None:
        path = Path(path)
        marker = path.with_suffix(".stalled")
        if path.name == f"{shard_id}.h5" and not marker.exists():
            temporary_path(path).write_bytes(data if isinstance(data, bytes) else data.encode())  # never renamed
            marker.write_text(str(os.getpid()))
            while True:
                time.sleep(60)
        original(path, data)

    store.atomic_write = stalling_write  # type: ignore[assignment]


if os.environ.get(STALL_ENV):
    _install_stall(os.environ[STALL_ENV])


def launch_config(root: Path, checkpoint: Path, *, rise_masks: int = 32, rise_batch: int = 8,
                  samples_per_shard: int = 16, images_per_shard: int = 6, gradcam: bool = True,
                  layer: str = "layer3", first_n: int | None = None) -> dict[str, Any]:
    """Grad-CAM (one layer) and RISE scored with insertion and deletion, on the tiny model
    (on the first ``first_n`` images only, when given: those of the first class, in key order)."""
    methods: list[dict[str, Any]] = []
    if gradcam:
        methods.append({"name": "gradcam", "layers": [layer]})
    methods.append({"name": "rise", "params": {"n_masks": rise_masks, "grid_size": 4, "batch_size": rise_batch}})
    subset = {"subset": {"classes": [CLASSES[0]], "first_n": first_n}} if first_n else {}
    return {
        "name": "launch-tiny",
        "data": {"root": str(root), "image_size": IMAGE_SIZE, **subset},
        "model": {
            "factory": "tests.launching.tiny:SlowShapesNet",
            "kwargs": {"width": 4},
            "num_classes": len(CLASSES),
            "checkpoint": str(checkpoint),
        },
        "methods": methods,
        "metrics": [{"name": "insertion", "params": {"step": 64}}, {"name": "deletion", "params": {"step": 64}}],
        "sharding": {"images_per_shard": images_per_shard, "samples_per_shard": samples_per_shard},
        "device": "cpu",
    }


def cluster_profile(*, env: dict[str, str] | None = None, **changes: Any) -> ClusterProfile:
    """``jobs/clusters/localcluster.yaml`` with ``tests`` importable in the jobs, the variables
    ``env`` exported by its setup lines, and ``changes``."""
    profile = load_profile(REPO / "jobs" / "clusters" / "localcluster.yaml")
    exports = [f"export {name}={value}" for name, value in (env or {}).items()]
    setup = [f"export PYTHONPATH={REPO}${{PYTHONPATH:+:$PYTHONPATH}}", *exports, *profile.setup]
    return profile.model_copy(update={"setup": setup, **changes})
