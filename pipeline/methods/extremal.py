"""Extremal perturbations (Fong, Patrick and Vedaldi, ICCV 2019), preservation game.

For each target area ``a`` a smooth mask is optimised so that the target logit of the
image, blurred wherever the mask is low, is as large as possible while the mask covers
(close to) a fraction ``a`` of the image. The building blocks are public so they can be
checked on their own: :func:`gaussian_blur`, :func:`blur_pyramid`, :func:`perturb`,
:func:`area_profile`, :func:`area_ranking_loss` and :class:`SmoothMaskGenerator`.
"""
from __future__ import annotations

import math
from numbers import Real
from typing import Annotated, Any, Literal, Mapping, Sequence
import typing

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..cost import Work
from .base import Explainer, check_targets
from ..parameters import Param, validated

__all__ = [
    "ExtremalPerturbation",
    "SmoothMaskGenerator",
    "gaussian_blur",
    "blur_pyramid",
    "perturb",
    "area_profile",
    "area_ranking_loss",
    "SMOOTH_MAX_COLDNESS",
    "AREA_MODES",
]

#: inverse temperature of the smooth max that pools the grid points (TorchRay's value)
SMOOTH_MAX_COLDNESS = 20.0

#: what the area constraint ranks (see :class:`ExtremalPerturbation`); the first is the default
AreaMode = Literal["torchray", "margin", "image"]
AREA_MODES: tuple[str, ...] = typing.get_args(AreaMode)

Fraction = Annotated[float, Param("", gt=0, lt=1)]


