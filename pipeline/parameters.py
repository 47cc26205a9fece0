"""Parameters of methods and metrics, declared once in their signatures and validated from there.

A parameter is declared in the signature of a method's ``__init__`` or a metric's
function, with its meaning, unit and range in a :class:`Param`::

    n_masks: Annotated[int, Param("masks drawn per image", unit="masks", ge=1)] = 4000

:func:`validate` checks values against these declarations with pydantic (strict: an
integer parameter takes no float or bool, a number no NaN or infinity, a ``Literal`` one
of its values); a plain typed parameter (a plug-in's ``quantile: float = 0.9``) is checked
against its type alone, an untyped one not at all. :func:`describe` turns the same
declarations into the rows that ``xai-pipeline methods`` and ``xai-pipeline metrics`` print.
Checks that relate several parameters, or a parameter to the image size, stay in the
method or metric.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import functools
import inspect
import math
import types
import typing
from typing import Any, Annotated, Callable, Iterator, Literal, Mapping

import annotated_types
import pydantic

__all__ = ["Param", "ParameterInfo", "ParameterError", "describe", "validate", "validated"]

_STRICT = pydantic.ConfigDict(strict=True, arbitrary_types_allowed=True, allow_inf_nan=False)
_SKIPPED = ("self", "model", "cls")


@dataclasses.dataclass(frozen=True)
class Param(annotated_types.GroupedMetadata):
    """What a parameter means, its unit and its range (bounds ``ge``/``gt``/``le``/``lt``, at least
    ``min_length`` items), for ``Annotated[type, Param(...)]``; pydantic reads the bounds from it."""

    meaning: str
    unit: str = ""
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    min_length: int | None = None

    def __iter__(self) -> Iterator[object]:  # type: ignore[override]
        for bound, value in (("Ge", self.ge), ("Gt", self.gt), ("Le", self.le), ("Lt", self.lt)):
            if value is not None:
                yield getattr(annotated_types, bound)(value)
        if self.min_length is not None:
            yield annotated_types.MinLen(self.min_length)

    @property
    def interval(self) -> str:
        """The bounds as ``[1, 10)``, ``>= 1``, ``< 1``, or ``""`` when there are none."""
        low = high = None
        if self.ge is not None or self.gt is not None:
            low = f"[{_number(self.ge)}" if self.ge is not None else f"({_number(self.gt)}"
        if self.le is not None or self.lt is not None:
            high = f"{_number(self.le)}]" if self.le is not None else f"{_number(self.lt)})"
        if low and high:
            return f"{low}, {high}"
        if low:
            return f"{'>=' if low[0] == '[' else '>'} {low[1:]}"
        if high:
            return f"{'<=' if high[-1] == ']' else '<'} {high[:-1]}"
        return ""


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


class ParameterError(ValueError):
    """Values that break their parameters' declarations: ``problems`` holds one message per bad value,
    starting with the parameter's name; the error's message is ``owner: `` and all of them."""

    def __init__(self, owner: str, problems: list[str]) -> None:
        super().__init__(f"{owner}: {'; '.join(problems)}")
        self.problems = problems


@dataclasses.dataclass(frozen=True)
class ParameterInfo:
    """One parameter as documented: its name, type, default (``None``: required), range, unit and meaning."""

    name: str
    type: str
    default: str | None
    range: str
    unit: str
    meaning: str


def _parameters(function: Callable[..., Any], keyword_only: bool) -> list[inspect.Parameter]:
    kinds = (inspect.Parameter.KEYWORD_ONLY,) if keyword_only else (
        inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p for p in inspect.signature(function).parameters.values() if p.kind in kinds and p.name not in _SKIPPED]


def _annotations(function: Callable[..., Any]) -> dict[str, Any]:
    """Each parameter's annotation, resolved (``Any`` where none is given or it cannot be resolved)."""
    try:
        hints = typing.get_type_hints(inspect.unwrap(function), include_extras=True)
    except Exception:  # a library's annotation naming what its module does not define
        hints = {}
    annotations = {}
    for parameter in inspect.signature(function).parameters.values():
        annotation = hints.get(parameter.name, parameter.annotation)
        annotations[parameter.name] = Any if annotation is inspect.Parameter.empty or isinstance(
            annotation, str) else annotation
    return annotations


