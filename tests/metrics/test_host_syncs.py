"""Insertion/Deletion and Average Drop move nothing to the host per forward batch: their host
transfers and device reads do not grow with the number of batches."""
from __future__ import annotations

from typing import Callable

import pytest
import torch
from torch import Tensor, nn

from pipeline.metrics import deletion, insertion
from pipeline.metrics.average_drop import average_drop_increase
from tests.host_syncs import HostSyncs

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]
Metric = Callable[[nn.Module, Tensor, Tensor, Tensor, int], object]

METRICS: dict[str, Metric] = {
    "insertion": lambda model, images, maps, targets, size: insertion(
        model, images, maps, targets, step=16, batch_size=size),
    "deletion": lambda model, images, maps, targets, size: deletion(
        model, images, maps, targets, step=16, batch_size=size),
    "average_drop": lambda model, images, maps, targets, size: average_drop_increase(
        model, images, maps, targets, batch_size=size),
}


@pytest.mark.parametrize("metric", sorted(METRICS))
@pytest.mark.parametrize("device", DEVICES)
def test_host_transfers_do_not_grow_with_the_batches(metric: str, device: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)).to(device)
    images, maps = torch.randn(3, 3, 8, 8, device=device), torch.rand(3, 8, 8, device=device)
    targets = torch.tensor([0, 3, 1], device=device)
    counts = []
    for batch_size in (64, 1):  # one forward batch, then one per curve point / image
        with HostSyncs() as syncs:
            METRICS[metric](model, images, maps, targets, batch_size)
        counts.append(len(syncs.calls))
    assert counts[0] == counts[1]