def gaussian_blur(images: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of ``[N, C, H, W]`` images with zero padding.

    The 1-D kernel has taps ``i = -R..R`` with ``R = ceil(4 sigma)``, weights
    proportional to ``exp(-i^2 / (2 sigma^2))`` normalised to sum to one. Pixels
    outside the image count as 0 (for normalised images: the dataset mean).
    ``sigma == 0`` returns a copy of the images.
    """
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    if images.dim() != 4:
        raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
    if sigma == 0:
        return images.clone()
    radius = math.ceil(4 * sigma)
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64, device=images.device)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(images.dtype)
    n, c, h, w = images.shape
    flat = images.reshape(n * c, 1, h, w)
    flat = F.conv2d(flat, kernel.view(1, 1, -1, 1), padding=(radius, 0))
    flat = F.conv2d(flat, kernel.view(1, 1, 1, -1), padding=(0, radius))
    return flat.view(n, c, h, w)


def blur_pyramid(images: Tensor, num_levels: int, max_blur: float) -> Tensor:
    """Increasingly blurred copies ``[N, L, C, H, W]`` of ``[N, C, H, W]`` images.

    Level ``l`` is :func:`gaussian_blur` with ``sigma = max_blur * (1 - l / (L - 1))``:
    level 0 is the most blurred, level ``L - 1`` the image itself.
    """
    if num_levels < 2:
        raise ValueError(f"num_levels must be >= 2, got {num_levels}")
    sigmas = [max_blur * (1 - level / (num_levels - 1)) for level in range(num_levels)]
    return torch.stack([gaussian_blur(images, sigma) for sigma in sigmas], dim=1)


def perturb(pyramid: Tensor, masks: Tensor) -> Tensor:
    """Perturbed images ``[N, K, C, H, W]`` from a pyramid ``[N, L, C, H, W]`` and masks ``[N, K, H, W]``.

    Each pixel reads the pyramid at fractional level ``m * (L - 1)`` (masks clipped to
    [0, 1]), linearly interpolating between the two nearest levels: mask 1 keeps the
    pixel, mask 0 takes the most blurred one. Differentiable in the masks.
    """
    n, num_levels, c, h, w = pyramid.shape
    k = masks.shape[1]
    position = masks.clamp(0, 1) * (num_levels - 1)
    lower = position.detach().floor().clamp(max=num_levels - 2)
    fraction = (position - lower).unsqueeze(2)
    index = lower.long().unsqueeze(2).unsqueeze(2).expand(n, k, 1, c, h, w)
    levels = pyramid.unsqueeze(1).expand(n, k, num_levels, c, h, w)
    below = levels.gather(2, index).squeeze(2)
    above = levels.gather(2, index + 1).squeeze(2)
    return below + fraction * (above - below)


def area_profile(
    num_pixels: int,
    areas: Sequence[float],
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Step profiles ``r_a`` ``[N, num_pixels]`` of masks of the ``N`` given areas.

    The profile of area ``a`` is the ideal mask sorted in ascending order: its first
    ``floor(num_pixels * (1 - a))`` entries are 0, the others 1.
    """
    zeros = torch.tensor([math.floor(num_pixels * (1 - a)) for a in areas], device=device)
    ranks = torch.arange(num_pixels, device=device)
    return (ranks.unsqueeze(0) >= zeros.unsqueeze(1)).to(dtype)


def area_ranking_loss(masks: Tensor, profile: Tensor) -> Tensor:
    """The paper's area constraint ``mean((sort(m) - r_a)^2)`` per mask, shape ``[N]``.

    ``masks`` is ``[N, ...]`` (all but the first dimension are pixels) and ``profile``
    the matching :func:`area_profile` ``[N, pixels]``.
    """
    values = masks.flatten(1).sort(dim=1).values
    return ((values - profile) ** 2).mean(dim=1)


def _smooth_max_kernel(distance: Tensor) -> Tensor:
    """TorchRay's kernel of distance/sigma: 1 up to 1/2, then a Gaussian of std 1/2."""
    return torch.exp(-2 * (distance - 0.5).clamp_min(0) ** 2)


class SmoothMaskGenerator:
    """Smooth masks at pixel resolution from parameters on a coarse grid.

    The paper's smooth max-convolution: the parameters live on ``ceil(H / step) x
    ceil(W / step)`` grid points spaced ``step`` pixels apart and centred on the image
    (:attr:`centres`). Pixel ``u`` takes the smooth maximum over nearby grid points
    ``v`` of ``k(|u - v| / sigma) * p_v`` with TorchRay's kernel
    ``k(z) = exp(-2 max(z - 1/2, 0)^2)`` (flat up to ``sigma / 2``, then a Gaussian of
    std ``sigma / 2``) and ``smax(x) = sum_i x_i softmax(coldness * x)_i``. The
    maximum runs over the ``(2r + 1)^2`` grid points around the one nearest the pixel,
    ``r = 1 + ceil(sigma / step)`` as in TorchRay; points beyond the grid count as
    parameters equal to 0. Masks are drawn on a canvas reaching ``margin`` pixels
    beyond the image on every side; :meth:`crop` returns the image part.
    """

    def __init__(
        self,
        height: int,
        width: int,
        step: int,
        sigma: float,
        margin: int = 0,
        coldness: float = SMOOTH_MAX_COLDNESS,
        device: torch.device | str | None = None,
    ) -> None:
        self.height, self.width, self.margin, self.coldness = height, width, margin, coldness
        self.radius = 1 + math.ceil(sigma / step)
        self.grid_shape = (math.ceil(height / step), math.ceil(width / step))
        cells_y, offsets_y, self.padding_y, centres_y = self._axis(height, self.grid_shape[0], step, device)
        cells_x, offsets_x, self.padding_x, centres_x = self._axis(width, self.grid_shape[1], step, device)
        #: y and x pixel coordinates of the grid points (the parameters' rows and columns)
        self.centres = (centres_y, centres_x)
        self.cells = (cells_y, cells_x)
        distance = torch.sqrt(offsets_y[:, None, :, None] ** 2 + offsets_x[None, :, None, :] ** 2)
        self.weights = _smooth_max_kernel(distance / sigma).flatten(0, 1).float()

    def _axis(
        self, size: int, grid: int, step: int, device: torch.device | str | None
    ) -> tuple[Tensor, Tensor, tuple[int, int], Tensor]:
        """Along one axis: the cell (nearest grid point, counted from the first one any
        canvas pixel has) of every canvas pixel, the offsets ``[2r + 1, size + 2 margin]``
        from each pixel to its neighbouring grid points, the zero padding (before, after)
        that gives every cell its ``2r + 1`` neighbours, and the grid points' coordinates."""
        first = (size - 1 - step * (grid - 1)) / 2
        pixels = torch.arange(-self.margin, size + self.margin, dtype=torch.float64, device=device)
        nearest = torch.floor((pixels - first) / step + 0.5).long()
        low, high = int(nearest.min()), int(nearest.max())
        shifts = torch.arange(-self.radius, self.radius + 1, device=device)
        neighbours = nearest.unsqueeze(0) + shifts.unsqueeze(1)
        offsets = pixels.unsqueeze(0) - (first + step * neighbours.double())
        padding = (self.radius - low, high + self.radius - (grid - 1))
        centres = first + step * torch.arange(grid, dtype=torch.float64, device=device)
        return nearest - low, offsets, padding, centres

    def __call__(self, params: Tensor) -> Tensor:
        """Masks ``[N, H + 2 margin, W + 2 margin]`` from parameters ``[N, *grid_shape]``."""
        if params.dim() != 3 or tuple(params.shape[1:]) != self.grid_shape:
            expected = f"[N, {self.grid_shape[0]}, {self.grid_shape[1]}]"
            raise ValueError(f"params must be {expected}, got shape {tuple(params.shape)}")
        padded = F.pad(params, (*self.padding_x, *self.padding_y)).unsqueeze(1)
        size = 2 * self.radius + 1
        per_cell = F.unfold(padded, size)
        per_cell = per_cell.view(len(params), size * size, padded.shape[2] - size + 1, padded.shape[3] - size + 1)
        values = per_cell.index_select(2, self.cells[0]).index_select(3, self.cells[1])
        values = values * self.weights.to(params.dtype)
        return (values * torch.softmax(self.coldness * values, dim=1)).sum(dim=1)

    def crop(self, canvas: Tensor) -> Tensor:
        """The image part ``[N, H, W]`` of masks drawn on the canvas."""
        m = self.margin
        return canvas[:, m : m + self.height, m : m + self.width]


class ExtremalPerturbation(Explainer):
    """Extremal perturbations, preservation game with blur (Fong, Patrick and Vedaldi, 2019).

    For every image and every area ``a`` in ``areas`` a mask is optimised (all images x
    areas in one batch of the model forward, on the images' device):

    - mask: :class:`SmoothMaskGenerator` (grid step ``step``, kernel scale ``sigma``),
      parameters initialised to 1 and clipped to [0, 1] after every step;
    - perturbed image: :func:`perturb` with a :func:`blur_pyramid` of ``num_levels``
      levels up to ``max_blur`` (mask 1 keeps the image, 0 blurs it most);
    - energy to minimise: ``-logit_target + lambda_t * area_ranking_loss`` with
      ``lambda_t = area_weight * area_growth ** t`` at iteration ``t``;
    - optimiser: SGD with momentum on the mask parameters only, gradients from
      :func:`torch.autograd.grad`. Like TorchRay the momentum buffer is damped
      (``buffer = momentum * buffer + (1 - dampening) * grad``, ``dampening = 0.9``);
      ``dampening=0`` gives classical momentum;
    - ``jitter`` (TorchRay, not in the paper): the perturbed images are flipped
      horizontally on even iterations.

    The area constraint (``area_mode``), where the paper and the reference implementation
    (TorchRay, ``torchray.attribution.extremal_perturbation``) differ. The default,
    ``"torchray"``, is the reference's: it ranks the pixels of a canvas reaching
    ``sigma`` pixels beyond the image (here ``round(sigma)`` on every side), with ``a``
    a fraction of that canvas, so the masks cover more than ``a`` of the image (1.4
    times for 224 x 224 inputs). ``"margin"`` ranks the same canvas with a step profile
    of ``a * H * W`` ones, so a mask inside the image covers the fraction ``a`` of it.
    ``"image"``, the paper's formula, ranks the image pixels only; then grid points near
    the border, whose kernels reach partly outside the image, pay less area penalty than
    inner ones and the masks drift into the corners. The masks returned are those of the
    final parameters (TorchRay returns those of the last forward, one step earlier).

    :meth:`explain_masks` gives the masks ``[B, K, H, W]``. :meth:`explain` returns
    their sum over the areas, smoothed with :func:`gaussian_blur` of
    ``sigma = smooth * min(H, W)`` (zero padding), as in TorchRay's pointing-game
    benchmark (``smooth = 0.09``); ``smooth=0`` leaves the sum unsmoothed.

    Cost: ``iterations x len(areas)`` forwards and as many backwards per image (2400 of each
    with the defaults, 800 iterations and 3 areas: the most expensive method here; time
    falls in proportion to ``iterations``). The smooth max holds ``(2r + 1)^2`` values per
    canvas pixel and mask (81 x 266 x 266 floats, 23 MB, per mask of a 224 x 224 image with
    the defaults, a few times that with autograd), so memory grows with images x areas per call.
    """

    name = "extremal"

    @validated
    def __init__(
        self,
        model: nn.Module,
        areas: Annotated[Fraction | Annotated[Sequence[Fraction], Param("", min_length=1)],
                         Param("target area of each mask", unit="fraction of the image")] = (0.05, 0.1, 0.2),
        iterations: Annotated[int, Param("optimisation steps per mask (cost: one forward and backward each)",
                                         unit="steps", ge=1)] = 800,
        step: Annotated[int, Param("spacing of the mask's grid points", unit="pixels", ge=1)] = 7,
        sigma: Annotated[float, Param("scale of the mask's smoothing kernel (tuned for 224 px)", unit="pixels",
                                      gt=0)] = 21.0,
        num_levels: Annotated[int, Param("levels of the blur pyramid", ge=2)] = 8,
        max_blur: Annotated[float, Param("blur of the last pyramid level", unit="pixels", gt=0)] = 20.0,
        area_weight: Annotated[float, Param("initial weight of the area loss", gt=0)] = 300.0,
        area_growth: Annotated[float, Param("growth of the area weight per step", gt=0)] = 1.0035,
        lr: Annotated[float, Param("learning rate of SGD", gt=0)] = 0.01,
        momentum: Annotated[float, Param("momentum of SGD", ge=0, lt=1)] = 0.9,
        dampening: Annotated[float, Param("dampening of the momentum buffer", ge=0, le=1)] = 0.9,
        jitter: Annotated[bool, Param("flip the perturbed images on even steps (TorchRay)")] = True,
        area_mode: Annotated[AreaMode, Param("what the area constraint ranks")] = "torchray",
        smooth: Annotated[float, Param("blur of the summed masks", unit="fraction of the shorter side",
                                       ge=0)] = 0.09,
    ) -> None:
        super().__init__(model)
        self.areas = (areas,) if isinstance(areas, float) else tuple(areas)
        self.iterations = iterations
        self.step = step
        self.num_levels = num_levels
        self.sigma = sigma
        self.max_blur = max_blur
        self.area_weight = area_weight
        self.area_growth = area_growth
        self.lr = lr
        self.momentum = momentum
        self.dampening = dampening
        self.smooth = smooth
        self.jitter = jitter
        self.area_mode = area_mode

    @classmethod
    def cost(cls, params: Mapping[str, Any], size: tuple[int, int], channels: Mapping[str, int]) -> Work:
        """``iterations x len(areas)`` forwards and backwards per image."""
        areas = params["areas"]
        rows = params["iterations"] * (1 if isinstance(areas, Real) else len(areas))
        return Work(rows, rows)

    def explain(self, images: Tensor, targets: Tensor) -> Tensor:
        masks = self.explain_masks(images, targets)
        saliency = masks.sum(dim=1, keepdim=True)
        if self.smooth > 0:
            saliency = gaussian_blur(saliency, self.smooth * min(images.shape[-2:]))
        return saliency.squeeze(1).float()

    def explain_masks(self, images: Tensor, targets: Tensor) -> Tensor:
        """The optimised masks ``[B, K, H, W]`` (float32), one per area of :attr:`areas`."""
        check_targets(images, targets)
        if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
            raise TypeError(f"{self.name}: targets must be integer class indices, got dtype {targets.dtype}")
        batch, _, height, width = images.shape
        num_areas = len(self.areas)
        device = images.device
        images = images.detach()
        targets = targets.to(device).repeat_interleave(num_areas)
        margin = 0 if self.area_mode == "image" else round(self.sigma)
        generator = SmoothMaskGenerator(height, width, self.step, self.sigma, margin, device=device)
        canvas_pixels = (height + 2 * margin) * (width + 2 * margin)
        scale = height * width / canvas_pixels if self.area_mode == "margin" else 1.0
        profile = area_profile(canvas_pixels, [a * scale for a in self.areas] * batch, device, images.dtype)
        rows = torch.arange(batch * num_areas, device=device)
        with torch.no_grad():
            pyramid = blur_pyramid(images, self.num_levels, self.max_blur)
        params = torch.ones(batch * num_areas, *generator.grid_shape, device=device, dtype=images.dtype)
        velocity: Tensor | None = None
        area_weight = self.area_weight
        for iteration in range(self.iterations):
            with torch.enable_grad():
                leaf = params.detach().requires_grad_(True)
                canvas = generator(leaf)
                masks = generator.crop(canvas).view(batch, num_areas, height, width)
                perturbed = perturb(pyramid, masks).flatten(0, 1)
                if self.jitter and iteration % 2 == 0:
                    perturbed = perturbed.flip(-1)
                logits = self.model(perturbed)
                if iteration == 0:
                    self._check_logits(logits, targets)
                reward = logits[rows, targets]
                energy = (area_weight * area_ranking_loss(canvas, profile) - reward).sum()
                (gradient,) = torch.autograd.grad(energy, leaf)
            velocity = self._step(params, gradient, velocity)
            area_weight *= self.area_growth
        with torch.no_grad():
            masks = generator.crop(generator(params))
        return masks.view(batch, num_areas, height, width).float()

    def _step(self, params: Tensor, gradient: Tensor, velocity: Tensor | None) -> Tensor:
        """One damped-momentum SGD step on ``params`` in place, then clip to [0, 1]; the new velocity."""
        if velocity is None:
            velocity = gradient.clone()
        else:
            velocity.mul_(self.momentum).add_(gradient, alpha=1 - self.dampening)
        params.sub_(self.lr * velocity).clamp_(0, 1)
        return velocity

    def _check_logits(self, logits: Tensor, targets: Tensor) -> None:
        if logits.dim() != 2 or logits.shape[0] != targets.shape[0]:
            raise ValueError(
                f"{self.name}: the model must return logits [N, classes] for N inputs, "
                f"got shape {tuple(logits.shape)} for N={targets.shape[0]}"
            )
        if bool((targets < 0).any()) or bool((targets >= logits.shape[1]).any()):
            raise ValueError(
                f"{self.name}: targets must be class indices in [0, {logits.shape[1]}), got {targets.unique().tolist()}"
            )
