"""Speed of every method, of Insertion/Deletion and of whole shards against the model's own throughput.

One script for both kinds of machine (``--device cpu`` or ``cuda``: the same code, only the
device differs). It prints three tables, each ratio beside its target:

- perturbation methods (RISE, Gaussian RISE, LIME, Score-CAM, Abs-CAM Final) and Insertion,
  Deletion: maps per second and the ratio of their time to the same number of plain model
  forwards at the same batch size (a perturbation method costs its forwards: target <= 1.1),
  with the peak memory (CUDA: allocated; CPU: the process's high-water resident size);
  RISE and LIME again at twice the samples (4000 and 8000 masks on a GPU), whose peak must stay within 10%;
- single-pass CAM methods (every registered CAM method that declares one forward per image:
  Grad-CAM, Abs-CAM Init, FEM, ...) on a batch of ``--shard-images`` images, in images per
  second beside the model doing the work the method declares (:meth:`Explainer.cost`: a
  forward, and a backward of the top logit to the input when the method needs gradients) on
  the same batch; ratio = model images/s over method images/s, target <= 1.1;
- whole explain shards (Grad-CAM) and whole score shards (Insertion + Deletion) of
  ``--shard-images`` PNG and JPEG files each, written to a temporary folder, planned and run by
  the pipeline's own :class:`~pipeline.stages.ShardRunner`, ``--shards`` of each stage in a row
  as a worker runs them (decoding ahead in loader processes, and the HDF5 commits, included), in
  images per second beside the model doing the method's or the metrics' declared work; share =
  shard images/s over model images/s, target >= 0.80.

    python benchmarks/bench_methods.py                      # CPU-sized defaults
    python benchmarks/bench_methods.py --size 64 --masks 400 --images 2 --repeats 1   # a quick CPU check
    python benchmarks/bench_methods.py --device cuda --arch resnet50 --size 224 --masks 4000 --images 8 --shard-images 64
"""
from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torchvision
from PIL import Image
from torch import nn

from pipeline.config import parse_config
from pipeline.cost import Work, unit_costs
from pipeline.methods import METHODS, CamExplainer, build_method, method_class, method_parameters
from pipeline.metrics import deletion, insertion
from pipeline.rundir import plan_run
from pipeline.stages import ShardRunner

#: the targets printed beside the ratios (issue 13)
TIME_RATIO_TARGET = 1.1
SHARD_SHARE_TARGET = 0.80
MEMORY_GROWTH_TARGET = 1.1


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, function: Callable[[], object], repeats: int = 1) -> float:
    """Best wall time of ``repeats`` calls (after one warm-up call)."""
    function()
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        function()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def in_batches(step: Callable[[torch.Tensor], object], batch: torch.Tensor, rows: int) -> Callable[[], None]:
    """A call of ``step`` on ``rows`` rows of ``batch``: whole batches, then the rest."""
    full, rest = divmod(rows, len(batch))

    def run() -> None:
        for _ in range(full):
            step(batch)
        if rest:
            step(batch[:rest])

    return run


@torch.no_grad()
def forward_time(model: nn.Module, images: torch.Tensor, forwards: int, batch_size: int, repeats: int) -> float:
    """Time of ``forwards`` plain model forwards in batches of ``batch_size`` (same inputs each batch)."""
    batch = images[:1].expand(batch_size, -1, -1, -1).contiguous()
    return timed(images.device, in_batches(model, batch, forwards), repeats)


def gradient_time(model: nn.Module, images: torch.Tensor, rows: int, batch_size: int, repeats: int) -> float:
    """Time of ``rows`` model forwards, each with the backward of its top logit to the input, in
    batches of ``batch_size`` (same inputs each batch; no parameter gradients are kept)."""
    batch = images[:1].expand(batch_size, -1, -1, -1).contiguous().requires_grad_(True)

    def step(inputs: torch.Tensor) -> None:
        with torch.enable_grad():
            torch.autograd.grad(model(inputs).amax(dim=1).sum(), inputs)

    return timed(images.device, in_batches(step, batch, rows), repeats)


def work_time(model: nn.Module, images: torch.Tensor, work: Work, batch_size: int, repeats: int) -> float:
    """Time of the model alone doing ``work`` (rows counted as :mod:`pipeline.cost` does): its
    backwards each with their forward, the other forwards plain."""
    seconds = 0.0
    if work.backwards:
        seconds += gradient_time(model, images, work.backwards, batch_size, repeats)
    if work.forwards > work.backwards:
        seconds += forward_time(model, images, work.forwards - work.backwards, batch_size, repeats)
    return seconds


