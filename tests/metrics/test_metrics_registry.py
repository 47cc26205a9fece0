"""The METRICS registry and parameter checks of pipeline.metrics."""
from __future__ import annotations

import dataclasses

import pytest

import pipeline.metrics as metrics
from pipeline.metrics import METRICS, check_metric_parameters, metric_spec


def test_registry_describes_every_metric() -> None:
    expected = {  # name: (label, group, needs model, needs gt, parameters, output)
        "insertion": ("Insertion ↑", "perturbation", True, False, ("step", "substrate", "batch_size"), 0),
        "deletion": ("Deletion ↓", "perturbation", True, False, ("step", "substrate", "batch_size"), 0),
        "pcc": ("PCC ↑", "groundtruth", False, True, (), None),
        "ssim": (
            "SSIM ↑", "groundtruth", False, True,
            ("gaussian_weights", "sigma", "win_size", "use_sample_covariance"), None,
        ),
        "average_drop": ("Average Drop ↓", "perturbation", True, False, ("top_percent", "batch_size"), 0),
        "average_increase": ("Average Increase ↑", "perturbation", True, False, ("top_percent", "batch_size"), 1),
        "pointing_game": ("Pointing game ↑", "groundtruth", False, True, ("tolerance", "threshold", "relative"), None),
    }
    assert list(METRICS) == list(expected)
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
    with pytest.raises(TypeError, match="'stpe'.*valid parameters: step, substrate, batch_size"):
        check_metric_parameters("insertion", {"stpe": 10})
    with pytest.raises(TypeError, match=r"valid parameters: \(none\)"):
        check_metric_parameters("pcc", ["sigma"])
    check_metric_parameters("ssim", {"sigma": 2.0, "win_size": 7})


def test_public_api() -> None:
    for name in metrics.__all__:
        assert hasattr(metrics, name), name
