"""pipeline.parameters: declarations checked strictly, errors naming each parameter, and the documentation rows."""
from __future__ import annotations

from typing import Annotated, Any, Literal, Sequence

import pytest
import torch
from torch import nn

from pipeline.methods import METHODS, Explainer, build_method, method_info
from pipeline.metrics import BUILTIN_METRICS, METRICS, metric_info
from pipeline.parameters import Param, ParameterError, ParameterInfo, describe, validate, validated

Share = Annotated[float, Param("", gt=0, lt=1)]


def declared(
    model: object,
    count: Annotated[int, Param("things per image", unit="things", ge=1, le=10)] = 3,
    share: Annotated[float, Param("kept share", gt=0, le=1)] = 0.5,
    shares: Annotated[Sequence[Share], Param("shares in turn", min_length=1)] = (0.5,),
    mode: Annotated[Literal["fast", "exact"], Param("how")] = "fast",
    fill: Literal["mean"] | Sequence[float] = "mean",
    flag: bool = False,
    limit: Annotated[int | None, Param("at most (None: no limit)", ge=1)] = None,
    anything=None,  # type: ignore[no-untyped-def]
) -> None:
    """A function with every kind of declaration."""


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"count": 0}, "count should be greater than or equal to 1, got 0"),
        ({"count": 11}, "count should be less than or equal to 10, got 11"),
        ({"count": 2.0}, "count should be a valid integer, got 2.0"),
        ({"count": True}, "count should be a valid integer, got True"),
        ({"count": "3"}, "count should be a valid integer, got '3'"),
        ({"share": 0}, "share should be greater than 0, got 0"),
        ({"share": float("nan")}, "share should be a finite number, got nan"),
        ({"share": False}, "share should be a valid number, got False"),
        ({"shares": []}, "shares value should have at least 1 item after validation, not 0, got []"),
        ({"shares": [0.5, 1.0]}, "shares[1] should be less than 1, got 1.0"),
        ({"mode": "slow"}, "mode should be 'fast' or 'exact', got 'slow'"),
        ({"fill": "median"}, "fill should be 'mean' or 'str' instances are not allowed as a Sequence value, got 'median'"),
        ({"flag": "yes"}, "flag should be a valid boolean, got 'yes'"),
        ({"limit": 0}, "limit should be greater than or equal to 1, got 0"),
    ],
)
def test_a_value_breaking_its_declaration_is_named(params: dict[str, Any], message: str) -> None:
    with pytest.raises(ParameterError) as error:
        validate("thing", declared, params)
    assert error.value.problems == [message]
    assert str(error.value) == f"thing: {message}"


def test_good_values_pass_and_each_bad_one_is_a_problem_of_its_own() -> None:
    good = {"count": 10, "share": 1, "shares": (0.25, 0.75), "mode": "exact", "fill": [0.0, 1.0], "flag": True,
            "limit": None, "anything": object(), "unknown": "left to the caller"}
    values = validate("thing", declared, good)
    assert values == good and isinstance(values["share"], float)
    with pytest.raises(ParameterError) as error:
        validate("thing", declared, {"count": 0, "mode": 1, "anything": "x"})
    assert [p.split(" ")[0] for p in error.value.problems] == ["count", "mode"]


def test_describe_turns_the_declarations_into_documentation_rows() -> None:
    rows = {row.name: row for row in describe(declared)}
    assert list(rows) == ["count", "share", "shares", "mode", "fill", "flag", "limit", "anything"]
    assert rows["count"] == ParameterInfo("count", "int", "3", "[1, 10]", "things", "things per image")
    assert rows["share"] == ParameterInfo("share", "float", "0.5", "(0, 1]", "", "kept share")
    assert rows["shares"].type == "list of float" and rows["shares"].range == "at least 1 item, each (0, 1)"
    assert (rows["mode"].type, rows["mode"].default, rows["mode"].range) == ("choice", "'fast'", "one of fast, exact")
    assert rows["fill"] == ParameterInfo("fill", "choice | list of float", "'mean'", "one of mean", "", "")
    assert rows["limit"].type == "int | None" and rows["limit"].range == ">= 1"
    assert rows["anything"] == ParameterInfo("anything", "any", "None", "", "", "")


class Stretch(Explainer):
    """A plug-in whose ``__init__`` is checked on every call."""

    name = "stretch"

    @validated
    def __init__(self, model: nn.Module, factor: Annotated[float, Param("scale", gt=0)] = 1.0) -> None:
        super().__init__(model)
        self.factor = factor

    def explain(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return images.mean(dim=1) * self.factor


@validated
def share_above(maps: torch.Tensor, *, level: Annotated[float, Param("level", ge=0, le=1)] = 0.5) -> torch.Tensor:
    return (maps > level).double().flatten(1).mean(dim=1)


def test_validated_checks_direct_calls_naming_the_method_or_function() -> None:
    assert Stretch(nn.Identity(), 2).factor == 2.0
    with pytest.raises(ParameterError, match="^stretch: factor should be greater than 0, got -1$"):
        Stretch(nn.Identity(), factor=-1)
    maps = torch.tensor([[[0.0, 1.0], [1.0, 1.0]]])
    torch.testing.assert_close(share_above(maps, level=0.5), torch.tensor([0.75], dtype=torch.float64))
    with pytest.raises(ParameterError, match="^share_above: level should be less than or equal to 1, got 2$"):
        share_above(maps, level=2)


def test_plain_typed_plugin_parameters_are_checked_by_build_method() -> None:
    class Plain(Explainer):
        name = "plain"

        def __init__(self, model: nn.Module, passes: int = 2, note=None) -> None:  # type: ignore[no-untyped-def]
            super().__init__(model)

        def explain(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return images.mean(dim=1)

    from pipeline.methods import register_method, _REGISTRY

    register_method("plain-test")(Plain)
    try:
        build_method("plain-test", nn.Identity(), passes=3, note=[1, "x"])
        with pytest.raises(ParameterError, match="^plain: passes should be a valid integer, got 2.5$"):
            build_method("plain-test", nn.Identity(), passes=2.5)
    finally:
        del _REGISTRY["plain-test"]


@pytest.mark.parametrize("name", METHODS)
def test_every_builtin_method_parameter_says_what_it_means(name: str) -> None:
    for row in method_info(name):
        assert row.meaning and row.type != "any", (name, row)


@pytest.mark.parametrize("name", BUILTIN_METRICS)
def test_every_builtin_metric_parameter_says_what_it_means(name: str) -> None:
    assert [row.name for row in metric_info(name)] == list(METRICS[name].parameters)
    for row in metric_info(name):
        assert row.meaning and row.type != "any", (name, row)
