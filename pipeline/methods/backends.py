"""Methods of captum and pytorch-grad-cam (``pip install xai-pipeline[backends]``).

- ``captum:NAME``: the attribution class ``captum.attr.NAME`` on the input
  (IntegratedGradients, Saliency, InputXGradient, GuidedBackprop, DeepLift, ...). Its
  parameters are those of ``NAME(model, ...)`` and of ``NAME.attribute(inputs, target, ...)``,
  passed through; the map is the absolute attribution summed over colour channels.
  A layer attribution (``LayerGradCam``, ``LayerConductance``, ``LayerIntegratedGradients``,
  ...) is a CAM method: it takes ``layers`` (default layers as for the others) and its map
  on each layer, summed over channels (absolute values, except for ``LayerGradCam``, whose
  sign is the method's), is upsampled bilinearly to the input size.
- ``grad-cam:NAME``: the CAM class ``pytorch_grad_cam.NAME`` (GradCAM, GradCAMPlusPlus,
  XGradCAM, HiResCAM, GradCAMElementWise, LayerCAM, EigenCAM, EigenGradCAM, ScoreCAM,
  AblationCAM, ...), called through its public API on each of ``layers`` in turn:
  ``NAME(model, target_layers=[layer], reshape_transform=..., **params)(images,
  targets=[ClassifierOutputTarget(c), ...], aug_smooth=..., eigen_smooth=...)``. The
  reshape transform is this package's ``reshape`` rule (tokens, channels-last), so
  transformers work as for the built-in CAMs. The maps are the library's: ReLU, scaled
  to [0, 1] per image and resized to the input by the library. ``grad-cam:FullGrad``
  uses every biased layer of the model and takes no ``layers``. The library sets the
  model to eval mode and leaves gradients on its parameters; the model's modes,
  ``requires_grad`` flags and ``.grad`` are restored after each call, and its hooks removed.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
from typing import Any, Callable, ClassVar, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..plugins import PluginError
from ..cost import Work
from .base import CamExplainer, Explainer, Layers, ReshapeRule, upsample
from .layers import Reshape, resolve_module

__all__ = [
    "BACKENDS",
    "backend_class",
    "CaptumAttribution",
    "CaptumLayerAttribution",
    "GradCamLibrary",
    "GradCamWholeModel",
]

#: prefix -> (importable module, distribution to install)
BACKENDS: dict[str, tuple[str, str]] = {
    "captum": ("captum.attr", "captum"),
    "grad-cam": ("pytorch_grad_cam", "grad-cam"),
}
_SKIPPED = {"self", "forward_func", "model", "inputs", "target", "additional_forward_args", "return_convergence_delta",
            "layer", "device_ids", "target_layers", "reshape_transform", "input_tensor", "targets"}


def _keywords(function: Callable[..., Any]) -> list[inspect.Parameter]:
    return [
        p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
        for p in inspect.signature(function).parameters.values()
        if p.name not in _SKIPPED and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]


def _split(params: dict[str, Any], constructor: Callable[..., Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``params`` split into those of the library class's ``constructor`` and the others (its call's)."""
    names = {p.name for p in _keywords(constructor)}
    return {k: v for k, v in params.items() if k in names}, {k: v for k, v in params.items() if k not in names}


class _LibraryMethod(Explainer):
    """A library's method on the input; ``params`` go to the library class's constructor or to its call, by name."""

    library_class: ClassVar[type]

    def __init__(self, model: nn.Module, **params: Any) -> None:
        super().__init__(model)
        self.constructor, self.call = _split(params, self.library_class.__init__)


class CaptumAttribution(_LibraryMethod):
    """A captum attribution class on the input (see the module docstring)."""

    def explain(self, images: Tensor, targets: Tensor) -> Tensor:
        method = self.library_class(self.model, **self.constructor)
        with torch.enable_grad():
            inputs = images.detach().clone().requires_grad_(True)
            attributions = method.attribute(inputs, target=targets, **self.call)
        return attributions.detach().abs().sum(dim=1).float()


class _LibraryLayerMethod(CamExplainer):
    """A CAM method whose library computes each layer's map (:meth:`explain_layers`);
    ``params`` go to the library class's constructor or to its call, by name."""

    library_class: ClassVar[type]
    classifies = False  # the library runs the model itself

    def __init__(self, model: nn.Module, layer: str | Sequence[str], reshape: Reshape = "auto",
                 **params: Any) -> None:
        super().__init__(model, layer, reshape)
        self.constructor, self.call = _split(params, self.library_class.__init__)

    def layer_map(self, activations: Tensor, gradients: Tensor | None, images: Tensor, targets: Tensor) -> Tensor:
        raise NotImplementedError(f"{self.name}: the library computes each layer's map (explain_layers)")


