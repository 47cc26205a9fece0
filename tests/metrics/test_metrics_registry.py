"""The METRICS registry and parameter checks of pipeline.metrics."""
from __future__ import annotations

import dataclasses

import pytest

import pipeline.metrics as metrics
from pipeline.metrics import METRICS, check_metric_parameters, metric_spec


def test_registry_describes_every_metric() -> None:
    expected = {  # name: (label, group, needs model, needs gt, parameters, output)
        "insertion": ("Insertion ↑", "perturbation", True, False, ("step", "substrate", "blur", "batch_size"), 0),
        "deletion": ("Deletion ↓", "perturbation", True, False, ("step", "substrate", "blur", "batch_size"), 0),
        "pcc": ("PCC ↑", "groundtruth", False, True, (), None),
        "ssim": (
            "SSIM ↑", "groundtruth", False, True,
            ("gaussian_weights", "sigma", "win_size", "use_sample_covariance"), None,
        ),
        "average_drop": ("Average Drop ↓", "perturbation", True, False, ("top_percent", "batch_size"), 0),
        "average_increase": ("Average Increase ↑", "perturbation", True, False, ("top_percent", "batch_size"), 1),
        "pointing_game": ("Pointing game ↑", "groundtruth", False, True, ("tolerance", "threshold", "relative"), None),
    }
    assert list(METRICS)[: len(expected)] == list(expected)  # plug-ins registered by other tests follow
    for name, (label, group, needs_model, needs_gt, parameters, output) in expected.items():
        spec = METRICS[name]
        assert (spec.name, spec.label, spec.group) == (name, label, group)
        assert (spec.needs_model, spec.needs_ground_truth, spec.parameters, spec.output) == (
            needs_model, needs_gt, parameters, output,
        )
        assert spec.arrow == ("↑" if spec.higher_is_better else "↓")
    assert METRICS["average_drop"].function is metrics.average_drop_increase
    with pytest.raises(dataclasses.FrozenInstanceError):
        METRICS["pcc"].higher_is_better = False  # type: ignore[misc]


def test_unknown_names_and_parameters_list_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="known metrics: insertion, deletion, pcc"):
        metric_spec("insertoin")
    with pytest.raises(TypeError, match="'stpe'.*valid parameters: step, substrate, blur, batch_size"):
        check_metric_parameters("insertion", {"stpe": 10})
    with pytest.raises(TypeError, match=r"valid parameters: \(none\)"):
        check_metric_parameters("pcc", ["sigma"])
    check_metric_parameters("ssim", {"sigma": 2.0, "win_size": 7})


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("insertion", {"step": 0}, "insertion: step should be greater than or equal to 1, got 0"),
        ("insertion", {"step": 2.5}, "step should be a valid integer, got 2.5"),
        ("deletion", {"step": 1025}, "step 1025 exceeds the 1024 pixels of a 32x32 map"),
        ("deletion", {"substrate": "noise"},
         "substrate should be 'blur', 'zeros' or 'mean' or should be an instance of Tensor, got 'noise'"),
        ("insertion", {"blur": "box"}, "blur should be 'rise' or 'gaussian', got 'box'"),
        ("insertion", {"batch_size": True}, "batch_size should be a valid integer, got True"),
        ("ssim", {"sigma": -1}, "ssim: sigma should be greater than 0, got -1"),
        ("ssim", {"sigma": float("inf"), "gaussian_weights": False}, "sigma should be a finite number"),
        ("ssim", {"sigma": 5.0, "gaussian_weights": True}, r"win_size 37 exceeds the map size \(32, 32\)"),
        ("ssim", {"win_size": 4}, "win_size must be odd, got 4"),
        ("ssim", {"win_size": 0}, "win_size should be greater than or equal to 1, got 0"),
        ("ssim", {"gaussian_weights": "no"}, "gaussian_weights should be a valid boolean, got 'no'"),
        ("ssim", {"win_size": 1}, "use_sample_covariance needs win_size > 1"),
        ("average_drop", {"top_percent": 0}, "top_percent should be greater than 0, got 0"),
        ("average_drop", {"top_percent": 100.5}, "top_percent should be less than or equal to 100, got 100.5"),
        ("average_increase", {"top_percent": "10"}, "top_percent should be a valid number, got '10'"),
        ("average_drop", {"batch_size": 0}, "batch_size should be greater than or equal to 1, got 0"),
        ("pointing_game", {"tolerance": -1}, "tolerance should be greater than or equal to 0, got -1"),
        ("pointing_game", {"tolerance": 44}, "tolerance must be a number in"),
        ("pointing_game", {"threshold": 1.0}, r"threshold must be a number in \[0, 1\), got 1.0"),
        ("pointing_game", {"threshold": -0.1}, "threshold must be a number in"),
        ("pointing_game", {"threshold": float("nan"), "relative": False}, "threshold should be a finite number"),
        ("pointing_game", {"relative": "yes"}, "relative should be a valid boolean, got 'yes'"),
    ],
)
def test_check_values_rejects_what_the_metric_would(name: str, params: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        METRICS[name].check_values(params, (32, 32))


def test_check_values_accepts_the_defaults_and_good_values() -> None:
    for spec in METRICS.values():
        spec.check_values({}, (32, 32))
    METRICS["insertion"].check_values({"step": 1024, "substrate": "mean", "batch_size": 1}, (32, 32))
    METRICS["ssim"].check_values({"gaussian_weights": False, "win_size": 31}, (32, 32))
    METRICS["average_drop"].check_values({"top_percent": 100}, (8, 8))
    METRICS["pointing_game"].check_values({"threshold": 7.5, "relative": False, "tolerance": 0}, (32, 32))
    with pytest.raises(ValueError, match=r"win_size 7 exceeds the map size \(6, 6\)"):
        METRICS["ssim"].check_values({}, (6, 6))  # the default 7 x 7 window does not fit


def test_public_api() -> None:
    for name in metrics.__all__:
        assert hasattr(metrics, name), name


def test_randomization_is_a_metric_that_runs_the_scored_method() -> None:
    spec = METRICS["randomization"]
    assert (spec.label, spec.group, spec.needs_model, spec.needs_method) == (
        "Randomization ↓", "randomization", True, True)
    assert (spec.parameters, spec.output, spec.curve) == (("blocks", "steps", "seed"), 0, 1)


def test_a_registered_metric_that_needs_the_method_is_called_with_it() -> None:
    import torch

    calls = []

    def method_twice(model, images, maps, targets, method, *, factor: float = 1.0):  # type: ignore[no-untyped-def]
        calls.append(method)
        return method(model, images, targets).sum(dim=(1, 2)) * factor

    try:
        metrics.register_metric("test_method_twice", needs_method=True)(method_twice)
        spec = METRICS["test_method_twice"]
        assert (spec.needs_model, spec.needs_method, spec.group, spec.parameters) == (
            True, True, "perturbation", ("factor",))
        images, maps, targets = torch.ones(2, 3, 4, 4), torch.zeros(2, 4, 4), torch.zeros(2, dtype=torch.long)
        ones = lambda model, images, targets: torch.ones(len(images), 4, 4)  # noqa: E731
        values = spec.values(spec.call(torch.nn.Identity(), images, maps, targets, None, {"factor": 2.0}, ones))
        assert values.tolist() == [32.0, 32.0] and calls == [ones]
        with pytest.raises(ValueError, match="metric 'test_method_twice' runs the scored method again"):
            spec.call(torch.nn.Identity(), images, maps, targets, None, {})
    finally:
        METRICS.pop("test_method_twice", None)
