"""captum and pytorch-grad-cam methods through the registry (skipped where the packages are absent)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.cli import main
from pipeline.methods import build_method, method_class, method_parameters
from tests.methods.helpers import activations_and_gradients, make_tiny_cam_net, seeded_batch
from tests.methods.test_layers import tiny_vit
from tests.tiny_experiment import ConfigFactory, YamlWriter

pytestmark = pytest.mark.backends


def test_captum_integrated_gradients_with_parameters_passed_through() -> None:
    captum = pytest.importorskip("captum.attr", reason="captum is not installed: pip install 'xai-pipeline[backends]'")
    parameters = set(method_parameters("captum:IntegratedGradients"))
    assert {"multiply_by_inputs", "baselines", "n_steps", "method"} <= parameters
    model = make_tiny_cam_net()
    images, targets = seeded_batch(0, [1, 3])
    maps = build_method("captum:IntegratedGradients", model, n_steps=8).explain(images, targets)
    expected = captum.IntegratedGradients(model).attribute(images, target=targets, n_steps=8).abs().sum(dim=1)
    torch.testing.assert_close(maps, expected.float())
    with pytest.raises(TypeError, match="has no parameter 'steps'"):
        build_method("captum:IntegratedGradients", model, steps=8)


def test_captum_layer_attributions_are_cam_methods_matching_the_library() -> None:
    captum = pytest.importorskip("captum.attr", reason="captum is not installed: pip install 'xai-pipeline[backends]'")
    assert list(method_parameters("captum:LayerGradCam"))[:2] == ["layer", "reshape"]
    model = make_tiny_cam_net()
    images, targets = seeded_batch(0, [1, 3])
    maps = build_method("captum:LayerGradCam", model, layer="mid").explain(images, targets)
    expected = captum.LayerGradCam(model, model.mid).attribute(images, target=targets).sum(dim=1)
    upsampled = torch.nn.functional.interpolate(expected[:, None], size=(32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(maps, upsampled[:, 0].detach())
    method = build_method("captum:LayerConductance", model, layer=["features.3", "mid"], n_steps=4)
    both = method.explain_layers(images, targets)
    conductance = captum.LayerConductance(model, model.mid).attribute(images, target=targets, n_steps=4)
    expected = torch.nn.functional.interpolate(conductance.abs().sum(dim=1)[:, None], size=(32, 32),
                                               mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(both["mid"], expected.detach(), rtol=1e-4, atol=1e-6)
    assert both["features.3"].shape == (2, 32, 32)


def test_grad_cam_plus_plus_matches_the_library() -> None:
    reason = "grad-cam is not installed: pip install 'xai-pipeline[backends]'"
    library = pytest.importorskip("pytorch_grad_cam", reason=reason)
    model = make_tiny_cam_net()
    images, targets = seeded_batch(0, [1, 3])
    acts, grads = activations_and_gradients(model, images, targets, 4)
    weights = library.GradCAMPlusPlus.get_cam_weights(None, images, None, targets, acts.numpy(), grads.numpy())
    expected = torch.relu((torch.from_numpy(np.asarray(weights, np.float32))[:, :, None, None] * acts).sum(dim=1))
    method = build_method("grad-cam:GradCAMPlusPlus", model, layer="features.3")
    maps = method.explain(images, targets)
    upsampled = torch.nn.functional.interpolate(expected[:, None], size=(32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(maps, upsampled[:, 0], rtol=1e-4, atol=1e-6)
    assert list(method_parameters("grad-cam:XGradCAM")) == ["layer", "reshape"]
    vit_maps = build_method("grad-cam:XGradCAM", tiny_vit(), layer="encoder.layers.encoder_layer_1.ln_1").explain(
        images, targets)
    assert vit_maps.shape == (2, 32, 32) and torch.isfinite(vit_maps).all()


def test_an_unknown_backend_class_and_an_unsupported_grad_cam_method_are_named() -> None:
    pytest.importorskip("captum.attr", reason="captum is not installed: pip install 'xai-pipeline[backends]'")
    pytest.importorskip("pytorch_grad_cam", reason="grad-cam is not installed: pip install 'xai-pipeline[backends]'")
    with pytest.raises(ValueError, match="captum.attr has no method class 'Nope'"):
        method_class("captum:Nope")
    images, targets = seeded_batch(0, [1, 3])
    with pytest.raises(ValueError, match="only such grad-cam methods"):
        build_method("grad-cam:ScoreCAM", make_tiny_cam_net(), layer="features.3").explain(images, targets)


def test_backend_methods_run_through_the_pipeline(
    make_config: ConfigFactory, write_yaml: YamlWriter, tmp_path: Path
) -> None:
    pytest.importorskip("captum.attr", reason="captum is not installed: pip install 'xai-pipeline[backends]'")
    pytest.importorskip("pytorch_grad_cam", reason="grad-cam is not installed: pip install 'xai-pipeline[backends]'")
    raw = make_config()
    raw["methods"] = [{"name": "captum:IntegratedGradients", "id": "ig", "params": {"n_steps": 4}},
                      {"name": "grad-cam:GradCAMPlusPlus", "id": "gradcam++"},
                      {"name": "captum:LayerGradCam", "id": "layer-gradcam", "layers": ["layer3"]}]
    run_dir = tmp_path / "run"
    assert main(["run", str(write_yaml(raw)), "--out", str(run_dir), "--no-progress"]) == 0
    table = pd.read_csv(run_dir / "metrics.csv").dropna(subset=["value"])
    sizes = table.groupby("method").size().to_dict()
    assert sizes["gradcam++"] == sizes["ig"] == 12 * 2 + 9 and sizes["layer-gradcam"] > 0