class CaptumLayerAttribution(_LibraryLayerMethod):
    """A captum layer attribution on each of ``layers`` (see the module docstring)."""

    @classmethod
    def cost(cls, params: Mapping[str, Any], size: tuple[int, int], channels: Mapping[str, int]) -> Work | None:
        """Not declared: captum decides how often it runs the model."""
        return None

    def explain_layers(self, images: Tensor, targets: Tensor) -> dict[str, Tensor]:
        size = (images.shape[-2], images.shape[-1])
        maps = {}
        for name in self.layers:
            method = self.library_class(self.model, resolve_module(self.model, name), **self.constructor)
            with torch.enable_grad():
                inputs = images.detach().clone().requires_grad_(True)
                attributions = method.attribute(inputs, target=targets, **self.call)
            attributions = attributions.detach().float()
            if attributions.dim() != 4:
                raise ValueError(f"{self.name}: layer {name!r} gives attributions of shape "
                                 f"{tuple(attributions.shape)}; only [B, C, h, w] layers are supported")
            signed = self.library_class.__name__ == "LayerGradCam"
            maps[name] = upsample((attributions if signed else attributions.abs()).sum(dim=1), size)
        return maps


@contextlib.contextmanager
def _model_state_kept(model: nn.Module) -> Iterator[None]:
    """Restore every module's train/eval mode and every parameter's ``requires_grad`` and ``.grad`` on exit."""
    modes = [(module, module.training) for module in model.modules()]
    parameters = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
        for parameter, requires_grad, grad in parameters:
            parameter.requires_grad_(requires_grad)
            parameter.grad = grad


def _grad_cam_maps(
    model: nn.Module, cam_class: type, target_layers: list[nn.Module],
    reshape_transform: Callable[[Tensor], Tensor] | None, images: Tensor, targets: Tensor,
    constructor: dict[str, Any], call: dict[str, Any],
) -> Tensor:
    """The maps ``[B, H, W]`` of a direct call of pytorch-grad-cam's ``cam_class`` with the model's state kept."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    classes = [ClassifierOutputTarget(int(c)) for c in targets.tolist()]
    with _model_state_kept(model), torch.enable_grad():
        cam = cam_class(model, target_layers=target_layers, reshape_transform=reshape_transform, **constructor)
        try:
            maps = cam(images.detach().clone().requires_grad_(True), targets=classes, **call)
        finally:
            cam.activations_and_grads.release()
    return torch.from_numpy(np.asarray(maps, dtype=np.float32)).to(images.device)


class GradCamLibrary(_LibraryLayerMethod):
    """A pytorch-grad-cam CAM class on each of ``layers`` (see the module docstring)."""

    def explain_layers(self, images: Tensor, targets: Tensor) -> dict[str, Tensor]:
        size = (images.shape[-2], images.shape[-1])
        maps = {}
        for name in self.layers:
            def reshape(output: Tensor, name: str = name) -> Tensor:
                return self._grid(name, output, size)

            maps[name] = _grad_cam_maps(self.model, self.library_class, [resolve_module(self.model, name)], reshape,
                                        images, targets, self.constructor, self.call)
        return maps


class GradCamWholeModel(_LibraryMethod):
    """A pytorch-grad-cam class that picks its own layers (FullGrad: every biased layer)."""

    def explain(self, images: Tensor, targets: Tensor) -> Tensor:
        return _grad_cam_maps(self.model, self.library_class, [], None, images, targets, self.constructor, self.call)


def _with_signature(cls: type[Explainer], parameters: list[inspect.Parameter]) -> None:
    """Give ``cls.__init__`` the signature ``(self, model, *, parameters...)`` that registries read."""
    base_init = cls.__init__

    def __init__(self: Explainer, model: nn.Module, **params: Any) -> None:
        base_init(self, model, **params)

    positional = inspect.Parameter.POSITIONAL_OR_KEYWORD
    __init__.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter("self", positional), inspect.Parameter("model", positional), *parameters]
    )
    cls.__init__ = __init__  # type: ignore[method-assign]


def backend_class(name: str) -> type[Explainer] | None:
    """The class of method ``captum:NAME`` or ``grad-cam:NAME``; ``None`` for any other name."""
    prefix, _, attribute = name.partition(":")
    if prefix not in BACKENDS or not attribute:
        return None
    module_name, distribution = BACKENDS[prefix]
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise PluginError(f"method {name!r} needs {distribution} ({error}): "
                          "pip install 'xai-pipeline[backends]'") from None
    wrapped = getattr(module, attribute, None)
    if not isinstance(wrapped, type) or not hasattr(wrapped, "attribute" if prefix == "captum" else "get_cam_weights"):
        raise PluginError(f"method {name!r}: {module_name} has no method class {attribute!r}")
    if prefix == "captum":
        layered = "layer" in inspect.signature(wrapped.__init__).parameters
        base: type[Explainer] = CaptumLayerAttribution if layered else CaptumAttribution
        call: Callable[..., Any] = wrapped.attribute
    else:
        layered = not issubclass(wrapped, module.FullGrad)
        base, call = (GradCamLibrary if layered else GradCamWholeModel), wrapped.__call__
    documented = {"__doc__": wrapped.__doc__ or base.__doc__}
    cls: type[Explainer] = type(attribute, (base,), {"name": name, "library_class": wrapped, **documented})
    keyword = inspect.Parameter.KEYWORD_ONLY
    extra = [inspect.Parameter("layer", keyword, annotation=Layers),
             inspect.Parameter("reshape", keyword, default="auto", annotation=ReshapeRule)] if layered else []
    _with_signature(cls, [*extra, *_keywords(wrapped.__init__), *_keywords(call)])
    return cls
