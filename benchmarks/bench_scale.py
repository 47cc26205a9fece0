"""Plan, status and reduce at scale: wall time and peak memory of the real CLI commands.

It makes (once, cached) an ImageFolder tree of tiny PNGs with ground-truth maps and
a ShapesNet checkpoint, then times, each as a fresh process running the CLI:

- ``plan`` of every method and metric over ``--images`` images (tens of thousands of shards);
- ``status`` of that run right after planning, and with every shard committed (empty
  HDF5 files with an empty schema): the first call opens and checks every shard file
  once, later calls only stat them (``shards/checked.json``);
- ``reduce`` of runs of ``--reduce-images`` images whose shards are synthesized with
  :func:`pipeline.store.write_shard` in the layout the stages commit, beside the bound:
  reading every shard file once (:func:`pipeline.store.read_shard`, in this process).

Peak memory is the command's own high-water resident size (``os.wait4`` on the child).
It prints one Markdown table (step, wall s, bound/target, ratio, peak MiB).

    python benchmarks/bench_scale.py                                  # 50,000 images; reduce at 2,000 and 8,000
    python benchmarks/bench_scale.py --images 2000 --reduce-images 500,2000   # smoke run
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import h5py
import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.config import load_config  # noqa: E402
from pipeline.planning import Plan, Shard  # noqa: E402
from pipeline.run_dir import RunDir  # noqa: E402
from pipeline.rundir import plan_run  # noqa: E402
from pipeline.store import ShardOutput, read_shard, write_shard  # noqa: E402

IMAGE_SIZE = 32
CLASSES = 10
WIDTH = 4
LAYERS = ["layer1", "layer2", "layer3"]
PLAN_SECONDS, PLAN_MIB, STATUS_SECONDS, REDUCE_RATIO, MEMORY_GROWTH = 10.0, 500.0, 1.0, 2.0, 1.2


# ----------------------------------------------------------------- measuring
@dataclasses.dataclass(frozen=True)
class Measured:
    wall: float
    cpu: float
    peak_mib: float
    output: str


#: runs its arguments as a child and reports the child's rusage: a child forked from this (large)
#: benchmark process would report the parent's resident size as its own peak, so the measured
#: command is forked from this small interpreter instead
_RUSAGE = (
    "import os, sys\n"
    "pid = os.fork()\n"
    "if pid == 0:\n"
    "    os.execvp(sys.argv[1], sys.argv[1:])\n"
    "_, status, usage = os.wait4(pid, 0)\n"
    "print(f'@rusage {usage.ru_maxrss} {usage.ru_utime + usage.ru_stime} {os.waitstatus_to_exitcode(status)}')\n"
)


def measure(command: Sequence[str], repeats: int = 1, before: Callable[[], object] | None = None) -> Measured:
    """Run ``command`` ``repeats`` times, each in a fresh process: best wall and CPU (user + system) time,
    highest peak RSS (of the command's own process)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    walls, cpus, peaks, output = [], [], [], ""
    for _ in range(repeats):
        if before is not None:
            before()
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", _RUSAGE, *command], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
        walls.append(time.perf_counter() - start)
        *lines, report = done.stdout.rstrip("\n").split("\n")
        output = "\n".join(lines)
        _, maxrss, cpu, code = report.split()
        if int(code) != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({code}):\n{output}")
        cpus.append(float(cpu))
        peaks.append(int(maxrss) / 1024)  # KiB on Linux
    return Measured(min(walls), min(cpus), max(peaks), output)


def cli(*args: str | os.PathLike[str]) -> list[str]:
    return [sys.executable, "-m", "pipeline", *map(os.fspath, args)]


# ------------------------------------------------------------------ the data
def _png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def image_tree(cache: Path, count: int, variants: int = 16) -> Path:
    """``cache/tree-<count>``: ``images/<class>/<class>_<i>.png`` (``count`` over :data:`CLASSES` classes)
    and ``gt/<class>/<class>_<i>.png`` for every image; made once (a few distinct PNGs, written as bytes)."""
    base = cache / f"tree-{count}"
    if (base / ".complete").is_file():
        return base
    shutil.rmtree(base, ignore_errors=True)
    rng = np.random.default_rng(0)
    images = [_png(rng.integers(0, 255, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)) for _ in range(variants)]
    maps = [_png(rng.integers(0, 255, (IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)) for _ in range(variants)]
    for index in range(count):
        name = f"class{index % CLASSES}"
        stem = f"{name}_{index // CLASSES:06d}.png"
        for folder, blobs in (("images", images), ("gt", maps)):
            path = base / folder / name / stem
            if index < CLASSES:
                path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(blobs[index % variants])
    (base / ".complete").touch()
    return base


def checkpoint(cache: Path) -> Path:
    """A seeded, untrained ``ShapesNet`` state_dict (made once)."""
    path = cache / f"shapesnet-w{WIDTH}-c{CLASSES}.pt"
    if not path.is_file():
        import torch

        from pipeline.demo_model import ShapesNet

        torch.manual_seed(0)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(ShapesNet(num_classes=CLASSES, width=WIDTH).state_dict(), tmp)
        tmp.replace(path)
    return path


def base_config(tree: Path, weights: Path) -> dict[str, Any]:
    return {
        "data": {"root": str(tree / "images"), "gt_dir": str(tree / "gt"), "image_size": IMAGE_SIZE},
        "model": {"factory": "pipeline.demo_model:ShapesNet", "kwargs": {"width": WIDTH}, "num_classes": CLASSES,
                  "checkpoint": str(weights)},
        "device": "cpu",
    }


def full_config(tree: Path, weights: Path) -> dict[str, Any]:
    """Every method (three layers for CAM methods) and every metric: about 61 shards per 64 images."""
    step = IMAGE_SIZE * IMAGE_SIZE // 32
    cam = {"layers": LAYERS}
    return {
        "name": "bench-scale-plan",
        **base_config(tree, weights),
        "methods": [
            {"name": "rise", "params": {"n_masks": 8000, "grid_size": 4, "batch_size": 200}},
            {"name": "rise-gaussian", "params": {"n_masks": 4000, "grid_size": 4, "batch_size": 200}},
            {"name": "gradcam", **cam},
            {"name": "abscam-init", **cam},
            {"name": "abscam-final", **cam, "params": {"batch_size": 64}},
            {"name": "fem", **cam},
            {"name": "scorecam", **cam, "params": {"batch_size": 64}},
            {"name": "lime", "params": {"n_samples": 5000, "segmentation": "slic", "n_segments": 16, "batch_size": 200}},
            {"name": "extremal", "params": {"iterations": 100, "step": 4, "sigma": 8.0, "areas": [0.1]}},
        ],
        "metrics": [
            {"name": "insertion", "params": {"step": step}},
            {"name": "deletion", "params": {"step": step}},
            {"name": "pcc"},
            {"name": "ssim"},
            {"name": "average_drop"},
            {"name": "average_increase"},
            {"name": "pointing_game", "params": {"tolerance": 2}},
        ],
        "sharding": {"images_per_shard": 64, "samples_per_shard": 1000},
    }


def reduce_config(tree: Path, weights: Path) -> dict[str, Any]:
    """A cheap mix for reduce: Grad-CAM on two layers and RISE in two sample ranges, with insertion and PCC
    over chunks of 16 images (9 shards per chunk)."""
    return {
        "name": "bench-scale-reduce",
        **base_config(tree, weights),
        "methods": [
            {"name": "gradcam", "layers": ["layer2", "layer3"]},
            {"name": "rise", "params": {"n_masks": 2000, "grid_size": 4, "batch_size": 200}},
        ],
        "metrics": [{"name": "insertion", "params": {"step": IMAGE_SIZE * IMAGE_SIZE // 32}}, {"name": "pcc"}],
        "sharding": {"images_per_shard": 16, "samples_per_shard": 1000},
    }


def write_yaml(path: Path, config: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# ---------------------------------------------------------------- the shards
def sync_empty_shards(run: RunDir, plan: Plan) -> int:
    """Make ``run``'s shard folder hold exactly an empty (but whole, with an empty schema) HDF5 file
    per planned shard; returns the count."""
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        f.attrs.update(schema="[]", digest="")
    empty = buffer.getvalue()
    wanted = {s.id for s in plan.shards}
    present = run.committed()
    for shard_id in present - wanted:
        run.shard(shard_id).unlink()
    for shard_id in sorted(wanted):
        path = run.shard(shard_id)
        if not path.is_file() or path.stat().st_size != len(empty):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(empty)
    return len(wanted)


def _fixed(values: np.ndarray) -> np.ndarray:
    return np.round(values * 2.0**40).astype(np.int64)


def synthetic_output(plan: Plan, shard: Shard, curve_points: int) -> ShardOutput:
    """A shard's output in the layout the explain and score stages commit, with random values
    (targets are a function of the image, so the sample ranges of a chunk agree)."""
    start, stop = shard.images
    n = stop - start
    rng = np.random.default_rng(int(shard.id[:12], 16))
    targets = np.array([hash_index(plan, i) for i in range(start, stop)], np.int64)
    output = ShardOutput(
        keys=list(plan.images.keys[start:stop]),
        labels=np.array(plan.images.labels[start:stop], np.int64),
        targets=targets,
        predicted=targets.copy(),
        target_prob=rng.random(n, dtype=np.float32),
        attrs={"shard_id": shard.id, "stage": shard.stage, "method": shard.method, "config_hash": plan.config_hash,
               "model_digest": plan.model_digest, "versions": {"xai_pipeline": "bench"}, "device": "cpu",
               "host": "bench", "wall_time_s": 0.0, "created": time.time()},
    )
    shape = (n, IMAGE_SIZE, IMAGE_SIZE)
    if shard.stage == "score":
        for metric in shard.metrics:
            output.values[metric] = rng.random(n)
            if metric in ("insertion", "deletion"):
                output.curves[metric] = rng.random((n, curve_points), dtype=np.float32)
    elif shard.samples is not None:  # RISE partial sums (int64 fixed point) over the sample range
        count = shard.samples[1] - shard.samples[0]
        output.sums = {"weighted": _fixed(rng.random(shape) * count * 0.5),
                       "count": np.full(n, count, np.int64)}
    else:
        output.maps = {layer: rng.random(shape, dtype=np.float32) for layer in shard.layers}
    return output


def hash_index(plan: Plan, index: int) -> int:
    return (index * 2654435761) % len(plan.class_names)


def reduce_run_dir(cache: Path, count: int, weights: Path) -> tuple[RunDir, Plan]:
    """``cache/runs/reduce-<count>``, planned, with every shard committed (synthesized once)."""
    tree = image_tree(cache, count)
    run = RunDir(cache / "runs" / f"reduce-{count}")
    config_path = write_yaml(run.root.parent / f"reduce-{count}.yaml", reduce_config(tree, weights))
    plan = plan_run(load_config(config_path), run.root, overwrite=True, check=False)
    points = -(-IMAGE_SIZE * IMAGE_SIZE // (IMAGE_SIZE * IMAGE_SIZE // 32)) + 1
    present = run.committed()
    if present and not _readable(run, plan.shards[0]):  # written by an older store format: make them again
        shutil.rmtree(run.shards)
        present = frozenset()
    for shard in plan.shards:
        if shard.id not in present:
            write_shard(run.shard(shard.id), synthetic_output(plan, shard, points))
    return run, plan


def _readable(run: RunDir, shard: Shard) -> bool:
    try:
        read_shard(run.shard(shard.id))
    except Exception:
        return False
    return True


def read_bound(run: RunDir, plan: Plan, repeats: int) -> float:
    """Best time of reading every shard file of ``plan`` once, in this process."""
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        for shard in plan.shards:
            read_shard(run.shard(shard.id))
        best = min(best, time.perf_counter() - start)
    return best


# ---------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "xai-pipeline" / "bench_scale",
                        help="where trees, checkpoint and runs are kept between runs")
    parser.add_argument("--images", type=int, default=50_000, help="images of the plan/status run")
    parser.add_argument("--reduce-images", default="2000,8000",
                        help="comma-separated image counts of the reduce runs (memory is compared first to last)")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per command (best wall time)")
    args = parser.parse_args()
    cache = args.cache.expanduser().resolve()
    reduce_counts = [int(n) for n in args.reduce_images.split(",") if n]
    rows: list[tuple[str, str, str, str, str]] = []

    def row(step: str, result: Measured, bound: str, ratio: str) -> None:
        rows.append((step, f"{result.wall:.2f}", bound, ratio, f"{result.peak_mib:.0f}"))
        print(f"  {step}: {result.wall:.2f} s wall, {result.cpu:.2f} s CPU, peak {result.peak_mib:.0f} MiB",
              file=sys.stderr, flush=True)

    started = time.perf_counter()
    weights = checkpoint(cache)
    tree = image_tree(cache, args.images)
    print(f"tree and checkpoint ready in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    config_path = write_yaml(cache / "runs" / f"plan-{args.images}.yaml", full_config(tree, weights))
    planned = RunDir(cache / "runs" / f"plan-{args.images}")

    result = measure(cli("plan", config_path, "--out", planned), args.repeats,
                     before=lambda: shutil.rmtree(planned.root, ignore_errors=True))  # each from an empty folder
    plan = Plan.read(planned.plan)
    shards = len(plan.shards)
    row(f"plan {args.images:,} images -> {shards:,} shards", result, f"<= {PLAN_SECONDS:g} s, {PLAN_MIB:g} MiB",
        f"{result.wall / PLAN_SECONDS:.2f} (memory {result.peak_mib / PLAN_MIB:.2f})")

    status_target = f"<= {STATUS_SECONDS:g} s"
    result = measure(cli("status", planned), args.repeats)
    row("status, none committed", result, status_target, f"{result.wall / STATUS_SECONDS:.2f}")
    done = RunDir(cache / "runs" / f"status-{args.images}")
    done.root.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(planned.config, done.config)
    shutil.copyfile(planned.plan, done.plan)
    sync_empty_shards(done, plan)
    done.checked.unlink(missing_ok=True)
    result = measure(cli("status", done))
    row(f"status, all {shards:,} committed, first call (opens every shard)", result, "-", "-")
    result = measure(cli("status", done), args.repeats)
    if f"done {len(plan.stage('explain')):6d}" not in result.output:
        raise RuntimeError(f"status does not see every shard committed:\n{result.output}")
    row(f"status, all {shards:,} committed (checked)", result, status_target, f"{result.wall / STATUS_SECONDS:.2f}")

    peaks: list[float] = []
    for count in reduce_counts:
        run, reduce_plan = reduce_run_dir(cache, count, weights)
        bound = read_bound(run, reduce_plan, args.repeats)
        print(f"  read every shard of reduce-{count}: {bound:.2f} s", file=sys.stderr, flush=True)
        result = measure(cli("reduce", run), args.repeats)
        peaks.append(result.peak_mib)
        row(f"reduce {count:,} images, {len(reduce_plan.shards):,} shards", result,
            f"{bound:.2f} s = read every shard; ratio <= {REDUCE_RATIO:g}", f"{result.wall / bound:.2f}")
    if len(peaks) > 1:
        rows.append((f"reduce peak RSS, {reduce_counts[-1]:,} vs {reduce_counts[0]:,} images", "-",
                     f"ratio <= {MEMORY_GROWTH:g}", f"{peaks[-1] / peaks[0]:.2f}", f"{peaks[0]:.0f} -> {peaks[-1]:.0f}"))

    print(f"\n{os.cpu_count()} CPU(s), Python {sys.version.split()[0]}; wall: best of {args.repeats} fresh "
          f"processes; peak: the highest resident size of those processes\n")
    print("| step | wall s | bound/target | ratio | peak MiB |\n| --- | ---: | --- | ---: | ---: |")
    for cells in rows:
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
