"""Saliency metrics and the ``METRICS`` registry that configs name them by.

Perturbation metrics run the model on changed images (insertion, deletion, Average
Drop / Increase); ground-truth metrics compare maps with reference maps (PCC, SSIM,
pointing game). Every function takes batches and returns per-image values on the
model's or the maps' device.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Iterable, Literal, Mapping

from .average_drop import average_drop_increase, check_drop_parameters, explanation_masks, summarize_drop_increase
from .insertion_deletion import (
    blur_substrate,
    check_curve_parameters,
    deletion,
    insertion,
    make_substrate,
    pixel_rank,
)
from .pointing_game import check_pointing_parameters, pointing_game, pointing_game_accuracy
from .similarity import pcc, prepare_pair, ssim, ssim_window

__all__ = [
    "METRICS",
    "MetricSpec",
    "metric_spec",
    "check_metric_parameters",
    "insertion",
    "deletion",
    "pixel_rank",
    "blur_substrate",
    "make_substrate",
    "pcc",
    "ssim",
    "prepare_pair",
    "average_drop_increase",
    "explanation_masks",
    "summarize_drop_increase",
    "pointing_game",
    "pointing_game_accuracy",
    "check_curve_parameters",
    "check_drop_parameters",
    "check_pointing_parameters",
    "ssim_window",
]


@dataclasses.dataclass(frozen=True)
class MetricSpec:
    """How a metric is computed and reported.

    ``function`` computes it; when it returns a tuple, ``output`` is the index of this
    metric's per-image values in it (``None``: the function returns them directly).
    Model-based metrics are called ``function(model, images, maps, targets, **params)``,
    ground-truth ones ``function(maps, gt, **params)``; ``parameters`` are the keyword
    parameters a config may set. ``check(size, **params)`` (``None``: nothing to check)
    is the rule the function applies to its parameter values first, on maps of ``size``.
    """

    name: str
    title: str
    function: Callable[..., Any]
    group: Literal["perturbation", "groundtruth"]
    needs_model: bool
    needs_ground_truth: bool
    higher_is_better: bool
    parameters: tuple[str, ...]
    output: int | None = None
    check: Callable[..., object] | None = None

    @property
    def arrow(self) -> str:
        """``"↑"`` when higher is better, else ``"↓"``."""
        return "↑" if self.higher_is_better else "↓"

    @property
    def label(self) -> str:
        """Column heading for tables, e.g. ``"Deletion ↓"``."""
        return f"{self.title} {self.arrow}"

    def check_values(self, params: Mapping[str, Any], size: tuple[int, int]) -> None:
        """Raise ``ValueError`` naming the parameter when ``params`` (defaults for the others)
        would make the metric fail on maps of ``size``; nothing runs on data."""
        if self.check is None:
            return
        defaults = {
            name: p.default
            for name, p in inspect.signature(self.function).parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
        }
        self.check(size, **{**defaults, **params})


def _keyword_parameters(function: Callable[..., Any]) -> tuple[str, ...]:
    signature = inspect.signature(function)
    return tuple(name for name, p in signature.parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY)


def _perturbation(
    name: str, title: str, function: Callable[..., Any], higher: bool, output: int, check: Callable[..., object]
) -> MetricSpec:
    parameters = _keyword_parameters(function)
    return MetricSpec(name, title, function, "perturbation", True, False, higher, parameters, output, check)


def _groundtruth(
    name: str, title: str, function: Callable[..., Any], check: Callable[..., object] | None = None
) -> MetricSpec:
    parameters = _keyword_parameters(function)
    return MetricSpec(name, title, function, "groundtruth", False, True, True, parameters, None, check)


#: metric name -> its description
METRICS: dict[str, MetricSpec] = {
    spec.name: spec
    for spec in (
        _perturbation("insertion", "Insertion", insertion, True, 0, check_curve_parameters),
        _perturbation("deletion", "Deletion", deletion, False, 0, check_curve_parameters),
        _groundtruth("pcc", "PCC", pcc),
        _groundtruth("ssim", "SSIM", ssim, ssim_window),
        _perturbation("average_drop", "Average Drop", average_drop_increase, False, 0, check_drop_parameters),
        _perturbation("average_increase", "Average Increase", average_drop_increase, True, 1, check_drop_parameters),
        _groundtruth("pointing_game", "Pointing game", pointing_game, check_pointing_parameters),
    )
}


def metric_spec(name: str) -> MetricSpec:
    """The description of metric ``name``; an unknown name lists the known ones."""
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; known metrics: {', '.join(METRICS)}")
    return METRICS[name]


def check_metric_parameters(name: str, params: Iterable[str]) -> None:
    """Raise ``TypeError`` naming the valid parameters when ``params`` has one metric ``name`` lacks."""
    spec = metric_spec(name)
    unknown = sorted(set(params) - set(spec.parameters))
    if unknown:
        raise TypeError(
            f"metric {name!r} has no parameter {', '.join(map(repr, unknown))}; "
            f"valid parameters: {', '.join(spec.parameters) or '(none)'}"
        )
