"""Methods of captum and pytorch-grad-cam (``pip install xai-pipeline[backends]``).

- ``captum:NAME``: the attribution class ``captum.attr.NAME`` on the input
  (IntegratedGradients, Saliency, InputXGradient, GuidedBackprop, DeepLift, ...). Its
  parameters are those of ``NAME(model, ...)`` and of ``NAME.attribute(inputs, target, ...)``,
  passed through; the map is the absolute attribution summed over colour channels.
  A layer attribution (``LayerGradCam``, ``LayerConductance``, ``LayerIntegratedGradients``,
  ...) is a CAM method: it takes ``layers`` (default layers as for the others) and its map
  on each layer, summed over channels (absolute values, except for ``LayerGradCam``, whose
  sign is the method's), is upsampled bilinearly to the input size.
- ``grad-cam:NAME``: the class-activation method ``pytorch_grad_cam.NAME`` whose channel
  weights come from activations and gradients alone (GradCAM, GradCAMPlusPlus, XGradCAM).
  It runs in this package's CAM template (:class:`~pipeline.methods.base.CamExplainer`:
  ``layers``, default layers, ``reshape`` for transformers) with the library's
  ``get_cam_weights``; ``map = ReLU(sum_k w_k A_k)``, as the library computes it.
"""
from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable, ClassVar, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..plugins import PluginError
from ..cost import Work
from .base import CamExplainer, Explainer, upsample
from .layers import Reshape, resolve_module

__all__ = ["BACKENDS", "backend_class", "CaptumAttribution", "CaptumLayerAttribution", "GradCamLibrary"]

#: prefix -> (importable module, distribution to install)
BACKENDS: dict[str, tuple[str, str]] = {
    "captum": ("captum.attr", "captum"),
    "grad-cam": ("pytorch_grad_cam", "grad-cam"),
}
_SKIPPED = {"self", "forward_func", "model", "inputs", "target", "additional_forward_args", "return_convergence_delta",
            "layer", "device_ids"}


def _keywords(function: Callable[..., Any]) -> list[inspect.Parameter]:
    return [
        p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
        for p in inspect.signature(function).parameters.values()
        if p.name not in _SKIPPED and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]


class CaptumAttribution(Explainer):
    """A captum attribution class on the input (see the module docstring); ``params`` go to the
    class's constructor or its ``attribute`` by name."""

    attribution: ClassVar[type]

    def __init__(self, model: nn.Module, **params: Any) -> None:
        super().__init__(model)
        constructor = {p.name for p in _keywords(self.attribution.__init__)}
        self.constructor = {k: v for k, v in params.items() if k in constructor}
        self.attribute = {k: v for k, v in params.items() if k not in constructor}

    def explain(self, images: Tensor, targets: Tensor) -> Tensor:
        method = self.attribution(self.model, **self.constructor)
        with torch.enable_grad():
            inputs = images.detach().clone().requires_grad_(True)
            attributions = method.attribute(inputs, target=targets, **self.attribute)
        return attributions.detach().abs().sum(dim=1).float()


class CaptumLayerAttribution(CamExplainer):
    """A captum layer attribution on each of ``layers`` (see the module docstring); ``params`` go to
    the class's constructor or its ``attribute`` by name."""

    attribution: ClassVar[type]

    def __init__(self, model: nn.Module, layer: str | Sequence[str], reshape: Reshape = "auto",
                 **params: Any) -> None:
        super().__init__(model, layer, reshape)
        constructor = {p.name for p in _keywords(self.attribution.__init__)}
        self.constructor = {k: v for k, v in params.items() if k in constructor}
        self.attribute = {k: v for k, v in params.items() if k not in constructor}

    @classmethod
    def cost(cls, params: Mapping[str, Any], size: tuple[int, int], channels: Mapping[str, int]) -> Work | None:
        """Not declared: captum decides how often it runs the model."""
        return None

    def explain_layers(self, images: Tensor, targets: Tensor) -> dict[str, Tensor]:
        size = (images.shape[-2], images.shape[-1])
        maps = {}
        for name in self.layers:
            method = self.attribution(self.model, resolve_module(self.model, name), **self.constructor)
            with torch.enable_grad():
                inputs = images.detach().clone().requires_grad_(True)
                attributions = method.attribute(inputs, target=targets, **self.attribute)
            attributions = attributions.detach().float()
            if attributions.dim() != 4:
                raise ValueError(f"{self.name}: layer {name!r} gives attributions of shape "
                                 f"{tuple(attributions.shape)}; only [B, C, h, w] layers are supported")
            signed = self.attribution.__name__ == "LayerGradCam"
            maps[name] = upsample((attributions if signed else attributions.abs()).sum(dim=1), size)
        return maps

    def layer_map(self, activations: Tensor, gradients: Tensor | None, images: Tensor, targets: Tensor) -> Tensor:
        raise NotImplementedError(f"{self.name}: captum computes each layer's map (explain_layers)")


class GradCamLibrary(CamExplainer):
    """A pytorch-grad-cam method's channel weights in this package's CAM template (see the module docstring)."""

    library_class: ClassVar[type]

    def __init__(self, model: nn.Module, layer: str | Sequence[str], reshape: Reshape = "auto") -> None:
        super().__init__(model, layer, reshape)

    def layer_map(self, activations: Tensor, gradients: Tensor | None, images: Tensor, targets: Tensor) -> Tensor:
        assert gradients is not None
        try:  # unbound, without an instance: its __init__ would hook and switch the model
            weights = self.library_class.get_cam_weights(
                None, images, None, targets, activations.cpu().numpy(), gradients.cpu().numpy())
        except AttributeError:
            raise PluginError(f"{self.name}: its weights need more than activations and gradients; "
                              "only such grad-cam methods (GradCAM, GradCAMPlusPlus, XGradCAM) run here") from None
        weights = torch.from_numpy(np.asarray(weights, dtype=np.float32)).to(activations.device)
        return torch.relu((weights[:, :, None, None] * activations.float()).sum(dim=1))


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
        base = CaptumLayerAttribution if layered else CaptumAttribution
        cls: type[Explainer] = type(attribute, (base,), {"name": name, "attribution": wrapped})
        extra = [inspect.Parameter("layer", inspect.Parameter.KEYWORD_ONLY),
                 inspect.Parameter("reshape", inspect.Parameter.KEYWORD_ONLY, default="auto")] if layered else []
        _with_signature(cls, [*extra, *_keywords(wrapped.__init__), *_keywords(wrapped.attribute)])
        return cls
    return type(attribute, (GradCamLibrary,), {"name": name, "library_class": wrapped})
