"""Insertion and deletion curves and their areas (RISE, Petsiuk et al. 2018).

Pixels are ranked by decreasing saliency and changed ``step`` at a time, so a curve
has ``n_steps + 1`` points, ``n_steps = ceil(H * W / step)``. Point ``t`` is the softmax
probability of the target class on the image in which the pixels of rank
``< t * step`` have been changed:

- insertion starts from the substrate (point 0) and puts the original pixels back,
  ending on the original image;
- deletion starts from the original image (point 0) and replaces its pixels by the
  substrate, ending on the substrate.

The area under a curve is the trapezoid rule over ``x`` in ``[0, 1]`` with ``n_steps``
equal intervals: ``(sum(curve) - (curve[0] + curve[-1]) / 2) / n_steps``.

The step images are built on the model's device from the pixel ranks (one
``torch.where`` per model batch) and go through the model ``batch_size`` at a time;
all probabilities stay on the device until the end. Besides the inputs, memory holds
one substrate image per input image (none for ``"zeros"`` and ``"mean"``) and one
batch of step images.
"""
from __future__ import annotations

from typing import Annotated, Literal

import torch
from torch import Tensor, nn

from ..cost import Work
from ..methods.base import batched, check_targets
from ..parameters import Param, validated
from ._filters import filter_2d, filter_matrix, gaussian_taps

__all__ = [
    "insertion",
    "deletion",
    "check_curve_parameters",
    "curve_cost",
    "pixel_rank",
    "blur_substrate",
    "make_substrate",
    "model_device",
    "SUBSTRATES",
    "BLURS",
]

Substrate = Literal["blur", "zeros", "mean"] | Tensor
Blur = Literal["rise", "gaussian"]

#: the substrates named by a string
SUBSTRATES = ("blur", "zeros", "mean")

#: the kernels of the ``"blur"`` substrate (see :func:`blur_substrate`)
BLURS = ("rise", "gaussian")

#: radius of SciPy's ``gaussian_filter`` (truncate 4.0), used by the RISE reference kernel
_SCIPY_TRUNCATE = 4.0


