"""The pre-flight check of the parameter values of every method and metric entry.

:func:`check_entries` builds each method entry with its resolved parameters, as a
worker would, on the model it is given (the pre-flight passes the real model on CPU),
and checks each metric entry's values with the rule the metric applies first
(:meth:`~pipeline.metrics.MetricSpec.check_values`) at the config's image size, without
running the model or the metric on data. It lists every problem, one per entry, with
its field path (``methods[0].params.p1: p1 must be in (0, 1], got 1.5``), so a value
that would fail every shard on a node fails at plan time instead.
"""
from __future__ import annotations

import re
from typing import Iterator, Mapping

from torch import nn

from .config import ConfigError, ExperimentConfig
from .methods import build_method, method_class, method_parameters
from .metrics import METRICS
from .planning import method_params

__all__ = ["check_entries"]


def check_entries(config: ExperimentConfig, model: nn.Module) -> None:
    """Raise :class:`~pipeline.config.ConfigError` listing every method or metric entry whose values cannot work."""
    problems = [*_method_problems(config, model), *_metric_problems(config)]
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


def _metric_problems(config: ExperimentConfig) -> Iterator[str]:
    for index, entry in enumerate(config.metrics):
        spec = METRICS[entry.name]
        try:
            spec.check_values(entry.params, config.data.image_size)
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