@functools.lru_cache(maxsize=None)
def _adapters(function: Callable[..., Any]) -> dict[str, pydantic.TypeAdapter[Any]]:
    adapters = {}
    for name, annotation in _annotations(function).items():
        try:
            adapters[name] = pydantic.TypeAdapter(annotation, config=_STRICT)
        except (pydantic.PydanticSchemaGenerationError, pydantic.PydanticUserError, TypeError):
            if _declaration(annotation)[0] is not None:
                raise  # a declaration of this package's or a plug-in's must be checkable
            adapters[name] = pydantic.TypeAdapter(Any)  # a library's type pydantic cannot check: taken as given
    return adapters


def _problem(name: str, error: pydantic.ValidationError) -> str:
    """One message for a parameter's value: what each accepted form wants (a union has several), and the value."""
    reasons: dict[tuple[str, str], list[str]] = {}
    for item in error.errors():
        path = name + "".join(f"[{part}]" for part in item["loc"] if isinstance(part, int))
        reason = item["msg"].removeprefix("Input ")
        reasons.setdefault((path, repr(item["input"])), []).append(reason[:1].lower() + reason[1:])
    return "; or ".join(f"{path} {' or '.join(dict.fromkeys(r))}, got {value}" for (path, value), r in reasons.items())


def validate(owner: str, function: Callable[..., Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` (a subset of ``function``'s parameters) checked against their declarations; the values
    as validated. :class:`ParameterError` names ``owner`` and every bad parameter."""
    adapters = _adapters(function)
    values, problems = {}, []
    for name, value in params.items():
        if name not in adapters:
            values[name] = value
            continue
        try:
            values[name] = adapters[name].validate_python(value)
        except pydantic.ValidationError as error:
            problems.append(_problem(name, error))
    if problems:
        raise ParameterError(owner, problems)
    return values


def validated(function: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a method's ``__init__`` or a metric function: every call checks its parameters (a
    function's keyword-only ones when it has some, as a metric's) by :func:`validate`, named after
    the method's ``name`` or the function."""
    signature = inspect.signature(function)
    keyword_only = any(p.kind is inspect.Parameter.KEYWORD_ONLY for p in signature.parameters.values())
    declared = {p.name for p in _parameters(function, keyword_only)}

    @functools.wraps(function)
    def checked(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        owner = getattr(bound.arguments.get("self"), "name", function.__name__)
        given = {k: v for k, v in bound.arguments.items() if k in declared}
        bound.arguments.update(validate(owner, function, given))
        return function(*bound.args, **bound.kwargs)

    return checked


def _type_name(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return _type_name(args[0])
    if origin is Literal:
        return "choice"
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin in (collections.abc.Sequence, list, tuple):
        return f"list of {_type_name(args[0])}" if args else "list"
    if annotation is Any:
        return "any"
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))


def _declaration(annotation: Any) -> tuple[Param | None, str]:
    """The :class:`Param` of an annotation (``None``) and its range in words."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        param = next((m for m in args[1:] if isinstance(m, Param)), None)
        inner, inner_range = _declaration(args[0])
        own = "" if param is None else param.interval
        if param is not None and param.min_length:
            own = f"at least {param.min_length} item{'s' if param.min_length > 1 else ''}"
        return param or inner, ", ".join(r for r in (own, inner_range) if r)
    if origin is Literal:
        return None, "one of " + ", ".join(map(str, args))
    if origin in (typing.Union, types.UnionType):
        parts = [_declaration(a) for a in args]
        return next((p for p, _ in parts if p is not None), None), " or ".join(r for _, r in parts if r)
    if origin in (collections.abc.Sequence, list, tuple) and args:
        _, inner_range = _declaration(args[0])
        return None, f"each {inner_range}" if inner_range else ""
    return None, ""


def _default(parameter: inspect.Parameter) -> str | None:
    value = parameter.default
    if value is inspect.Parameter.empty:
        return None
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:g}"
    return repr(value) if isinstance(value, str) else str(value)


def describe(function: Callable[..., Any], *, keyword_only: bool = False) -> list[ParameterInfo]:
    """The documented parameters of a method's ``__init__`` (``model`` excluded) or, with
    ``keyword_only``, of a metric function, from their declarations."""
    annotations = _annotations(function)
    rows = []
    for parameter in _parameters(function, keyword_only):
        param, interval = _declaration(annotations[parameter.name])
        rows.append(ParameterInfo(
            parameter.name, _type_name(annotations[parameter.name]), _default(parameter), interval,
            param.unit if param else "", param.meaning if param else "",
        ))
    return rows