def model_device(model: nn.Module, fallback: torch.device) -> torch.device:
    """The device of the model's first parameter (or buffer); ``fallback`` for a model with neither."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return fallback


Step = Annotated[int, Param("pixels changed per step of the curve", unit="pixels", ge=1)]
SubstrateParam = Annotated[Substrate, Param("the image without its pixels: blurred, zeros, channel mean or a tensor")]
BlurParam = Annotated[Blur, Param("blur kernel of substrate blur: the RISE code's or a Gaussian")]
CurveBatch = Annotated[int, Param("step images per model forward", unit="images", ge=1)]


def check_curve_parameters(size: tuple[int, int], *, step: int) -> None:
    """Raise ``ValueError`` naming ``step`` unless it is at most the number of pixels of ``size``
    maps (a larger step gives the same one-step curve from the start image to the end image)."""
    pixels = size[0] * size[1]
    if step > pixels:
        raise ValueError(f"step {step} exceeds the {pixels} pixels of a {size[0]}x{size[1]} map")


def curve_cost(size: tuple[int, int], *, step: int, substrate: Substrate, blur: Blur, batch_size: int) -> Work:
    """The forwards per image of an insertion or deletion curve: its ``ceil(H * W / step) + 1`` points."""
    return Work(-(-size[0] * size[1] // step) + 1)


def pixel_rank(maps: Tensor) -> Tensor:
    """Rank ``[B, H*W]`` (int32) of every pixel by decreasing saliency; rank 0 is the most salient.

    A stable sort orders equal saliencies by ascending row-major pixel index
    (pixel ``(i, j)`` has index ``i * W + j``), so ties are broken the same way everywhere.
    """
    flat = maps.flatten(1)
    order = torch.sort(flat, dim=1, descending=True, stable=True).indices
    positions = torch.arange(flat.shape[1], device=flat.device, dtype=torch.int32).expand_as(order)
    return torch.empty_like(order, dtype=torch.int32).scatter_(1, order, positions)


def blur_substrate(images: Tensor, *, kernel_size: int = 11, sigma: float = 5.0, kernel: Blur = "rise") -> Tensor:
    """Blur each channel of ``images`` ``[B, C, H, W]`` with zero padding (same shape and dtype).

    ``kernel="rise"`` (the default) is the kernel of the RISE evaluation code
    (github.com/eclique/RISE, ``evaluation.py``: ``gkern(11, 5)``), with which the RISE
    paper's and the users' Insertion numbers were computed: SciPy's
    ``gaussian_filter(delta, sigma)`` of a ``kernel_size`` square unit impulse (default
    ``mode="reflect"``, ``truncate=4.0``), applied as a 2-D convolution. The reflections
    fold the Gaussian's tails back into the square, so it is flatter than a sampled
    Gaussian and sums to 1 only up to what lies beyond the reach. ``kernel="gaussian"``
    is the sampled Gaussian ``exp(-(x^2 + y^2) / (2 sigma^2))`` on the square,
    normalized to sum 1.
    """
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    radius = kernel_size // 2
    if kernel == "gaussian":
        taps = gaussian_taps(sigma, radius, device=images.device)
    elif kernel == "rise":
        wide = gaussian_taps(sigma, int(_SCIPY_TRUNCATE * sigma + 0.5), device=images.device)
        taps = filter_matrix(kernel_size, wide, "symmetric")[:, radius].contiguous()
    else:
        raise ValueError(f"kernel must be 'gaussian' or 'rise', got {kernel!r}")
    work_dtype = torch.promote_types(images.dtype, torch.float32)
    return filter_2d(images.to(work_dtype), taps, "zeros").to(images.dtype)


def make_substrate(images: Tensor, substrate: Substrate, blur: Blur = "rise") -> Tensor:
    """The substrate images for ``images`` ``[B, C, H, W]``, broadcast to their shape.

    ``"blur"``: :func:`blur_substrate` with kernel ``blur`` (11 x 11, sigma 5, zero
    padding, per channel);
    ``"zeros"``: zeros in the (normalized) input space; ``"mean"``: each image's
    per-channel mean; a tensor: used as given, broadcast to ``images``.
    """
    if isinstance(substrate, Tensor):
        try:
            fits = torch.broadcast_shapes(substrate.shape, images.shape) == images.shape
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(
                f"substrate of shape {tuple(substrate.shape)} does not broadcast to images {tuple(images.shape)}"
            )
        return substrate.to(device=images.device, dtype=images.dtype).expand_as(images)
    if substrate == "blur":
        return blur_substrate(images, kernel=blur)
    if substrate == "zeros":
        return images.new_zeros(()).expand_as(images)
    if substrate == "mean":
        return images.mean(dim=(2, 3), keepdim=True).expand_as(images)
    raise ValueError(f"substrate must be 'blur', 'zeros', 'mean' or a tensor, got {substrate!r}")


@validated
def insertion(
    model: nn.Module,
    images: Tensor,
    maps: Tensor,
    targets: Tensor,
    *,
    step: Step = 224,
    substrate: SubstrateParam = "blur",
    blur: BlurParam = "rise",
    batch_size: CurveBatch = 256,
) -> tuple[Tensor, Tensor]:
    """Insertion AUC ``[B]`` and curves ``[B, n_steps + 1]`` (float32, on the model's device).

    ``images`` ``[B, C, H, W]`` are model inputs (normalized), ``maps`` ``[B, H, W]``
    saliency at the images' size, ``targets`` ``[B]`` class indices. The curve starts on
    the substrate (see :func:`make_substrate`; by default the images blurred with the
    RISE evaluation code's kernel, ``blur="rise"``, as in the RISE paper) and inserts
    the original pixels, most salient first (ties: :func:`pixel_rank`). AUC is
    ``(sum(curve) - (curve[0] + curve[-1]) / 2) / n_steps``. The model runs under
    ``no_grad`` in its current mode, on ``batch_size`` step images at a time.
    """
    return _perturbation_curves(model, images, maps, targets, step, substrate, blur, batch_size, inserting=True)


@validated
def deletion(
    model: nn.Module,
    images: Tensor,
    maps: Tensor,
    targets: Tensor,
    *,
    step: Step = 224,
    substrate: SubstrateParam = "zeros",
    blur: BlurParam = "rise",
    batch_size: CurveBatch = 256,
) -> tuple[Tensor, Tensor]:
    """Deletion AUC ``[B]`` and curves ``[B, n_steps + 1]`` (float32, on the model's device).

    As :func:`insertion`, but the curve starts on the original images and replaces their
    pixels, most salient first, by the substrate (default zeros, as in RISE; ``blur``
    matters only for ``substrate="blur"``).
    """
    return _perturbation_curves(model, images, maps, targets, step, substrate, blur, batch_size, inserting=False)


def _perturbation_curves(
    model: nn.Module,
    images: Tensor,
    maps: Tensor,
    targets: Tensor,
    step: int,
    substrate: Substrate,
    blur: Blur,
    batch_size: int,
    *,
    inserting: bool,
) -> tuple[Tensor, Tensor]:
    check_targets(images, targets)
    n_images, _, height, width = images.shape
    if maps.shape != (n_images, height, width):
        raise ValueError(f"maps must be [B, H, W]={[n_images, height, width]}, got shape {tuple(maps.shape)}")
    check_curve_parameters((height, width), step=step)
    device = model_device(model, images.device)
    images, maps, targets = images.to(device), maps.to(device), targets.to(device)
    if torch.isnan(maps).any():
        raise ValueError("maps contain NaN; the pixel order is undefined")

    background = make_substrate(images, substrate, blur)
    start, end = (background, images) if inserting else (images, background)
    n_steps = -(-height * width // step)
    points = n_steps + 1
    rank = pixel_rank(maps)
    curves = torch.empty(n_images * points, dtype=torch.float32, device=device)
    with torch.no_grad():
        for first, stop in batched(n_images * points, batch_size):
            items = torch.arange(first, stop, device=device)
            image_index = items // points
            thresholds = ((items % points) * step).to(torch.int32)
            changed = (rank.index_select(0, image_index) < thresholds.unsqueeze(1)).view(-1, 1, height, width)
            batch = torch.where(changed, end.index_select(0, image_index), start.index_select(0, image_index))
            probabilities = model(batch).float().softmax(dim=1)
            curves[first:stop] = probabilities.gather(1, targets.index_select(0, image_index).unsqueeze(1)).squeeze(1)
    curves = curves.view(n_images, points)
    auc = (curves.sum(dim=1) - (curves[:, 0] + curves[:, -1]) / 2) / n_steps
    return auc, curves
