"""GPU node at full speed: each hot path beside the model's own forwards, at the same batch and precision.

One short script for a GPU node (`--device cuda`); it prints a table. Rows: the random draws of
a shard (RISE grids and shifts, LIME on/off vectors: host time per ``--masks`` samples), RISE,
Gaussian RISE and LIME walking their samples (LIME's segmentation done once, outside the
timing), RISE again at twice the samples (its peak memory must not grow), Insertion and
Deletion, and image decoding by the loader. ``ratio`` is the hot path's time over that of the
same number of plain model forwards: 1.0 means it costs only its forwards; ``peak MiB`` is the
device's peak allocated memory during the hot path (CUDA only).

The defaults (ResNet-50 at 224 px, 4 images, 4000 samples, one timed call after a warm-up) finish
in a few minutes on one H200:

    python benchmarks/bench_gpu.py --device cuda --precision bfloat16
    python benchmarks/bench_gpu.py --device cpu --size 32 --masks 40 --images 1 --arch resnet18 --batch-size 20
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image

from bench_methods import forward_time, timed
from pipeline.config import ComputeConfig, DataConfig
from pipeline.data import ImageRecord, load_images
from pipeline.methods import SampledExplainer, build_method
from pipeline.methods.lime import lime_samples
from pipeline.methods.rise import binary_cells, mask_draws
from pipeline.metrics import deletion, insertion
from pipeline.models import apply_compute


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--size", type=int, default=224, help="input side in pixels")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--masks", type=int, default=4000, help="RISE masks / LIME samples")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--precision", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--workers", type=int, default=4, help="image decoding processes")
    parser.add_argument("--repeats", type=int, default=1, help="timings are the best of this many calls")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    compute = ComputeConfig(precision=args.precision, channels_last=args.channels_last)
    model = apply_compute(torchvision.models.get_model(args.arch, num_classes=1000).eval(), compute, device)
    images = torch.randn(args.images, 3, args.size, args.size, device=device)
    if args.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        targets = model(images).argmax(dim=1)
    b, n, bs = args.images, args.masks, args.batch_size
    step = max(1, args.size * args.size // 100)
    points = -(-args.size * args.size // step) + 1

    print(f"{args.arch} {args.size}x{args.size} on {device}, {args.precision}"
          f"{', channels_last' if args.channels_last else ''}: {b} images, {n} samples, batch {bs}")
    print(f"{'hot path':<28}{'seconds':>10}{'forwards':>10}{'model fwd s':>13}{'ratio':>8}{'peak MiB':>10}")

    def peak_mib() -> str:
        if device.type != "cuda":
            return "-"
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        torch.cuda.reset_peak_memory_stats(device)
        return f"{peak:.0f}"

    def row(label: str, seconds: float, forwards: int | None) -> None:
        peak = peak_mib()
        if forwards:
            raw = forward_time(model, images, forwards, bs, args.repeats)
            print(f"{label:<28}{seconds:10.4f}{forwards:10d}{raw:13.3f}{seconds / raw:8.2f}{peak:>10}", flush=True)
        else:
            print(f"{label:<28}{seconds:10.4f}{'-':>10}{'-':>13}{'-':>8}{peak:>10}", flush=True)
        peak_mib()  # the next row's peak starts here

    peak_mib()
    host = torch.device("cpu")
    row(f"RISE draws ({n} masks)", timed(host, lambda: mask_draws(0, 0, n, (args.size,) * 2, 8, binary_cells(0.5)),
                                          args.repeats), None)
    row(f"LIME draws ({n} x 50)", timed(host, lambda: lime_samples(0, 0, n, 50), args.repeats), None)
    for label, name, params in (("rise", "rise", {"n_masks": n}),
                                (f"rise ({2 * n} masks)", "rise", {"n_masks": 2 * n}),
                                ("rise-gaussian", "rise-gaussian", {"n_masks": n}),
                                ("lime", "lime", {"n_samples": n, "segmentation": "slic"})):
        explainer = build_method(name, model, batch_size=bs, **params)
        assert isinstance(explainer, SampledExplainer)
        constants = explainer.prepare(images)
        samples = explainer.n_samples
        seconds = timed(device, lambda: explainer.accumulate(images, targets, 0, samples, constants), args.repeats)
        row(label, seconds, samples * b)
    maps = torch.rand(b, args.size, args.size, device=device)
    for label, metric in (("insertion", insertion), ("deletion", deletion)):
        seconds = timed(device, lambda: metric(model, images, maps, targets, step=step, batch_size=bs), args.repeats)
        row(f"{label} ({points} points)", seconds, points * b)

    with tempfile.TemporaryDirectory() as folder:
        rng = np.random.default_rng(0)
        records = []
        for index in range(4 * b):
            path = Path(folder) / f"{index}.jpg"
            Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(path)
            records.append(ImageRecord(str(index), path, 0))
        data = DataConfig(root=Path(folder), image_size=(args.size, args.size))
        for workers in (0, args.workers):
            started = time.perf_counter()
            load_images(records, data, workers=workers)
            row(f"decode {len(records)} JPEGs, {workers} wkr", time.perf_counter() - started, None)


if __name__ == "__main__":
    main()