def describe_work(work: Work) -> str:
    return f"{work.forwards}f+{work.backwards}b" if work.backwards else f"{work.forwards}f"


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory in MiB since :func:`reset_peak_memory`: CUDA memory allocated, or on CPU the
    process's high-water resident size (it only rises when a call needs more than before)."""
    if device.type != "cuda":
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def single_pass_cams(size: int, layer: str, channels: int) -> list[tuple[str, Work]]:
    """The registered CAM methods that declare one forward per image, with their declared work per image."""
    found = []
    for name in METHODS:
        cls = method_class(name)
        if issubclass(cls, CamExplainer):
            params = {k: p.default for k, p in method_parameters(name).items() if p.default is not p.empty}
            work = cls.cost({**params, "layer": layer}, (size, size), {layer: channels})
            if work is not None and work.forwards == 1:
                found.append((name, work))
    return found


def write_images(folder: Path, count: int, size: int) -> None:
    """``count`` smooth random pictures, larger than ``size`` (decoding resizes them), alternately JPEG and PNG."""
    rng = np.random.default_rng(0)
    height, width = 3 * size // 2, 2 * size
    for index in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8))
        picture = coarse.resize((width, height), Image.Resampling.BILINEAR)
        picture.save(folder / f"{index:04d}.{'jpg' if index % 2 == 0 else 'png'}")


