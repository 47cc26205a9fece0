"""The pre-flight: default CAM layers filled in, and the values of every method and metric entry checked.

:func:`with_default_layers` gives each CAM entry that omits ``layers`` its model family's
default layer (:func:`~pipeline.methods.layers.default_layer`), so the saved config, the
plan and every worker name it explicitly.

:func:`check_entries` builds each method entry with its resolved parameters, as a
worker would, on the model it is given (the pre-flight passes the real model on CPU),
and checks each metric entry's values with the rule the metric applies first
(:meth:`~pipeline.metrics.MetricSpec.check_values`) at the config's image size, and on the
model (:meth:`~pipeline.metrics.MetricSpec.check_on_model`: the randomization test's blocks), without
running the model or the metric on data (``batch_size: auto`` is checked as a batch of
one). It lists every problem, one per entry, with its field path
(``methods[0].params.p1: p1 should be less than or equal to 1, got 1.5``; a value that
breaks its declaration in :mod:`pipeline.parameters` gets one line per parameter), so a
value that would fail every shard on a node fails at plan time instead.

:func:`check_class_count` refuses an ImageFolder tree whose number of class folders is not the
model's ``num_classes`` unless ``data.class_names`` lists the model's classes: the labels would shift.

:func:`check_layers` checks the layers of CAM entries on one forward of a zero image:
each must run and its output must become a ``[B, C, h, w]`` grid under the entry's ``reshape``;
it returns each grid's channel count ``C``, what Score-CAM-like methods cost (:mod:`pipeline.cost`).
"""
from __future__ import annotations

import re
from typing import Iterator, Mapping

import torch
from torch import nn

from .batch_size import with_batch_size
from .config import ConfigError, ExperimentConfig
from .data import ImageSet
from .methods import CamExplainer, build_method, method_class, method_parameters
from .methods.base import capture_outputs
from .methods.layers import RESHAPES, default_layer, to_grid
from .metrics import metric_spec
from .models import build_model
from .parameters import ParameterError
from .planning import method_params

__all__ = ["check_entries", "check_layers", "check_class_count", "with_default_layers"]


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
        params = with_batch_size(method_params(config, entry), 1)
        if entry.layers:
            params["layer"] = list(entry.layers)
        try:
            build_method(entry.name, model, **params)
        except (TypeError, ValueError) as error:
            prefix = f"methods[{index}]"
            paths = {name: f"{prefix}.params.{name}" for name in method_parameters(entry.name)}
            paths["layer"] = f"{prefix}.layers"
            for message in _messages(error, method_class(entry.name).name):
                yield _problem(message, paths, f"{prefix}.params")


def check_layers(config: ExperimentConfig, model: nn.Module) -> dict[str, dict[str, int]]:
    """Raise :class:`~pipeline.config.ConfigError` listing every layer of a CAM entry that does not
    run in the model's forward or gives no grid (an unknown one is named by :func:`check_entries`);
    returns the channel count of each layer's grid, per CAM entry (by label)."""
    channels: dict[str, dict[str, int]] = {}
    problems = list(_layer_problems(config, model, channels))
    if problems:
        raise ConfigError("\n".join(problems))
    return channels


def _layer_problems(config: ExperimentConfig, model: nn.Module, channels: dict[str, dict[str, int]]) -> Iterator[str]:
    """The problems of the CAM entries' layers; the channel count of every grid goes into ``channels``."""
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
                grid = to_grid(model, layer, captured[layer], reshape, size)
            except ValueError as error:
                yield f"methods[{index}].layers: {error}"
                continue
            channels.setdefault(entry.label, {})[layer] = int(grid.shape[1])


def _metric_problems(config: ExperimentConfig, model: nn.Module) -> Iterator[str]:
    for index, entry in enumerate(config.metrics):
        spec = metric_spec(entry.name)
        try:
            params = with_batch_size(entry.params, 1)
            spec.check_values(params, config.data.image_size)
            spec.check_on_model(params, model)
        except (TypeError, ValueError) as error:
            prefix = f"metrics[{index}]"
            paths = {name: f"{prefix}.params.{name}" for name in spec.parameters}
            for message in _messages(error, spec.name):
                yield _problem(message, paths, f"{prefix}.params")


def _messages(error: Exception, owner: str) -> list[str]:
    """The problems an error reports, without the ``owner: `` prefix: one per bad value of a :class:`ParameterError`."""
    if isinstance(error, ParameterError):
        return error.problems
    return [str(error).removeprefix(f"{owner}: ")]


def _problem(message: str, paths: Mapping[str, str], fallback: str) -> str:
    """``path: message`` with the path of the parameter named first in ``message`` (as a word), else ``fallback``."""
    named = [
        (match.start(), path)
        for name, path in paths.items()
        if (match := re.search(rf"\b{re.escape(name)}\b", message)) is not None
    ]
    return f"{min(named)[1] if named else fallback}: {message}"


def check_class_count(config: ExperimentConfig, images: ImageSet) -> None:
    """Raise :class:`~pipeline.config.ConfigError` when ``model.num_classes`` differs from the number of
    class folders of ``data.root`` and ``data.class_names`` does not give the model's classes."""
    outputs, folders = config.model.num_classes, images.class_names
    if config.data.root is None or config.data.class_names is not None or outputs in (None, len(folders)):
        return
    raise ConfigError(
        f"model.num_classes is {outputs} but data.root {config.data.root} has {len(folders)} class folder(s) "
        f"({', '.join(folders)}): the labels would not be the model's outputs. Give data.class_names, the "
        f"model's {outputs} class names in output order (each folder is labelled by its name's index there)"
    )
