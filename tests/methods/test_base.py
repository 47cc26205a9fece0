"""pipeline.methods.base: ``explain(images)`` and ``explain(images, None)`` explain the predicted class,
in every built-in method."""
from __future__ import annotations

from typing import Any

import pytest
import torch

from pipeline.methods import METHODS, CamExplainer, build_method
from tests.methods.helpers import make_tiny_cam_net, seeded_batch

#: parameters that keep each built-in method fast on the tiny network
CHEAP: dict[str, dict[str, Any]] = {
    "rise": {"n_masks": 8, "grid_size": 4, "batch_size": 4},
    "rise-gaussian": {"n_masks": 8, "grid_size": 4, "batch_size": 4},
    "gradcam": {"layer": "features.3"},
    "abscam-init": {"layer": "features.3"},
    "abscam-final": {"layer": "features.3"},
    "fem": {"layer": "features.3"},
    "scorecam": {"layer": "features.3"},
    "lime": {"n_samples": 8, "segmentation": "slic", "n_segments": 6, "batch_size": 4},
    "extremal": {"iterations": 2, "step": 4, "sigma": 8.0, "areas": (0.1,)},
    "random": {},
    "centre": {},
}


def test_every_built_in_method_has_cheap_parameters_here() -> None:
    assert sorted(CHEAP) == sorted(METHODS)


@pytest.mark.parametrize("name", sorted(CHEAP))
def test_omitted_or_none_targets_are_the_predicted_classes(name: str) -> None:
    model = make_tiny_cam_net()
    images, _ = seeded_batch(3, [0, 0, 0])
    predicted = model(images).argmax(dim=1)
    explainer = build_method(name, model, **CHEAP[name])
    expected = explainer.explain(images, predicted)
    assert torch.equal(explainer.explain(images), expected)
    assert torch.equal(explainer.explain(images, None), expected)


def test_the_default_target_is_the_arg_max_not_a_fixed_class() -> None:
    model = make_tiny_cam_net()
    images, _ = seeded_batch(3, [0, 0, 0])
    predicted = model(images).argmax(dim=1)
    other = (predicted + 1) % 5
    explainer = build_method("gradcam", model, layer=["features.3", "mid"])
    assert isinstance(explainer, CamExplainer)
    by_default = explainer.explain_layers(images)
    for layer, maps in explainer.explain_layers(images, predicted).items():
        assert torch.equal(by_default[layer], maps)
    assert not torch.equal(by_default["mid"], explainer.explain_layers(images, other)["mid"])
