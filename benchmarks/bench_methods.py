"""Speed of every method and of Insertion/Deletion against the raw model forward, in one run.

For each method it prints maps per second and, for the perturbation methods, the
ratio of its time to the time of the same number of plain model forwards at the
same batch size (the bound: a perturbation method costs its forwards). It
also prints the peak memory allocated (on CPU: the process's high-water resident
size), and RISE/LIME are run at 4x the sample count to show that memory does not
grow with them.

    python benchmarks/bench_methods.py                      # CPU-sized defaults
    python benchmarks/bench_methods.py --size 224 --masks 4000 --images 8   # on a GPU
"""
from __future__ import annotations

import argparse
import resource
import time
from typing import Callable

import torch
import torchvision
from torch import nn

from pipeline.methods import build_method
from pipeline.metrics import deletion, insertion


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


@torch.no_grad()
def forward_time(model: nn.Module, images: torch.Tensor, forwards: int, batch_size: int, repeats: int) -> float:
    """Time of ``forwards`` plain model forwards in batches of ``batch_size`` (same inputs each batch)."""
    device = images.device
    batch = images[:1].expand(batch_size, -1, -1, -1).contiguous()
    full, rest = divmod(forwards, batch_size)

    def run() -> None:
        for _ in range(full):
            model(batch)
        if rest:
            model(batch[:rest])

    return timed(device, run, repeats)


def peak_memory(device: torch.device, function: Callable[[], object]) -> float:
    """Peak memory in MiB: CUDA memory allocated during one call, or on CPU the process's
    high-water resident size after it (it only rises when the call needs more than before)."""
    if device.type != "cuda":
        function()
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    torch.cuda.reset_peak_memory_stats(device)
    function()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--size", type=int, default=96, help="input side in pixels")
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--masks", type=int, default=400, help="RISE masks / LIME samples")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--step", type=int, default=0, help="insertion/deletion pixels per step (default size*size/50)")
    parser.add_argument("--extremal-iterations", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3, help="timings are the best of this many calls")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = torchvision.models.get_model(args.arch, num_classes=10).eval().to(device)
    images = torch.randn(args.images, 3, args.size, args.size, device=device)
    with torch.no_grad():
        targets = model(images).argmax(dim=1)
    channels = dict(model.named_modules())["layer4"][-1].conv1.in_channels
    b, n, bs = args.images, args.masks, args.batch_size
    step = args.step or max(1, args.size * args.size // 50)
    steps = -(-args.size * args.size // step) + 1

    print(f"{args.arch} {args.size}x{args.size} on {device} ({torch.get_num_threads()} threads), "
          f"{b} images, {n} masks/samples, batch {bs}")
    print(f"{'method':<22}{'maps/s':>10}{'seconds':>10}{'forwards':>10}{'raw fwd s':>11}{'ratio':>8}{'peak MiB':>10}")

    def report(label: str, seconds: float, forwards: int | None, memory: float, maps: int = b) -> None:
        if forwards:
            raw = forward_time(model, images, forwards, bs, args.repeats)
            ratio = f"{seconds / raw:8.2f}"
            raw_text = f"{raw:11.3f}"
        else:
            ratio, raw_text = f"{'-':>8}", f"{'-':>11}"
        print(f"{label:<22}{maps / seconds:10.2f}{seconds:10.3f}{forwards or '-':>10}{raw_text}{ratio}{memory:10.1f}",
              flush=True)

    cases: list[tuple[str, str, dict[str, object], int | None]] = [
        ("rise", "rise", {"n_masks": n, "batch_size": bs}, n * b),
        ("rise-gaussian", "rise-gaussian", {"n_masks": n, "batch_size": bs}, n * b),
        ("lime", "lime", {"n_samples": n, "batch_size": bs}, n * b),
        ("scorecam layer4", "scorecam", {"layer": "layer4", "batch_size": bs}, channels * b),
        ("abscam-final layer4", "abscam-final", {"layer": "layer4", "batch_size": bs}, channels * b),
        ("gradcam layer4", "gradcam", {"layer": "layer4"}, None),
        ("abscam-init layer4", "abscam-init", {"layer": "layer4"}, None),
        ("fem layer4", "fem", {"layer": "layer4"}, None),
    ]

    def run_method(label: str, name: str, params: dict[str, object], forwards: int | None) -> None:
        explainer = build_method(name, model, **params)
        seconds = timed(device, lambda: explainer.explain(images, targets), args.repeats)
        memory = peak_memory(device, lambda: explainer.explain(images, targets))
        report(label, seconds, forwards, memory)

    for case in cases:
        run_method(*case)
    for name in ("rise", "lime"):
        key = "n_masks" if name == "rise" else "n_samples"
        explainer = build_method(name, model, **{key: 4 * n, "batch_size": bs})
        memory = peak_memory(device, lambda: explainer.explain(images, targets))
        print(f"{name} with {4 * n} samples: peak {memory:.1f} MiB (memory must not grow with samples)")

    maps = torch.rand(b, args.size, args.size, device=device)
    for label, metric in (("insertion", insertion), ("deletion", deletion)):
        seconds = timed(device, lambda: metric(model, images, maps, targets, step=step, batch_size=bs), args.repeats)
        memory = peak_memory(device, lambda: metric(model, images, maps, targets, step=step, batch_size=bs))
        report(f"{label} ({steps} steps)", seconds, steps * b, memory)
    # last: its many small autograd steps leave the CPU allocator slower for what follows
    run_method(f"extremal ({args.extremal_iterations} it.)", "extremal", {"iterations": args.extremal_iterations}, None)


if __name__ == "__main__":
    main()
