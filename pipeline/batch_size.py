"""``batch_size: auto``: the forward batch of a method or metric chosen on the machine that runs it.

Any method or metric parameter ``batch_size`` (inputs per model forward) may be ``auto``:

- On CUDA, :func:`largest_batch` searches the largest batch of the chunk's images whose
  plain forward fits in the device's memory: it doubles from 1 up to a cap (the work there is,
  at most :data:`MAX_AUTO_BATCH`), backs off when a forward runs out of memory, and bisects
  between the last batch that fitted and the first that did not (:data:`REFINEMENTS` times,
  so within 1/16 of the largest). :data:`HEADROOM` of it is used, leaving the rest to the
  method's own buffers (masks, perturbed copies). One search per process and input shape.
- On the CPU, :func:`cpu_batch_size`: about a megapixel of input per thread
  (``threads * 2**20 // (H * W)``, between 1 and the cap), enough work per forward to keep
  every core busy between synchronizations, without probing.

The batch used and how it was chosen are recorded in the shard's attributes (``batch_size``,
``batch_size_auto``).

Sampled methods (RISE, LIME) are planned with one sample as their alignment unit, so their
sample ranges are cut at exact multiples of ``sharding.samples_per_shard`` whatever the
device. At run time :func:`sampled_batch_size` takes, of the chosen batch, the images of the
chunk times the largest divisor of ``samples_per_shard`` samples that fits: every forward
batch then covers a fixed absolute sample group inside one shard, and a shard's sums are
bitwise independent of how the samples were split for a given device and chosen batch
(shards of one chunk run on devices that choose differently agree up to float rounding).
A ``samples_per_shard`` with many divisors (1000, 1024) leaves the most batches to choose from.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping

if TYPE_CHECKING:
    from torch import Tensor, nn

AUTO = "auto"
MAX_AUTO_BATCH = 4096
REFINEMENTS = 4
HEADROOM = 0.75
CPU_PIXELS_PER_THREAD = 2**20

__all__ = [
    "AUTO",
    "MAX_AUTO_BATCH",
    "REFINEMENTS",
    "HEADROOM",
    "CPU_PIXELS_PER_THREAD",
    "is_auto",
    "with_batch_size",
    "cpu_batch_size",
    "largest_batch",
    "sampled_batch_size",
    "choose_batch_size",
]


def is_auto(params: Mapping[str, Any]) -> bool:
    """True when ``params`` sets ``batch_size: auto``."""
    return params.get("batch_size") == AUTO


def with_batch_size(params: Mapping[str, Any], size: int) -> dict[str, Any]:
    """A copy of ``params`` with ``batch_size: auto`` replaced by ``size`` (other values kept)."""
    return {**params, "batch_size": size} if is_auto(params) else dict(params)


def cpu_batch_size(image_size: tuple[int, int], threads: int | None = None, cap: int = MAX_AUTO_BATCH) -> int:
    """The CPU rule: ``threads * CPU_PIXELS_PER_THREAD // (H * W)`` inputs, between 1 and ``cap``
    (``threads``: torch's intra-op threads by default)."""
    if threads is None:
        import torch

        threads = torch.get_num_threads()
    height, width = image_size
    return max(1, min(cap, threads * CPU_PIXELS_PER_THREAD // (height * width)))


def largest_batch(
    trial: Callable[[int], object],
    cap: int,
    out_of_memory: tuple[type[BaseException], ...] | None = None,
    *,
    refinements: int = REFINEMENTS,
) -> int:
    """The largest batch in 1..``cap`` for which ``trial(batch)`` does not raise ``out_of_memory``
    (default: torch's out-of-memory error), by doubling from 1, then bisecting ``refinements``
    times between the last batch that fitted and the first that did not."""
    if out_of_memory is None:
        import torch

        out_of_memory = (torch.OutOfMemoryError,)
    if cap < 1:
        raise ValueError(f"the largest batch to try must be >= 1, got {cap}")

    def fits(batch: int) -> bool:
        try:
            trial(batch)
        except out_of_memory:
            _release_cached_memory()
            return False
        return True

    if not fits(1):
        raise MemoryError("batch_size auto: not even one input fits in the device's memory")
    fitted, batch = 1, 1
    while batch < cap:
        batch = min(2 * batch, cap)
        if not fits(batch):
            break
        fitted = batch
    else:
        return fitted
    failed = batch
    for _ in range(refinements):
        middle = (fitted + failed) // 2
        if middle == fitted:
            break
        if fits(middle):
            fitted = middle
        else:
            failed = middle
    return fitted


def _release_cached_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sampled_batch_size(batch: int, n_images: int, unit: int) -> int:
    """The forward batch of a sampled method given ``batch`` inputs: its images per forward
    (``min(n_images, batch)``) times the largest divisor of ``unit`` samples that fits in ``batch``."""
    images = min(n_images, batch)
    per_image = batch // images
    samples = max(d for d in range(1, min(unit, per_image) + 1) if unit % d == 0)
    return images * samples


def choose_batch_size(model: "nn.Module", images: "Tensor", cap: int = MAX_AUTO_BATCH) -> tuple[int, str]:
    """The batch for ``model`` on ``images``' device (the CUDA search or the CPU rule), and how it was chosen."""
    import torch

    cap = max(1, min(cap, MAX_AUTO_BATCH))
    height, width = images.shape[-2:]
    if images.device.type != "cuda":
        threads = torch.get_num_threads()
        batch = cpu_batch_size((height, width), threads, cap)
        return batch, f"cpu rule: {threads} threads x 2**20 px / ({height}x{width} px), at most {cap}"
    layout = torch.channels_last if images.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    first = images[:1]

    def trial(batch: int) -> None:
        with torch.no_grad():
            model(first.repeat(batch, 1, 1, 1).contiguous(memory_format=layout))

    fitted = largest_batch(trial, cap)
    batch = max(1, int(fitted * HEADROOM))
    return batch, f"cuda search: largest forward that fits {fitted} (of at most {cap}), {HEADROOM:.0%} used"
