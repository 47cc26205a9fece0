"""The layers CAM methods read: found by dotted name, defaulted per architecture family,
and turned into ``[B, C, h, w]`` grids.

A layer is any module named by its dotted path in ``model.named_modules()``
(``layer4``, ``features.7``, ``encoder.layers.encoder_layer_11.ln_1``), or in the Python API
the module object itself, resolved to that name (:func:`layer_name`). An unknown
name names its closest matches (:mod:`difflib`) and points to ``xai-pipeline layers``.

How an output becomes a grid (the ``reshape`` parameter of every CAM method):

- ``none``: it already is ``[B, C, h, w]`` (convolutional networks).
- ``tokens``: ``[B, N, C]`` tokens of a vision transformer. A leading class token is
  dropped: the grid is the factorization ``h x w`` of ``N - 1`` (or of ``N``, for
  models without one) closest to the image's aspect ratio, ``N - 1`` winning ties.
- ``channels_last``: ``[B, h, w, C]`` (Swin), permuted to ``[B, C, h, w]``.
- ``auto`` (default): ``tokens`` for any 3-D output, ``channels_last`` for the 4-D
  outputs of a torchvision Swin's ``features`` and ``norm`` (but not its patch
  convolution ``features.0.0``), ``none`` otherwise.

Default layers (:func:`default_layer`), the last spatial block of torchvision's families:
ResNet/ResNeXt/Wide ResNet ``layer4``; VGG the last ReLU of ``features``; DenseNet
``features.denseblock4``; MobileNet V2/V3, EfficientNet V1/V2, ConvNeXt and Swin the last
block of ``features``; ViT ``ln_1`` of the last encoder layer; RegNet ``trunk_output``;
ShuffleNet V2 ``conv5``; MNASNet ``layers``; SqueezeNet ``features``; GoogLeNet
``inception5b``; Inception V3 ``Mixed_7c``. Any other model: the last module (in forward
order) whose output is ``[B, C, h, w]`` with ``h * w > 1``, else the last one with 1x1.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Literal

import torch
from torch import Tensor, nn

__all__ = [
    "Reshape",
    "RESHAPES",
    "LAYERS_HINT",
    "LayerInfo",
    "resolve_module",
    "layer_name",
    "to_grid",
    "probe_layers",
    "candidate_layers",
    "default_layer",
]

Reshape = Literal["auto", "tokens", "channels_last", "none"]
RESHAPES: tuple[str, ...] = ("auto", "tokens", "channels_last", "none")
LAYERS_HINT = "`xai-pipeline layers CONFIG` lists the model's layers with their output shapes"


def resolve_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule at dotted path ``name``; an unknown name names the closest matches and,
    for a model of at most 40 modules, lists them all (last)."""
    modules = dict(model.named_modules())
    if name and name in modules:
        return modules[name]
    names = [n for n in modules if n]
    message = f"unknown layer {name!r}"
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
    if close:
        message += f"; did you mean {', '.join(close)}?"
    message += f" ({LAYERS_HINT})"
    if len(names) <= 40:
        message += f"; the model's modules are: {', '.join(names)}"
    raise ValueError(message)


def layer_name(model: nn.Module, layer: str | nn.Module) -> str:
    """The dotted name of ``layer`` in ``model``: a name is checked as :func:`resolve_module` does, a
    module is found by identity among the model's submodules; one that is not inside it is an error."""
    if isinstance(layer, str):
        resolve_module(model, layer)
        return layer
    if not isinstance(layer, nn.Module):
        raise TypeError(f"a layer is a module of the model or its dotted name, got {type(layer).__name__}")
    for name, module in model.named_modules():
        if module is layer and name:
            return name
    what = "the model itself" if layer is model else f"this {type(layer).__name__} module"
    raise ValueError(f"{what} is not a layer inside the model (a module of another model, or a copy?): give one "
                     f"of its submodules, such as model.layer4, or a dotted name ({LAYERS_HINT})")


def _is_swin(model: nn.Module) -> bool:
    from torchvision.models import SwinTransformer

    return isinstance(model, SwinTransformer)


def _resolved(model: nn.Module, name: str, output: Tensor, reshape: str) -> str:
    """The rule ``auto`` stands for on layer ``name`` with this output."""
    if reshape != "auto":
        return reshape
    if output.dim() == 3:
        return "tokens"
    swin_trunk = name in ("features", "norm") or (name.startswith("features.") and name != "features.0.0")
    return "channels_last" if output.dim() == 4 and swin_trunk and _is_swin(model) else "none"


