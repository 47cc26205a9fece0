"""Saliency metrics and the ``METRICS`` registry that configs name them by.

Perturbation metrics run the model on changed images (insertion, deletion, Average
Drop / Increase); ground-truth metrics compare maps with reference maps (PCC, SSIM,
pointing game); the randomization test explains the images again with the scored method on
copies of the model whose top blocks are re-initialized. Every function takes batches and returns per-image values on the
model's or the maps' device.

A metric is found by its registered name (the built-ins, and functions decorated with
:func:`register_metric`), by ``package.module:function`` (a function registered by the
decorator, or a :class:`MetricSpec`) or by an entry point of group ``xai_pipeline.metrics``
(:mod:`pipeline.plugins`). Scoring calls every metric, built-in or not, through its
:class:`MetricSpec` (:meth:`MetricSpec.call`), which says what it needs.

A metric's parameters are its function's keyword-only arguments, declared there once
(:mod:`pipeline.parameters`: a type, or ``Annotated[type, Param(meaning, unit, range)]``)
and validated from that declaration (:meth:`MetricSpec.check_values`);
:func:`metric_info` documents them (``xai-pipeline metrics``).
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Iterable, Mapping, TypeVar

from torch import Tensor, nn

from ..cost import Work
from ..parameters import ParameterInfo, describe, validate
from ..plugins import METRIC_GROUP, PluginError, entry_point_names, load_plugin
from .average_drop import average_drop_increase, drop_cost, explanation_masks, summarize_drop_increase
from .insertion_deletion import (
    blur_substrate,
    check_curve_parameters,
    curve_cost,
    deletion,
    insertion,
    make_substrate,
    pixel_rank,
)
from .pointing_game import check_pointing_parameters, pointing_game, pointing_game_accuracy
from .randomization import (
    MethodMaps,
    check_randomization_blocks,
    check_randomization_parameters,
    randomization,
    randomization_explanations,
    spearman,
)
from .similarity import pcc, prepare_pair, ssim, ssim_window

__all__ = [
    "METRICS",
    "BUILTIN_METRICS",
    "MetricSpec",
    "metric_spec",
    "metric_names",
    "metric_info",
    "register_metric",
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
    "check_pointing_parameters",
    "ssim_window",
    "randomization",
    "spearman",
    "check_randomization_parameters",
    "MethodMaps",
]


@dataclasses.dataclass(frozen=True)
class MetricSpec:
    """How a metric is computed and reported.

    ``function`` computes it; when it returns a tuple, ``output`` is the index of this
    metric's per-image values in it (``None``: the function returns them directly),
    multiplied by ``scale``, and ``curve`` the index of per-image curves ``[n, T]``
    (``None``: none). What it needs decides how it is called (:meth:`call`):
    ``function(model, images, maps, targets[, gt], **params)`` with the model,
    ``function(maps[, gt], **params)`` without; a metric that needs ground truth gets
    only the images that have one (NaN for the others). ``parameters`` are the keyword
    parameters a config may set. ``check(size, **params)`` (``None``: nothing to check)
    is the rule relating parameter values to each other and to maps of ``size`` that the
    function applies first (it gets the parameters it names); their declarations hold the rest.
    ``group`` gathers metrics into one score shard (by default ``perturbation`` with the
    model, ``groundtruth`` without). ``cost(size, **params)`` (``None``: not declared) is the
    model forwards (and backwards) per image and map, as :class:`~pipeline.cost.Work`.
    ``check_model(model, **params)`` (``None``: nothing) is the rule the metric applies to its
    parameters on the model. A metric that ``needs_method`` (it needs the model too) runs
    the scored method again: ``function(model, images, maps, targets, method, **params)``, where
    ``method(model, images, targets)`` gives that method's maps on any model.
    """

    name: str
    title: str
    function: Callable[..., Any]
    group: str
    needs_model: bool
    needs_ground_truth: bool
    higher_is_better: bool
    parameters: tuple[str, ...]
    output: int | None = None
    check: Callable[..., object] | None = None
    curve: int | None = None
    scale: float = 1.0
    cost: Callable[..., Work] | None = None
    needs_method: bool = False
    check_model: Callable[..., object] | None = None
    #: a metric that ``needs_method``: how many times it explains each image again,
    #: ``explanations(model, **params)`` (``None``: not declared)
    explanations: Callable[..., int] | None = None

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
        break their declarations or would make the metric fail on maps of ``size``; nothing runs on data."""
        values = validate(self.name, self.function, params)
        if self.check is None:
            return
        accepted = inspect.signature(self.check).parameters
        self.check(size, **{k: v for k, v in self._with_defaults(values).items() if k in accepted})

    def work(self, params: Mapping[str, Any], size: tuple[int, int]) -> Work | None:
        """The model forwards and backwards per image and map with ``params`` on maps of ``size``
        (none for a metric without the model; ``None`` when not declared)."""
        if not self.needs_model:
            return Work()
        return None if self.cost is None else self.cost(size, **self._with_defaults(params))

    def _with_defaults(self, params: Mapping[str, Any]) -> dict[str, Any]:
        defaults = {
            name: p.default
            for name, p in inspect.signature(self.function).parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
        }
        return {**defaults, **params}

    def check_on_model(self, params: Mapping[str, Any], model: nn.Module) -> None:
        """Raise ``ValueError`` naming the parameter when ``params`` (defaults for the others) would
        make the metric fail on ``model``; nothing runs on data."""
        if self.check_model is not None:
            self.check_model(model, **self._with_defaults(params))

    def reruns(self, params: Mapping[str, Any], model: nn.Module) -> int | None:
        """How many times the metric explains each image again with ``params`` on ``model`` (a metric
        that ``needs_method``; ``None`` when not declared)."""
        return None if self.explanations is None else self.explanations(model, **self._with_defaults(params))

    def call(
        self, model: nn.Module, images: Tensor, maps: Tensor, targets: Tensor, gt: Tensor | None,
        params: Mapping[str, Any], method: MethodMaps | None = None,
    ) -> Any:
        """The function's result on a batch, given what the metric needs (``gt``: ``[n, H, W]`` or ``None``;
        ``method``: the scored method, for a metric that needs it)."""
        inputs = (model, images, maps, targets) if self.needs_model else (maps,)
        if self.needs_method:
            if method is None:
                raise ValueError(f"metric {self.name!r} runs the scored method again, and none was given")
            inputs = (*inputs, method)
        return self.function(*inputs, *((gt,) if self.needs_ground_truth else ()), **params)

    def values(self, result: Any) -> Tensor:
        """Per-image values ``[n]`` of a result of :meth:`call`."""
        chosen = result if self.output is None else result[self.output]
        return chosen.double() * self.scale

    def curves(self, result: Any) -> Tensor | None:
        """Per-image curves ``[n, T]`` of a result of :meth:`call`, if the metric has them."""
        return None if self.curve is None else result[self.curve]


