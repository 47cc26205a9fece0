"""Explanation methods: ``build_method(name, model, **params)`` and the ``METHODS`` registry.

Each method lives in its own module over the bases of :mod:`pipeline.methods.base`.
``random`` and ``centre`` are baselines (chance and centre bias) that every evaluation
should print beside the real methods.
"""
from __future__ import annotations

import importlib
import inspect
from typing import Any

from torch import nn

from .base import CamExplainer, Explainer, Partial, SampledExplainer

__all__ = [
    "METHODS",
    "build_method",
    "method_class",
    "method_parameters",
    "Explainer",
    "CamExplainer",
    "SampledExplainer",
    "Partial",
]

#: method name -> "module:ClassName" inside this package (imported on first use)
_REGISTRY: dict[str, str] = {
    "rise": "rise:Rise",
    "rise-gaussian": "rise:GaussianRise",
    "gradcam": "gradcam:GradCam",
    "abscam-init": "abscam_init:AbsCamInit",
    "abscam-final": "abscam_final:AbsCamFinal",
    "fem": "fem:Fem",
    "scorecam": "scorecam:ScoreCam",
    "lime": "lime:Lime",
    "extremal": "extremal:ExtremalPerturbation",
    "random": "random_map:RandomMap",
    "centre": "centre:CentreBias",
}

#: the names of all methods
METHODS: tuple[str, ...] = tuple(_REGISTRY)


def method_class(name: str) -> type[Explainer]:
    """The class implementing method ``name``; an unknown name lists the known ones."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(METHODS)}")
    module_name, class_name = _REGISTRY[name].split(":")
    module = importlib.import_module(f"{__name__}.{module_name}")
    return getattr(module, class_name)


def method_parameters(name: str) -> dict[str, inspect.Parameter]:
    """The keyword parameters method ``name`` accepts (besides the model)."""
    signature = inspect.signature(method_class(name).__init__)
    return {k: p for k, p in signature.parameters.items() if k not in ("self", "model")}


def build_method(name: str, model: nn.Module | None, **params: Any) -> Explainer:
    """An explainer for ``model`` (``None``: a sampled method that only merges and finalizes);
    an unknown parameter lists the method's valid parameters."""
    valid = method_parameters(name)
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise TypeError(
            f"method {name!r} has no parameter {', '.join(map(repr, unknown))}; "
            f"valid parameters: {', '.join(valid)}"
        )
    missing = [k for k, p in valid.items() if p.default is inspect.Parameter.empty and k not in params]
    if missing:
        raise TypeError(f"method {name!r} needs parameter(s): {', '.join(missing)}")
    return method_class(name)(model, **params)