def _token_grid(tokens: int, size: tuple[int, int]) -> tuple[int, int, int] | None:
    """``(prefix, h, w)``: the leading tokens to drop and the grid of the rest, by the rule of ``tokens``."""
    best: tuple[float, int, int, int] | None = None
    aspect = math.log(size[0] / size[1])
    for prefix in (1, 0):
        count = tokens - prefix
        for h in range(1, count + 1):
            if count % h == 0:
                error = abs(math.log(h / (count // h)) - aspect)
                if best is None or error < best[0] - 1e-9:
                    best = (error, prefix, h, count // h)
    return None if best is None else best[1:]


def to_grid(model: nn.Module, name: str, output: Tensor, reshape: str, size: tuple[int, int]) -> Tensor:
    """Layer ``name``'s ``output`` as ``[B, C, h, w]`` by rule ``reshape`` for images of ``size``;
    ``ValueError`` naming the layer and its shape when the rule does not fit it."""
    rule = _resolved(model, name, output, reshape) if isinstance(output, Tensor) else reshape
    shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
    needed = {"none": 4, "channels_last": 4, "tokens": 3}[rule]
    if not isinstance(output, Tensor) or output.dim() != needed:
        layouts = {"none": "[B, C, h, w]", "channels_last": "[B, h, w, C]", "tokens": "[B, N, C]"}
        raise ValueError(
            f"layer {name!r} has output shape {shape}; CAM methods need [B, C, h, w] "
            f"(reshape: {reshape} expects {layouts[rule]}; tokens takes [B, N, C], channels_last [B, h, w, C])"
        )
    if rule == "none":
        return output
    if rule == "channels_last":
        return output.permute(0, 3, 1, 2)
    grid = _token_grid(output.shape[1], size)
    if grid is None:
        raise ValueError(f"layer {name!r} has output shape {shape}: no tokens to arrange in a grid")
    prefix, h, w = grid
    return output[:, prefix:].transpose(1, 2).reshape(output.shape[0], output.shape[2], h, w)


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """A module with a tensor output: its name, class, output shape per image and CAM grid ``(C, h, w)``
    under ``reshape: auto`` (``None``: it has none)."""

    name: str
    kind: str
    shape: tuple[int, ...]
    grid: tuple[int, int, int] | None


def probe_layers(model: nn.Module, size: tuple[int, int]) -> list[LayerInfo]:
    """Every module with a tensor output, in the order their forwards finish, from one forward
    of a zero image of ``size`` (without gradients; hooks removed on return)."""
    found: list[LayerInfo] = []
    handles = []

    def record(name: str, module: nn.Module, output: object) -> None:
        if not isinstance(output, Tensor) or output.dim() < 1:
            return
        try:
            c, h, w = to_grid(model, name, output, "auto", size).shape[1:]
            grid: tuple[int, int, int] | None = (c, h, w)
        except ValueError:
            grid = None
        found.append(LayerInfo(name, type(module).__name__, tuple(output.shape[1:]), grid))

    try:
        for name, module in model.named_modules():
            if name:
                handles.append(module.register_forward_hook(
                    lambda module, _inputs, output, name=name: record(name, module, output)))
        parameter = next(model.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
        with torch.no_grad():
            model(torch.zeros(1, 3, *size, device=device))
    finally:
        for handle in handles:
            handle.remove()
    return found


def candidate_layers(model: nn.Module, size: tuple[int, int]) -> list[LayerInfo]:
    """The layers a CAM method can read (a grid under ``reshape: auto``), in ``named_modules`` order."""
    order = {name: index for index, (name, _) in enumerate(model.named_modules())}
    seen = {info.name: info for info in probe_layers(model, size) if info.grid is not None}
    return sorted(seen.values(), key=lambda info: order[info.name])


def _last(model: nn.Module, name: str) -> str:
    return f"{name}.{len(model.get_submodule(name)) - 1}"  # type: ignore[arg-type]


def _family_default(model: nn.Module) -> str | None:
    from torchvision import models as tv

    if isinstance(model, tv.ResNet):
        return "layer4"
    if isinstance(model, tv.VGG):
        relus = [i for i, m in enumerate(model.features) if isinstance(m, nn.ReLU)]
        return f"features.{relus[-1]}"
    if isinstance(model, tv.DenseNet):
        return "features.denseblock4"
    if isinstance(model, (tv.MobileNetV2, tv.MobileNetV3, tv.EfficientNet, tv.ConvNeXt, tv.SwinTransformer)):
        return _last(model, "features")
    if isinstance(model, tv.VisionTransformer):
        return f"encoder.layers.encoder_layer_{len(model.encoder.layers) - 1}.ln_1"
    named = {tv.RegNet: "trunk_output", tv.ShuffleNetV2: "conv5", tv.MNASNet: "layers", tv.SqueezeNet: "features",
             tv.GoogLeNet: "inception5b", tv.Inception3: "Mixed_7c"}
    return next((layer for cls, layer in named.items() if isinstance(model, cls)), None)


def default_layer(model: nn.Module, size: tuple[int, int]) -> str:
    """The layer CAM methods read when none is given (see the module docstring); a model of no
    known family is probed with one forward of a zero image of ``size``."""
    family = _family_default(model)
    if family is not None:
        return family
    spatial = [info for info in probe_layers(model, size) if len(info.shape) == 3]
    wide = [info for info in spatial if info.shape[1] * info.shape[2] > 1]
    if not spatial:
        raise ValueError(
            f"the model has no layer with a [B, C, h, w] output to default to: give `layers` ({LAYERS_HINT})"
        )
    return (wide or spatial)[-1].name
