"""Images decoded ahead of use: while the device computes one shard, loader worker processes
already decode the images of the shards that follow.

:class:`ImagePrefetcher` runs one :class:`torch.utils.data.DataLoader` over the shards a
process is going to compute, in that order (:meth:`~ImagePrefetcher.schedule`): each shard's
image chunk is decoded whole by one worker process, and up to two chunks per worker are
decoded ahead, pinned when they go to a CUDA device. A shard taken out of that order (one
computed again, or one after skipped shards) is decoded at once in this process; the chunks
of skipped shards are dropped. Either way a chunk holds exactly the images of
:func:`pipeline.data.load_batch`, bit for bit, whatever the number of workers.

For a shard of a sampled method, the worker also computes the method's host constants
(:meth:`~pipeline.methods.SampledExplainer.host_constants`: LIME's segmentation) from the
decoded images, so the device need not wait for them; a chunk decoded in this process, or
one whose host constants fail in the worker, comes without them and the shard computes them.

Loader workers ignore SIGTERM and SIGUSR2: on a scheduler's signal the shard runner saves its
progress, and the workers end with it.
"""
from __future__ import annotations

import collections
import dataclasses
import signal
from typing import Any, Iterator, Mapping, Sequence

from torch import Tensor

from ..config import DataConfig
from ..data import ImageRecord, load_batch, load_images

__all__ = ["ImagePrefetcher", "LoadedImages", "MethodSpec"]

#: a sampled method by name and parameters, as the config gives them
MethodSpec = tuple[str, Mapping[str, Any]]


@dataclasses.dataclass(frozen=True)
class LoadedImages:
    """The records that loaded, their images ``[n, 3, H, W]``, an error per failure, and the host
    constants of the shard's sampled method when a loader worker computed them (else empty)."""

    records: list[ImageRecord]
    images: Tensor
    failures: dict[str, str]
    host: dict[str, Tensor] = dataclasses.field(default_factory=dict)


def _host_constants(method: MethodSpec, images: Tensor) -> dict[str, Tensor]:
    """``method``'s host constants of ``images``; empty when they fail here (the shard then computes
    them itself, and reports the error there)."""
    from ..batch_size import with_batch_size
    from ..methods import SampledExplainer, build_method

    try:
        explainer = build_method(method[0], None, **with_batch_size(dict(method[1]), 1))
        return explainer.host_constants(images) if isinstance(explainer, SampledExplainer) else {}
    except Exception:  # e.g. a plug-in that needs its model for them: the shard computes them
        return {}


class _ChunkImages:
    """A map-style dataset: item ``i`` is the :func:`load_batch` result of chunk ``i`` and the host
    constants of its method, if one is given."""

    def __init__(self, chunks: Sequence[Sequence[ImageRecord]], methods: Sequence[MethodSpec | None],
                 data: DataConfig) -> None:
        self.chunks, self.methods, self.data = list(chunks), list(methods), data

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, index: int) -> tuple[list[ImageRecord], Tensor, dict[str, str], dict[str, Tensor]]:
        loaded, images, failures = load_batch(self.chunks[index], self.data)
        method = self.methods[index]
        return loaded, images, failures, _host_constants(method, images) if method and loaded else {}


def _leave_signals_to_the_runner(_worker: int) -> None:
    for number in (signal.SIGTERM, signal.SIGUSR2):
        signal.signal(number, signal.SIG_IGN)


class ImagePrefetcher:
    """Decodes the image chunks of scheduled shards in ``workers`` processes ahead of their use
    (``workers=0``: each chunk when it is taken, in this process); ``pin`` pins them for a CUDA copy."""

    def __init__(self, data: DataConfig, workers: int, *, pin: bool = False) -> None:
        self.data, self.workers, self.pin = data, workers, pin
        self._ahead: collections.deque[str] = collections.deque()
        self._stream: Iterator[tuple[list[ImageRecord], Tensor, dict[str, str], dict[str, Tensor]]] | None = None

    def schedule(self, shards: Sequence[tuple[str, Sequence[ImageRecord]]], *,
                 methods: Mapping[str, MethodSpec] | None = None) -> None:
        """Start decoding the chunks of ``shards`` (``(shard id, its records)``, in the order they will
        be taken), with the host constants of the sampled method ``methods`` gives a shard id; a
        previous schedule is dropped."""
        self.close()
        if self.workers == 0 or not shards:
            return
        from torch.utils.data import DataLoader

        methods = methods or {}
        loader = DataLoader(
            _ChunkImages([records for _, records in shards], [methods.get(i) for i, _ in shards], self.data),
            batch_size=None,
            num_workers=min(self.workers, len(shards)),
            pin_memory=self.pin,
            worker_init_fn=_leave_signals_to_the_runner,
        )
        self._ahead = collections.deque(shard_id for shard_id, _ in shards)
        self._stream = iter(loader)

    def take(self, shard_id: str, records: Sequence[ImageRecord]) -> LoadedImages:
        """The images of shard ``shard_id``'s ``records``: its prefetched chunk when it is scheduled,
        else decoded now."""
        if shard_id in self._ahead:
            assert self._stream is not None
            while True:
                ahead, chunk = self._ahead.popleft(), next(self._stream)
                if ahead == shard_id:
                    break
            if not self._ahead:
                self.close()
            return LoadedImages(*chunk)
        loaded, images, failures = load_images(records, self.data, workers=self.workers)
        return LoadedImages(loaded, images.pin_memory() if self.pin else images, failures)

    def close(self) -> None:
        """Stop the worker processes and drop the chunks not taken."""
        self._ahead.clear()
        self._stream = None  # the loader's iterator shuts its workers down when released