def shard_rows(args: argparse.Namespace, classes: int, step: int) -> list[tuple[str, float, Work, float]]:
    """``(label, seconds per shard, declared work per image, model seconds for that work on a shard's
    images)`` of explain shards (Grad-CAM on layer4) and score shards (Insertion + Deletion), run by the
    pipeline's shard runner on ``--shard-images`` image files each: ``--shards`` shards of a stage are
    scheduled and run in a row, as a worker runs its shards (images decoded ahead), best of ``--repeats``."""
    n, count = args.shard_images, args.shards
    with tempfile.TemporaryDirectory() as folder:
        names = [f"class{i}" for i in range(classes)]
        images_dir = Path(folder) / "images" / names[0]
        images_dir.mkdir(parents=True)
        write_images(images_dir, n * count, args.size)
        metric_params = {"step": step, "batch_size": args.batch_size}
        config = parse_config({
            "data": {"root": str(images_dir.parent), "image_size": args.size, "class_names": names},
            "model": {"arch": args.arch, "num_classes": classes},
            "methods": [{"name": "gradcam", "layers": ["layer4"]}],
            "metrics": [{"name": "insertion", "params": metric_params}, {"name": "deletion", "params": metric_params}],
            "sharding": {"images_per_shard": n},
            "device": args.device,
        })
        plan = plan_run(config, Path(folder) / "run", check=False)
        runner = ShardRunner(Path(folder) / "run", device=args.device)
        try:
            context = runner.context
            units = unit_costs(context.config, {})
            reference = torch.randn(1, 3, args.size, args.size, device=context.device)
            rows = []
            for stage in ("explain", "score"):
                shards = [shard.id for shard in plan.stage(stage)]

                def run_stage() -> None:
                    runner.schedule(shards)
                    for shard_id in shards:
                        runner.run(shard_id, force=True)

                seconds = timed(context.device, run_stage, args.repeats) / count
                if stage == "explain":
                    label, work, batch = "explain gradcam layer4", units.methods["gradcam"], n
                else:
                    label, batch = "score insertion, deletion", args.batch_size
                    work = sum((units.metrics[m] for m in ("insertion", "deletion")), Work())
                assert work is not None
                rows.append((label, seconds, work, work_time(context.model, reference, work.times(n), batch,
                                                             args.repeats)))
            return rows
        finally:
            runner.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--size", type=int, default=96, help="input side in pixels")
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--masks", type=int, default=400, help="RISE masks / LIME samples")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--shard-images", type=int, default=16,
                        help="images of the CAM batch and of the explain and score shards")
    parser.add_argument("--shards", type=int, default=8,
                        help="shards of each stage run in a row, as a worker runs them (images decoded ahead)")
    parser.add_argument("--step", type=int, default=0, help="insertion/deletion pixels per step (default size*size/50)")
    parser.add_argument("--extremal-iterations", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3, help="timings are the best of this many calls")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    classes = 10
    model = torchvision.models.get_model(args.arch, num_classes=classes).eval().to(device)
    images = torch.randn(args.images, 3, args.size, args.size, device=device)
    with torch.no_grad():
        targets = model(images).argmax(dim=1)
    channels = dict(model.named_modules())["layer4"][-1].conv1.in_channels
    b, n, bs = args.images, args.masks, args.batch_size
    step = args.step or max(1, args.size * args.size // 50)
    steps = -(-args.size * args.size // step) + 1

    print(f"{args.arch} {args.size}x{args.size} on {device} ({torch.get_num_threads()} threads), "
          f"{b} images, {n} masks/samples, batch {bs}")
    header = (f"{'method':<22}{'maps/s':>10}{'seconds':>10}{'forwards':>10}{'raw fwd s':>11}{'ratio':>8}"
              f"{'target':>8}{'peak MiB':>10}")
    print(header)
    raw_seconds: dict[int, float] = {}  # plain forwards timed once per count

    def report(label: str, seconds: float, forwards: int | None, memory: float) -> None:
        if forwards:
            if forwards not in raw_seconds:
                raw_seconds[forwards] = forward_time(model, images, forwards, bs, args.repeats)
            raw = raw_seconds[forwards]
            ratio, raw_text, target = f"{seconds / raw:8.2f}", f"{raw:11.3f}", f"<={TIME_RATIO_TARGET}"
        else:
            ratio, raw_text, target = f"{'-':>8}", f"{'-':>11}", "-"
        print(f"{label:<22}{b / seconds:10.2f}{seconds:10.3f}{forwards or '-':>10}{raw_text}{ratio}{target:>8}"
              f"{memory:10.1f}", flush=True)

    def measure(function: Callable[[], object]) -> tuple[float, float]:
        """Best time of ``function`` and the peak memory of its calls."""
        reset_peak_memory(device)
        seconds = timed(device, function, args.repeats)
        return seconds, peak_memory_mib(device)

    cases: list[tuple[str, str, dict[str, object], int]] = [
        ("rise", "rise", {"n_masks": n, "batch_size": bs}, n * b),
        ("rise-gaussian", "rise-gaussian", {"n_masks": n, "batch_size": bs}, n * b),
        ("lime", "lime", {"n_samples": n, "batch_size": bs}, n * b),
        ("scorecam layer4", "scorecam", {"layer": "layer4", "batch_size": bs}, channels * b),
        ("abscam-final layer4", "abscam-final", {"layer": "layer4", "batch_size": bs}, channels * b),
    ]
    peaks: dict[str, float] = {}
    for label, name, params, forwards in cases:
        explainer = build_method(name, model, **params)
        seconds, peaks[name] = measure(lambda: explainer.explain(images, targets))
        report(label, seconds, forwards, peaks[name])
    for name, key in (("rise", "n_masks"), ("lime", "n_samples")):
        explainer = build_method(name, model, **{key: 2 * n, "batch_size": bs})
        seconds, memory = measure(lambda: explainer.explain(images, targets))
        report(f"{name} ({2 * n} samples)", seconds, 2 * n * b, memory)
        print(f"{name} with {2 * n} samples: peak {memory:.1f} MiB, {memory / peaks[name]:.2f}x that at {n} "
              f"(target <={MEMORY_GROWTH_TARGET}x: memory must not grow with samples)")

    maps = torch.rand(b, args.size, args.size, device=device)
    for label, metric in (("insertion", insertion), ("deletion", deletion)):
        seconds, memory = measure(lambda: metric(model, images, maps, targets, step=step, batch_size=bs))
        report(f"{label} ({steps} steps)", seconds, steps * b, memory)

    cam_images = torch.randn(args.shard_images, 3, args.size, args.size, device=device)
    with torch.no_grad():
        cam_targets = model(cam_images).argmax(dim=1)
    print(f"\nCAM methods on a batch of {args.shard_images}; model: the method's declared work per image "
          f"(f forward, b backward of the top logit to the input) on the same batch")
    print(f"{'method':<22}{'images/s':>10}{'work/img':>10}{'model img/s':>13}{'ratio':>8}{'target':>8}")
    for name, work in single_pass_cams(args.size, "layer4", channels):
        explainer = build_method(name, model, layer="layer4")
        seconds = timed(device, lambda: explainer.explain(cam_images, cam_targets), args.repeats)
        raw = work_time(model, cam_images, work.times(args.shard_images), args.shard_images, args.repeats)
        print(f"{name + ' layer4':<22}{args.shard_images / seconds:10.1f}{describe_work(work):>10}"
              f"{args.shard_images / raw:13.1f}{seconds / raw:8.2f}{f'<={TIME_RATIO_TARGET}':>8}", flush=True)

    print(f"\nwhole shards of {args.shard_images} PNG/JPEG files, {args.shards} of each stage in a row through the "
          f"shard runner (decoding and commits included); model: the declared work per image at the same batch")
    print(f"{'shard':<30}{'images/s':>10}{'work/img':>10}{'model img/s':>13}{'share':>8}{'target':>8}")
    for label, seconds, work, raw in shard_rows(args, classes, step):
        print(f"{label:<30}{args.shard_images / seconds:10.1f}{describe_work(work):>10}"
              f"{args.shard_images / raw:13.1f}{raw / seconds:8.2f}{f'>={SHARD_SHARE_TARGET}':>8}", flush=True)

    # last: its many small autograd steps leave the CPU allocator slower for what follows
    print(f"\n{header}")
    explainer = build_method("extremal", model, iterations=args.extremal_iterations)
    seconds, memory = measure(lambda: explainer.explain(images, targets))
    report(f"extremal ({args.extremal_iterations} it.)", seconds, None, memory)


if __name__ == "__main__":
    main()
