"""Explanation methods: ``build_method(name, model, **params)`` and the method registry.

Each method lives in its own module over the bases of :mod:`pipeline.methods.base`.
``random`` and ``centre`` are baselines (chance and centre bias) that every evaluation
should print beside the real methods.

A method is found by its registered name (the built-ins of :data:`METHODS`, and classes
decorated with :func:`register_method`), as ``captum:NAME`` or ``grad-cam:NAME``
(:mod:`pipeline.methods.backends`), by ``package.module:Class``, or by an entry point
of group ``xai_pipeline.methods`` (:mod:`pipeline.plugins`). A plug-in is an
:class:`Explainer` subclass with a ``name``; its ``__init__(model, **params)`` keywords are
its parameters, validated at plan time like the built-ins' from their declarations
(:mod:`pipeline.parameters`: a type, or ``Annotated[type, Param(meaning, unit, range)]``);
:func:`method_info` documents them (``xai-pipeline methods``). Subclassing
:class:`CamExplainer` makes it take ``layers``; subclassing :class:`SampledExplainer`
(its partial form) makes it sharded by sample range.
"""
from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable, TypeVar

from torch import nn

from ..parameters import ParameterInfo, describe, validate
from ..plugins import METHOD_GROUP, PluginError, entry_point_names, load_plugin
from .backends import backend_class
from .base import CamExplainer, Explainer, Partial, SampledExplainer

__all__ = [
    "METHODS",
    "register_method",
    "method_names",
    "build_method",
    "method_class",
    "method_parameters",
    "method_info",
    "classifies_in_pass",
    "Explainer",
    "CamExplainer",
    "SampledExplainer",
    "Partial",
]

#: method name -> "module:ClassName" inside this package (imported on first use) or the class
_REGISTRY: dict[str, str | type[Explainer]] = {
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

#: the names of the built-in methods
METHODS: tuple[str, ...] = tuple(_REGISTRY)

E = TypeVar("E", bound=type[Explainer])


def register_method(name: str) -> Callable[[E], E]:
    """Class decorator: make an :class:`Explainer` subclass method ``name`` (its ``name`` unless it sets one)."""

    def register(cls: E) -> E:
        if not (isinstance(cls, type) and issubclass(cls, Explainer)):
            raise TypeError(f"register_method({name!r}): {cls!r} is not an Explainer subclass")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"method {name!r} is already registered")
        if "name" not in cls.__dict__:
            cls.name = name
        _REGISTRY[name] = cls
        return cls

    return register


def method_names() -> list[str]:
    """The names of the registered methods and of the installed method entry points."""
    return [*_REGISTRY, *(n for n in entry_point_names(METHOD_GROUP) if n not in _REGISTRY)]


def method_class(name: str) -> type[Explainer]:
    """The class implementing method ``name``: registered, ``module:Class`` or an entry point
    (a plug-in is registered under ``name`` once found); an unknown name lists the known ones."""
    if name not in _REGISTRY:
        found = backend_class(name) or load_plugin(name, METHOD_GROUP)
        if found is None:
            raise ValueError(f"unknown method {name!r}; known methods: {', '.join(method_names())}")
        if not (isinstance(found, type) and issubclass(found, Explainer)):
            raise PluginError(f"plug-in method {name!r} is {found!r}, not an Explainer subclass")
        if not isinstance(getattr(found, "name", None), str):
            raise PluginError(f"plug-in method {name!r}: class {found.__name__} must set `name`")
        _REGISTRY[name] = found
    entry = _REGISTRY[name]
    if isinstance(entry, str):
        module_name, class_name = entry.split(":")
        return getattr(importlib.import_module(f"{__name__}.{module_name}"), class_name)
    return entry


def method_parameters(name: str) -> dict[str, inspect.Parameter]:
    """The keyword parameters method ``name`` accepts (besides the model)."""
    signature = inspect.signature(method_class(name).__init__)
    return {k: p for k, p in signature.parameters.items() if k not in ("self", "model")}


def method_info(name: str) -> list[ParameterInfo]:
    """The documented parameters of method ``name`` (meaning, unit, default, range), from their declarations."""
    return describe(method_class(name).__init__)


def build_method(name: str, model: nn.Module | None, **params: Any) -> Explainer:
    """An explainer for ``model`` (``None``: a sampled method that only merges and finalizes);
    an unknown parameter lists the method's valid parameters. A CAM method's layers may be given
    as ``layers`` (the config's key) or ``layer``: dotted names or the modules themselves."""
    valid = method_parameters(name)
    if "layers" in params and "layers" not in valid and "layer" in valid:
        if "layer" in params:
            raise TypeError(f"method {name!r}: give its layers once, as `layers` or as `layer`")
        params["layer"] = params.pop("layers")
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise TypeError(
            f"method {name!r} has no parameter {', '.join(map(repr, unknown))}; "
            f"valid parameters: {', '.join(valid)}"
        )
    missing = [k for k, p in valid.items() if p.default is inspect.Parameter.empty and k not in params]
    if missing:
        raise TypeError(f"method {name!r} needs parameter(s): {', '.join(missing)}")
    cls = method_class(name)
    return cls(model, **validate(cls.name, cls.__init__, params))


def classifies_in_pass(name: str) -> bool:
    """True when method ``name`` computes its maps in one pass whose logits it gives
    (:meth:`CamExplainer.explain_pass`): its explain shards need no forward of their own to
    find the predicted classes."""
    cls = method_class(name)
    return issubclass(cls, CamExplainer) and cls.classifies