def _keyword_parameters(function: Callable[..., Any]) -> tuple[str, ...]:
    signature = inspect.signature(function)
    return tuple(name for name, p in signature.parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY)


def _perturbation(
    name: str, title: str, function: Callable[..., Any], higher: bool, output: int,
    check: Callable[..., object] | None, cost: Callable[..., Work], curve: int | None = None, scale: float = 1.0,
) -> MetricSpec:
    parameters = _keyword_parameters(function)
    return MetricSpec(name, title, function, "perturbation", True, False, higher, parameters, output, check, curve,
                      scale, cost)


def _groundtruth(
    name: str, title: str, function: Callable[..., Any], check: Callable[..., object] | None = None
) -> MetricSpec:
    parameters = _keyword_parameters(function)
    return MetricSpec(name, title, function, "groundtruth", False, True, True, parameters, None, check)


#: metric name -> its description
METRICS: dict[str, MetricSpec] = {
    spec.name: spec
    for spec in (
        _perturbation("insertion", "Insertion", insertion, True, 0, check_curve_parameters, curve_cost, curve=1),
        _perturbation("deletion", "Deletion", deletion, False, 0, check_curve_parameters, curve_cost, curve=1),
        _groundtruth("pcc", "PCC", pcc),
        _groundtruth("ssim", "SSIM", ssim, ssim_window),
        _perturbation("average_drop", "Average Drop", average_drop_increase, False, 0, None, drop_cost),
        _perturbation("average_increase", "Average Increase", average_drop_increase, True, 1, None, drop_cost,
                      scale=100.0),
        _groundtruth("pointing_game", "Pointing game", pointing_game, check_pointing_parameters),
        MetricSpec("randomization", "Randomization", randomization, "randomization", True, False, False,
                   _keyword_parameters(randomization), 0, check_randomization_parameters, curve=1,
                   needs_method=True, check_model=check_randomization_blocks,
                   explanations=randomization_explanations),
    )
}

