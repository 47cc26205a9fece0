"""How fast the real model runs here: one timed forward (and backward) batch, for the cost estimate.

:func:`time_model` runs in the pre-flight on the model it has built (no second build):
on the configured device, with the config's ``compute`` section applied as the workers
apply it, a batch of :data:`TIMING_ROWS` random images goes through the model once
untimed (CUDA's lazy start-up, cuDNN's algorithm choice) and once timed; where a method
or metric needs backwards, one backward of the same batch is timed too (after an untimed
one). The seconds per row feed :class:`~pipeline.cost.Throughput`: an estimate, since the
methods' own batch sizes differ.
"""
from __future__ import annotations

import time
from typing import Callable

import torch
from torch import nn

from .config import ExperimentConfig
from .cost import Throughput
from .models import ModelError, apply_compute, select_device

__all__ = ["TIMING_ROWS", "time_model"]

#: images in the timed batch, by device type: enough to fill a GPU's batch dimension, few on a CPU
TIMING_ROWS = {"cuda": 64, "cpu": 8}


def _seconds(device: torch.device, run: Callable[[], object]) -> float:
    """The wall time of ``run()``, the device's queued work included."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def _forward_seconds(model: nn.Module, images: torch.Tensor) -> float:
    with torch.no_grad():
        return _seconds(images.device, lambda: model(images))


def _backward_seconds(model: nn.Module, images: torch.Tensor) -> float:
    """The time of the backward alone, from one output logit's sum to the images."""
    inputs = images.detach().requires_grad_(True)
    with torch.enable_grad():
        score = model(inputs).float()[:, 0].sum()
        return _seconds(images.device, lambda: torch.autograd.grad(score, inputs))


def time_model(model: nn.Module, config: ExperimentConfig, *, backwards: bool) -> Throughput | None:
    """Seconds per row of a forward (and, with ``backwards``, a backward) batch of ``model`` on the
    configured device; ``None`` when that device, or the precision asked for, is not available on this
    machine (a plan made on a login node for GPU nodes). ``model`` is moved to the device and set up
    as the config's ``compute`` says."""
    try:
        device = select_device(config.device)
        model = apply_compute(model, config.compute, device)
    except ModelError:
        return None
    rows = TIMING_ROWS.get(device.type, TIMING_ROWS["cpu"])
    memory_format = torch.channels_last if config.compute.channels_last else torch.contiguous_format
    images = torch.randn(rows, 3, *config.data.image_size, generator=torch.Generator().manual_seed(0))
    images = images.to(device).contiguous(memory_format=memory_format)
    _forward_seconds(model, images)  # untimed: lazy start-up
    forward_s = _forward_seconds(model, images) / rows
    backward_s = None
    if backwards:
        _backward_seconds(model, images)
        backward_s = _backward_seconds(model, images) / rows
    return Throughput(str(device), rows, forward_s, backward_s)
