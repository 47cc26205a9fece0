"""Finding plug-in methods and metrics outside the registries.

A config names a plug-in as ``package.module:attribute`` (imported here, as
``model.factory`` is) or by the name of a Python entry point in group
:data:`METHOD_GROUP` or :data:`METRIC_GROUP` of an installed distribution::

    [options.entry_points]
    xai_pipeline.methods =
        my-cam = my_lab.xai:MyCam
    xai_pipeline.metrics =
        sparsity = my_lab.xai:sparsity
"""
from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from .errors import PipelineError

__all__ = ["METHOD_GROUP", "METRIC_GROUP", "PluginError", "load_plugin", "entry_point_names"]

METHOD_GROUP = "xai_pipeline.methods"
METRIC_GROUP = "xai_pipeline.metrics"


class PluginError(PipelineError, ValueError):
    """A plug-in named in a config cannot be loaded."""


def entry_point_names(group: str) -> list[str]:
    """The names of the installed entry points of ``group``."""
    return sorted(ep.name for ep in entry_points(group=group))


def load_plugin(name: str, group: str) -> object | None:
    """The object ``name`` stands for: ``module:attribute``, else the entry point ``name`` of
    ``group``; ``None`` when it is neither. An import that fails raises :class:`PluginError`."""
    if ":" in name:
        module_name, _, attribute = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise PluginError(f"plug-in {name!r}: cannot import {module_name!r}: {error}") from None
        if not hasattr(module, attribute):
            raise PluginError(f"plug-in {name!r}: module {module_name!r} has no attribute {attribute!r}")
        return getattr(module, attribute)
    found = [ep for ep in entry_points(group=group) if ep.name == name]
    if not found:
        return None
    try:
        return found[0].load()
    except ImportError as error:
        raise PluginError(f"entry point {name!r} of group {group}: cannot load {found[0].value!r}: {error}") from None
