"""The pre-flight: default CAM layers filled in, and the values of every method and metric entry checked.

:func:`with_default_layers` gives each CAM entry that omits ``layers`` its model family's
default layer (:func:`~pipeline.methods.layers.default_layer`), so the saved config, the
plan and every worker name it explicitly.

:func:`check_entries` builds each method entry with its resolved parameters, as a
worker would, on the model it is given (the pre-flight passes the real model on CPU),
and checks each metric entry's values with the rule the metric applies first
(:meth:`~pipeline.metrics.MetricSpec.check_values`) at the config's image size, and on the
model (:meth:`~pipeline.metrics.MetricSpec.check_on_model`: the randomization test's blocks), without
running the model or the metric on data. It lists every problem, one per entry, with
its field path (``methods[0].params.p1: p1 must be in (0, 1], got 1.5``), so a value
that would fail every shard on a node fails at plan time instead.

:func:`check_layers` checks the layers of CAM entries on one forward of a zero image:
each must run and its output must become a ``[B, C, h, w]`` grid under the entry's ``reshape``.
"""
from __future__ import annotations

import re
from typing import Iterator, Mapping

import torch
from torch import nn

from .config import ConfigError, ExperimentConfig
from .methods import CamExplainer, build_method, method_class, method_parameters
from .methods.base import capture_outputs
from .methods.layers import RESHAPES, default_layer, to_grid
from .metrics import metric_spec
from .models import build_model
from .planning import method_params

__all__ = ["check_entries", "check_layers", "with_default_layers"]


def _cam_entries(config: ExperimentConfig) -> list[int]:
    return [i for i, e in enumerate(config.methods) if issubclass(method_class(e.name), CamExplainer)]


def with_default_layers(config: ExperimentConfig, model: nn.Module | None = None) -> ExperimentConfig:
    """``config`` with the default layer in every CAM entry that omits ``layers``; the model
    (built from the config unless given) is needed only when one does."""
    missing = [i for i in _cam_entries(config) if config.methods[i].layers is None]
    if not missing:
        return config
    model = build_model(config.model) if model is None else model
    try:
        layer = default_layer(model, config.data.image_size)
    except ValueError as error:
        raise ConfigError(f"methods[{missing[0]}].layers: {error}") from None
    methods = [e.model_copy(update={"layers": [layer]}) if i in missing else e for i, e in enumerate(config.methods)]
    return config.model_copy(update={"methods": methods})


def check_entries(config: ExperimentConfig, model: nn.Module) -> None:
    """Raise :class:`~pipeline.config.ConfigError` listing every method or metric entry whose values cannot work."""
    problems = [*_method_problems(config, model), *_metric_problems(config, model)]
    if problems:
        count = len(problems)
        raise ConfigError(f"{count} bad parameter value{'s' if count > 1 else ''}:\n  " + "\n  ".join(problems))


def _method_problems(config: ExperimentConfig, model: nn.Module) -> Iterator[str]:
    for index, entry in enumerate(config.methods):
        params = method_params(config, entry)
        if entry.layers:
            params["layer"] = list(entry.layers)
        try:
            build_method(entry.name, model, **params)
        except (TypeError, ValueError) as error:
            message = str(error).removeprefix(f"{method_class(entry.name).name}: ")
            prefix = f"methods[{index}]"
            paths = {name: f"{prefix}.params.{name}" for name in method_parameters(entry.name)}
            paths["layer"] = f"{prefix}.layers"
            yield _problem(message, paths, f"{prefix}.params")


def check_layers(config: ExperimentConfig, model: nn.Module) -> None:
    """Raise :class:`~pipeline.config.ConfigError` listing every layer of a CAM entry that does not
    run in the model's forward or gives no grid (an unknown one is named by :func:`check_entries`)."""
    problems = list(_layer_problems(config, model))
    if problems:
        raise ConfigError("\n".join(problems))


def _layer_problems(config: ExperimentConfig, model: nn.Module) -> Iterator[str]:
    modules = dict(model.named_modules())
    entries = [(i, config.methods[i]) for i in _cam_entries(config) if config.methods[i].layers]
    layers = sorted({layer for _, e in entries for layer in e.layers or () if layer and layer in modules})
    if not layers:
        return
    size = config.data.image_size
    with capture_outputs(model, layers) as captured, torch.no_grad():
        model(torch.zeros(1, 3, *size))
    for index, entry in entries:
        reshape = entry.params.get("reshape", "auto")
        for layer in entry.layers or ():
            if layer not in layers or reshape not in RESHAPES:
                continue
            if layer not in captured:
                yield f"methods[{index}].layers: layer {layer!r} does not run in the model's forward"
                continue
            try:
                to_grid(model, layer, captured[layer], reshape, size)
            except ValueError as error:
                yield f"methods[{index}].layers: {error}"


def _metric_problems(config: ExperimentConfig, model: nn.Module) -> Iterator[str]:
    for index, entry in enumerate(config.metrics):
        spec = metric_spec(entry.name)
        try:
            spec.check_values(entry.params, config.data.image_size)
            spec.check_on_model(entry.params, model)
        except (TypeError, ValueError) as error:
            prefix = f"metrics[{index}]"
            paths = {name: f"{prefix}.params.{name}" for name in spec.parameters}
            yield _problem(str(error), paths, f"{prefix}.params")


def _problem(message: str, paths: Mapping[str, str], fallback: str) -> str:
    """``path: message`` with the path of the parameter named first in ``message`` (as a word), else ``fallback``."""
    named = [
        (match.start(), path)
        for name, path in paths.items()
        if (match := re.search(rf"\b{re.escape(name)}\b", message)) is not None
    ]
    return f"{min(named)[1] if named else fallback}: {message}"