#: the names of the built-in metrics (``METRICS`` also holds the plug-ins found so far)
BUILTIN_METRICS: tuple[str, ...] = tuple(METRICS)


F = TypeVar("F", bound=Callable[..., Any])


def register_metric(
    name: str,
    *,
    title: str | None = None,
    higher_is_better: bool = True,
    needs_model: bool = False,
    needs_ground_truth: bool = False,
    output: int | None = None,
    curve: int | None = None,
    scale: float = 1.0,
    check: Callable[..., object] | None = None,
    group: str | None = None,
    cost: Callable[..., Work] | None = None,
    needs_method: bool = False,
) -> Callable[[F], F]:
    """Function decorator: make the function metric ``name`` (see :class:`MetricSpec`; its
    keyword-only arguments are its parameters)."""

    def register(function: F) -> F:
        if name in METRICS and METRICS[name].function is not function:
            raise ValueError(f"metric {name!r} is already registered")
        default_group = "perturbation" if needs_model or needs_method else "groundtruth"
        METRICS[name] = MetricSpec(
            name, title or name, function, group or default_group, needs_model or needs_method, needs_ground_truth,
            higher_is_better, _keyword_parameters(function), output, check, curve, scale, cost, needs_method,
        )
        return function

    return register


def metric_names() -> list[str]:
    """The names of the registered metrics and of the installed metric entry points."""
    return [*METRICS, *(n for n in entry_point_names(METRIC_GROUP) if n not in METRICS)]


def metric_spec(name: str) -> MetricSpec:
    """The description of metric ``name``: registered, ``module:function`` or an entry point (a
    plug-in is registered under ``name`` once found); an unknown name lists the known ones."""
    if name not in METRICS:
        found = load_plugin(name, METRIC_GROUP)
        if found is None:
            raise ValueError(f"unknown metric {name!r}; known metrics: {', '.join(metric_names())}")
        spec = found if isinstance(found, MetricSpec) else next(
            (s for s in list(METRICS.values()) if s.function is found), None)
        if spec is None:
            raise PluginError(f"plug-in metric {name!r} is {found!r}: neither a MetricSpec nor a function "
                              "decorated with register_metric")
        METRICS[name] = dataclasses.replace(spec, name=name)
    return METRICS[name]


def metric_info(name: str) -> list[ParameterInfo]:
    """The documented parameters of metric ``name`` (meaning, unit, default, range), from their declarations."""
    return describe(metric_spec(name).function, keyword_only=True)


def check_metric_parameters(name: str, params: Iterable[str]) -> None:
    """Raise ``TypeError`` naming the valid parameters when ``params`` has one metric ``name`` lacks."""
    spec = metric_spec(name)
    unknown = sorted(set(params) - set(spec.parameters))
    if unknown:
        raise TypeError(
            f"metric {name!r} has no parameter {', '.join(map(repr, unknown))}; "
            f"valid parameters: {', '.join(spec.parameters) or '(none)'}"
        )
