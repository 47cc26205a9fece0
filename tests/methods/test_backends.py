"""captum and pytorch-grad-cam methods through the registry (skipped where the packages are absent)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from pipeline.cli import main
from pipeline.methods import build_method, method_class, method_parameters
from tests.methods.helpers import make_tiny_cam_net, seeded_batch
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


GRAD_CAM_MISSING = "grad-cam is not installed: pip install 'xai-pipeline[backends]'"
LAYER_CAMS = ["GradCAM", "GradCAMPlusPlus", "XGradCAM", "HiResCAM", "GradCAMElementWise", "LayerCAM", "EigenCAM",
              "EigenGradCAM", "ScoreCAM", "AblationCAM"]


def _library_maps(cam_class: type, model: torch.nn.Module, layers: list[torch.nn.Module], images: torch.Tensor,
                  targets: torch.Tensor, reshape_transform: object = None, **call: object) -> torch.Tensor:
    """A direct call of a pytorch-grad-cam class, as its README shows, on a copy of ``model``."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    with cam_class(model=model, target_layers=layers, reshape_transform=reshape_transform) as cam:
        maps = cam(input_tensor=images, targets=[ClassifierOutputTarget(int(c)) for c in targets], **call)
    return torch.from_numpy(maps)


@pytest.mark.parametrize("class_name", LAYER_CAMS)
def test_grad_cam_layer_methods_equal_a_direct_call_of_the_library(class_name: str) -> None:
    library = pytest.importorskip("pytorch_grad_cam", reason=GRAD_CAM_MISSING)
    model = make_tiny_cam_net()
    images, targets = seeded_batch(0, [1, 3])
    maps = build_method(f"grad-cam:{class_name}", model, layer="features.3").explain(images, targets)
    reference = make_tiny_cam_net()
    expected = _library_maps(getattr(library, class_name), reference, [reference.features[3]], images, targets)
    assert maps.shape == (2, 32, 32) and maps.dtype == torch.float32
    torch.testing.assert_close(maps, expected)


def test_grad_cam_parameters_go_to_the_class_or_its_call_and_each_layer_is_its_own_call() -> None:
    library = pytest.importorskip("pytorch_grad_cam", reason=GRAD_CAM_MISSING)
    assert list(method_parameters("grad-cam:XGradCAM")) == ["layer", "reshape", "aug_smooth", "eigen_smooth"]
    assert {"batch_size", "ratio_channels_to_ablate"} <= set(method_parameters("grad-cam:AblationCAM"))
    model = make_tiny_cam_net()
    images, targets = seeded_batch(1, [0, 4])
    method = build_method("grad-cam:GradCAM", model, layer=["features.1", "mid"], eigen_smooth=True)
    both = method.explain_layers(images, targets)
    reference = make_tiny_cam_net()
    for name, module in (("features.1", reference.features[1]), ("mid", reference.mid)):
        expected = _library_maps(library.GradCAM, reference, [module], images, targets, eigen_smooth=True)
        torch.testing.assert_close(both[name], expected)


def test_grad_cam_on_a_vision_transformer_uses_the_token_grid() -> None:
    library = pytest.importorskip("pytorch_grad_cam", reason=GRAD_CAM_MISSING)
    images, targets = seeded_batch(0, [1, 3])
    layer = "encoder.layers.encoder_layer_1.ln_1"
    maps = build_method("grad-cam:EigenGradCAM", tiny_vit(), layer=layer).explain(images, targets)

    def tokens_to_grid(tokens: torch.Tensor) -> torch.Tensor:  # class token dropped, 16 patches as 4 x 4
        return tokens[:, 1:].reshape(tokens.shape[0], 4, 4, tokens.shape[2]).permute(0, 3, 1, 2)

    reference = tiny_vit()
    expected = _library_maps(library.EigenGradCAM, reference, [reference.encoder.layers.encoder_layer_1.ln_1],
                             images, targets, reshape_transform=tokens_to_grid)
    torch.testing.assert_close(maps, expected)


def test_grad_cam_full_grad_takes_no_layers_and_equals_the_library() -> None:
    library = pytest.importorskip("pytorch_grad_cam", reason=GRAD_CAM_MISSING)
    assert "layer" not in method_parameters("grad-cam:FullGrad")
    images, targets = seeded_batch(2, [2, 1])
    maps = build_method("grad-cam:FullGrad", make_tiny_cam_net()).explain(images, targets)
    torch.testing.assert_close(maps, _library_maps(library.FullGrad, make_tiny_cam_net(), [], images, targets))


def test_grad_cam_keeps_the_models_modes_gradients_and_hooks() -> None:
    pytest.importorskip("pytorch_grad_cam", reason=GRAD_CAM_MISSING)
    model = make_tiny_cam_net().train()
    model.fc.eval()
    model.features[0].weight.requires_grad_(False)
    marker = torch.full_like(model.fc.bias, 7.0)
    model.fc.bias.grad = marker
    images, targets = seeded_batch(0, [1, 3])
    for name in ("GradCAM", "AblationCAM", "FullGrad"):
        layer = {} if name == "FullGrad" else {"layer": "features.3"}
        build_method(f"grad-cam:{name}", model, **layer).explain(images, targets)
        assert model.training and model.features.training and not model.fc.training
        assert [p.requires_grad for p in model.parameters()] == [False] + [True] * 7
        assert model.fc.bias.grad is marker and model.fc.weight.grad is None
        assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())
        assert isinstance(model.features[3], torch.nn.ReLU)


def test_an_unknown_backend_class_is_named() -> None:
    pytest.importorskip("captum.attr", reason="captum is not installed: pip install 'xai-pipeline[backends]'")
    pytest.importorskip("pytorch_grad_cam", reason=GRAD_CAM_MISSING)
    with pytest.raises(ValueError, match="captum.attr has no method class 'Nope'"):
        method_class("captum:Nope")
    with pytest.raises(ValueError, match="pytorch_grad_cam has no method class 'GuidedBackpropReLUModel'"):
        method_class("grad-cam:GuidedBackpropReLUModel")


def test_backend_methods_run_through_the_pipeline(
    make_config: ConfigFactory, write_yaml: YamlWriter, tmp_path: Path
) -> None:
    pytest.importorskip("captum.attr", reason="captum is not installed: pip install 'xai-pipeline[backends]'")
    pytest.importorskip("pytorch_grad_cam", reason=GRAD_CAM_MISSING)
    raw = make_config()
    raw["methods"] = [{"name": "captum:IntegratedGradients", "id": "ig", "params": {"n_steps": 4}},
                      {"name": "grad-cam:GradCAMPlusPlus", "id": "gradcam++"},
                      {"name": "captum:LayerGradCam", "id": "layer-gradcam", "layers": ["layer3"]}]
    run_dir = tmp_path / "run"
    assert main(["run", str(write_yaml(raw)), "--out", str(run_dir), "--no-progress"]) == 0
    table = pd.read_csv(run_dir / "metrics.csv").dropna(subset=["value"])
    sizes = table.groupby("method").size().to_dict()
    assert sizes["gradcam++"] == sizes["ig"] == 12 * 2 + 9 and sizes["layer-gradcam"] > 0
