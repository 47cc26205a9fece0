"""Properties every class-activation-map method shares: output contract, determinism,
a model left as it was, multi-layer consistency and clear errors."""
from __future__ import annotations

import pytest
import torch

from pipeline.config import ComputeConfig
from pipeline.methods import CamExplainer, build_method, method_class, method_parameters
from pipeline.models import apply_compute
from tests.methods.helpers import make_tiny_cam_net, seeded_batch

CAM_METHODS = ["gradcam", "abscam-init", "abscam-final", "fem", "scorecam"]
LAYER = "features.3"


def make_batch() -> tuple[torch.Tensor, torch.Tensor]:
    return seeded_batch(1, [1, 3])


@pytest.mark.parametrize("name", CAM_METHODS)
def test_registry_entry_is_a_cam_method_with_its_name(name: str) -> None:
    cls = method_class(name)
    assert issubclass(cls, CamExplainer)
    assert cls.name == name
    assert list(method_parameters(name))[0] == "layer"


@pytest.mark.parametrize("name", CAM_METHODS)
def test_output_shape_dtype_finite_and_images_untouched(name: str) -> None:
    model = make_tiny_cam_net()
    images, targets = make_batch()
    original = images.clone()
    maps = build_method(name, model, layer=LAYER).explain(images, targets)
    assert maps.shape == (2, 32, 32)
    assert maps.dtype == torch.float32
    assert maps.device == images.device
    assert torch.isfinite(maps).all()
    assert maps.abs().sum() > 0
    assert torch.equal(images, original)


@pytest.mark.parametrize("name", CAM_METHODS)
def test_deterministic(name: str) -> None:
    model = make_tiny_cam_net()
    images, targets = make_batch()
    method = build_method(name, model, layer=LAYER)
    first = method.explain(images, targets)
    assert torch.equal(first, method.explain(images, targets))
    assert torch.equal(first, build_method(name, make_tiny_cam_net(), layer=LAYER).explain(images, targets))


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", CAM_METHODS)
def test_the_pass_gives_the_logits_of_a_forward_without_gradients(name: str, precision: str) -> None:
    """An explain shard takes a CAM method's predicted classes from its pass: the logits must be those
    of the forward without gradients every other method's shard classifies with, bit for bit."""
    model = apply_compute(make_tiny_cam_net(), ComputeConfig(precision=precision), torch.device("cpu"))
    images, _ = make_batch()
    with torch.no_grad():
        plain = model(images)
    result = build_method(name, model, layer=[LAYER, "features.1"]).explain_pass(images)  # type: ignore[attr-defined]
    assert torch.equal(result.logits, plain) and not result.logits.requires_grad
    assert all(torch.equal(m, e) for m, e in zip(result.maps.values(), build_method(
        name, model, layer=[LAYER, "features.1"]).explain_layers(images, plain.argmax(dim=1)).values()))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", CAM_METHODS)
def test_model_left_as_it_was(name: str, training: bool) -> None:
    model = make_tiny_cam_net().train(training)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images, targets = make_batch()
    build_method(name, model, layer=[LAYER, "features.1"]).explain_layers(images, targets)
    for module in model.modules():
        assert module.training is training
        assert not module._forward_hooks
        assert not module._forward_pre_hooks
        assert not module._backward_hooks
        assert not module._backward_pre_hooks
    for parameter in model.parameters():
        assert parameter.grad is None
        assert parameter.requires_grad
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("name", CAM_METHODS)
def test_two_layers_in_one_call_equal_two_single_layer_calls(name: str) -> None:
    model = make_tiny_cam_net()
    images, targets = make_batch()
    layers = ["features.1", LAYER]
    together = build_method(name, model, layer=layers).explain_layers(images, targets)
    assert list(together) == layers
    for layer in layers:
        alone = build_method(name, model, layer=layer).explain(images, targets)
        torch.testing.assert_close(together[layer], alone, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(together["features.1"], together[LAYER])


@pytest.mark.parametrize("name", CAM_METHODS)
def test_unknown_layer_lists_module_names(name: str) -> None:
    with pytest.raises(ValueError, match="'nope'") as error:
        build_method(name, make_tiny_cam_net(), layer="nope")
    for module_name in ("features", "features.3", "mid.0", "pool", "fc"):
        assert module_name in str(error.value)


@pytest.mark.parametrize("name", CAM_METHODS)
def test_non_spatial_layer_names_layer_and_shape(name: str) -> None:
    images, targets = make_batch()
    method = build_method(name, make_tiny_cam_net(), layer="fc")
    with pytest.raises(ValueError, match=r"'fc'.*\(2, 5\)"):
        method.explain(images, targets)


@pytest.mark.parametrize("name", CAM_METHODS)
def test_unknown_parameter_lists_valid_parameters(name: str) -> None:
    with pytest.raises(TypeError, match="bogus") as error:
        build_method(name, make_tiny_cam_net(), layer="x", bogus=1)
    message = str(error.value)
    assert "valid parameters" in message
    for parameter in method_parameters(name):
        assert parameter in message


def test_gradcam_unknown_parameter_message() -> None:
    with pytest.raises(TypeError, match="valid parameters: layer, reshape$"):
        build_method("gradcam", make_tiny_cam_net(), layer="x", bogus=1)


@pytest.mark.gpu
@pytest.mark.parametrize("name", CAM_METHODS)
def test_cuda_matches_cpu(name: str) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    images, targets = make_batch()
    on_cpu = build_method(name, make_tiny_cam_net(), layer=LAYER).explain(images, targets)
    on_gpu = build_method(name, make_tiny_cam_net().cuda(), layer=LAYER).explain(images.cuda(), targets.cuda())
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=1e-3, atol=1e-4)
