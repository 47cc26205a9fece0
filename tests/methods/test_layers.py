"""Layers of any model: dotted names with did-you-mean, grids of transformer outputs, default layers
per family, and CAM methods on a tiny ViT and Swin."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from pipeline.methods import build_method
from pipeline.methods.layers import LAYERS_HINT, candidate_layers, default_layer, resolve_module, to_grid
from tests.methods.helpers import make_tiny_cam_net, seeded_batch

CAM_METHODS = ["gradcam", "abscam-init", "abscam-final", "fem", "scorecam"]


def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=8, mlp_dim=16, num_classes=5
    ).eval()


def tiny_swin() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.SwinTransformer(
        patch_size=[4, 4], embed_dim=8, depths=[1, 1], num_heads=[1, 1], window_size=[2, 2], num_classes=5
    ).eval()


def test_an_unknown_layer_names_the_closest_matches_and_the_layers_command() -> None:
    model = torchvision.models.resnet18(num_classes=3)
    closest = r"unknown layer 'layer4\.1\.conv3'; did you mean layer4\.1\.conv2, layer4\.1\.conv1, "
    with pytest.raises(ValueError, match=closest) as error:
        resolve_module(model, "layer4.1.conv3")
    assert LAYERS_HINT in str(error.value)
    assert "the model's modules are" not in str(error.value)  # 67 modules: too many to list
    with pytest.raises(ValueError, match="the model's modules are: features, features.0"):
        resolve_module(make_tiny_cam_net(), "feature")
    assert resolve_module(model, "layer4.1.conv1") is model.layer4[1].conv1


def test_tokens_drop_the_class_token_and_follow_the_aspect_ratio() -> None:
    model = nn.Identity()
    tokens = torch.arange(2 * 9 * 3, dtype=torch.float32).view(2, 9, 3)  # class token + 2x4 grid, 3 channels
    grid = to_grid(model, "x", tokens, "tokens", (32, 64))
    assert grid.shape == (2, 3, 2, 4)
    assert torch.equal(grid[1, 2, 1, 3], tokens[1, 1 + 1 * 4 + 3, 2])
    assert to_grid(model, "x", tokens[:, 1:], "auto", (16, 32)).shape == (2, 3, 2, 4)  # no class token
    assert to_grid(model, "x", tokens[:, :2], "auto", (32, 32)).shape == (2, 3, 1, 1)


def test_channels_last_and_none() -> None:
    model = nn.Identity()
    outputs = torch.randn(2, 4, 5, 3)
    assert torch.equal(to_grid(model, "x", outputs, "channels_last", (8, 10)), outputs.permute(0, 3, 1, 2))
    assert to_grid(model, "x", outputs, "auto", (8, 10)) is outputs
    with pytest.raises(ValueError, match=r"layer 'x' has output shape \(2, 4, 5, 3\); CAM methods need .*tokens"):
        to_grid(model, "x", outputs, "tokens", (8, 10))


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (lambda: torchvision.models.resnet18(num_classes=3), "layer4"),
        (lambda: torchvision.models.mobilenet_v3_small(num_classes=3), "features.12"),
        (lambda: torchvision.models.densenet121(num_classes=3), "features.denseblock4"),
        (tiny_vit, "encoder.layers.encoder_layer_1.ln_1"),
        (tiny_swin, "features.3"),
        (make_tiny_cam_net, "mid"),  # no known family: the last [B, C, h, w] output in forward order
    ],
    ids=["resnet", "mobilenet", "densenet", "vit", "swin", "other"],
)
def test_default_layers(build: object, expected: str) -> None:
    assert default_layer(build(), (32, 32)) == expected  # type: ignore[operator]


def test_a_model_without_spatial_output_has_no_default() -> None:
    with pytest.raises(ValueError, match="no layer with a \\[B, C, h, w\\] output.*give `layers`"):
        default_layer(nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2)), (8, 8))


def test_candidates_have_grids_in_module_order() -> None:
    layers = {info.name: info for info in candidate_layers(tiny_swin(), (32, 32))}
    assert layers["features.0.0"].shape == (8, 8, 8) and layers["features.0.0"].grid == (8, 8, 8)
    assert layers["features.3"].shape == (4, 4, 16) and layers["features.3"].grid == (16, 4, 4)
    assert layers["permute"].grid == (16, 4, 4)
    assert "head" not in layers and "flatten" not in layers
    names = [info.name for info in candidate_layers(tiny_vit(), (32, 32))]
    assert names.index("conv_proj") < names.index("encoder.layers.encoder_layer_1.ln_1")


@pytest.mark.parametrize("name", CAM_METHODS)
@pytest.mark.parametrize("build", [tiny_vit, tiny_swin], ids=["vit", "swin"])
def test_cam_methods_run_on_transformers(name: str, build: object) -> None:
    model = build()  # type: ignore[operator]
    images, targets = seeded_batch(0, [1, 3])
    maps = build_method(name, model, layer=default_layer(model, (32, 32))).explain(images, targets)
    assert maps.shape == (2, 32, 32) and torch.isfinite(maps).all()
    assert not any(module._forward_hooks for module in model.modules())


def test_gradcam_on_vit_tokens_equals_the_hand_computation() -> None:
    model = tiny_vit()
    images, targets = seeded_batch(0, [1, 3])
    layer = "encoder.layers.encoder_layer_1.ln_1"
    captured = []
    handle = model.get_submodule(layer).register_forward_hook(lambda _m, _i, output: captured.append(output))
    logits = model(images)
    handle.remove()
    (grads,) = torch.autograd.grad(logits[torch.arange(2), targets].sum(), captured[0])
    tokens, grads = captured[0].detach()[:, 1:], grads[:, 1:]  # 16 patch tokens of a 4x4 grid
    expected = torch.zeros(2, 4, 4)
    for b in range(2):
        weights = grads[b].mean(dim=0)
        for index in range(16):
            expected[b, index // 4, index % 4] = torch.relu((weights * tokens[b, index]).sum())
    maps = build_method("gradcam", model, layer=layer).explain(images, targets)
    upsampled = nn.functional.interpolate(expected[:, None], size=(32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(maps, upsampled[:, 0], rtol=1e-4, atol=1e-6)


def test_reshape_none_refuses_tokens_and_an_unknown_rule_is_named() -> None:
    images, targets = seeded_batch(0, [1, 3])
    method = build_method("gradcam", tiny_vit(), layer="encoder.layers.encoder_layer_1.ln_1", reshape="none")
    with pytest.raises(ValueError, match=r"gradcam: layer .* has output shape \(2, 17, 8\); CAM methods need"):
        method.explain(images, targets)
    with pytest.raises(ValueError, match="fem: reshape should be 'auto', 'tokens', 'channels_last' or 'none', got 'gr"):
        build_method("fem", tiny_vit(), layer="conv_proj", reshape="grid")


def test_layers_given_as_modules_are_named_by_their_dotted_names() -> None:
    model = make_tiny_cam_net()
    images, targets = seeded_batch(4, [1, 2])
    by_module = build_method("gradcam", model, layers=[model.features[3], model.mid])
    by_name = build_method("gradcam", model, layer=["features.3", "mid"])
    assert by_module.layers == ["features.3", "mid"]  # type: ignore[attr-defined]
    expected = by_name.explain_layers(images, targets)  # type: ignore[attr-defined]
    for layer, maps in by_module.explain_layers(images, targets).items():  # type: ignore[attr-defined]
        assert torch.equal(maps, expected[layer])
    single = build_method("fem", model, layer=model.features)  # a Sequential is one layer, not a list of them
    assert single.layers == ["features"]  # type: ignore[attr-defined]


def test_a_module_outside_the_model_is_refused() -> None:
    model = make_tiny_cam_net()
    with pytest.raises(ValueError, match=r"this Sequential module is not a layer inside the model .*"
                                         r"a module of another model, or a copy"):
        build_method("gradcam", model, layers=[make_tiny_cam_net().mid])
    with pytest.raises(ValueError, match="the model itself is not a layer inside the model"):
        build_method("gradcam", model, layers=[model])
    with pytest.raises(TypeError, match="give its layers once, as `layers` or as `layer`"):
        build_method("gradcam", model, layers=["mid"], layer=["mid"])
    with pytest.raises(ValueError, match=r"layer\[0\] should be a valid string or should be an instance of Module, got 3"):
        build_method("gradcam", model, layers=[3])
