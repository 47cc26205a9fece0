"""LIME (Ribeiro et al., 2016) on superpixels.

Each image is segmented once into superpixels (scikit-image quickshift or SLIC on
the de-normalized RGB image, or a user callable), the images of a batch in as many
threads as torch uses (:func:`torch.get_num_threads`): quickshift takes about 0.3 s for
a 224 px image on one core, as long as a GPU takes for a thousand forwards.

Sample ``i`` is an on/off vector over the superpixels: sample 0 is all on (the original
image, as in LIME); sample ``i > 0`` switches superpixel ``k`` on where draw ``k`` of sample ``i`` is below 0.5
(:func:`lime_samples`, with the counter-based draws of :func:`~pipeline.methods.draws.uniforms`),
a pure function of ``(seed, i, k)``. A shard's vectors are drawn at once and copied to
the device once (:meth:`Lime.draw`). Hidden superpixels are filled with ``hide_color``. The model's softmax
probability of the target class is regressed on the on/off vectors by weighted ridge
regression with an unpenalized intercept (the same fit as scikit-learn's
``Ridge(alpha, fit_intercept=True)`` with ``sample_weight``), and every superpixel is
painted with its coefficient.

The segmentation and the fill of hidden pixels are computed once per range of samples
(:meth:`Lime.prepare`); in a run the segmentation is computed ahead by the loader processes
that decode the images (:meth:`Lime.host_constants`), while the device works on the shard
before. Partials hold the weighted normal-equation sums per image, padded to the largest
number of superpixels in the batch, as int64 fixed point (:func:`~pipeline.methods.base.to_fixed`):
``sum_w`` ``[B]``, ``sum_wx`` ``[B, K]``, ``sum_wy`` ``[B]``, ``sum_wxx`` ``[B, K, K]`` and
``sum_wxy`` ``[B, K]``; the segmentation is the constant ``segments`` (int64 ``[B, H, W]``,
labels ``0 .. K_b - 1``).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any, Callable, Literal, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..cost import Work
from .base import BatchSize, Partial, SampleCount, SampledExplainer, Seed, batched, from_fixed, to_fixed
from ..parameters import Param, validated
from .draws import to_device, uniforms

__all__ = ["Lime", "lime_samples", "Segmenter", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: maps a de-normalized RGB image ``[H, W, 3]`` (float64 in [0, 1]) to integer labels ``[H, W]``
Segmenter = Callable[[np.ndarray], np.ndarray]


def lime_samples(seed: int, start: int, stop: int, n_features: int) -> np.ndarray:
    """On/off vectors of samples ``start .. stop-1`` over ``n_features`` superpixels, bool ``[n, n_features]``.

    Sample 0 is all on; sample ``i > 0`` is ``uniforms(seed, i, i + 1, n_features)[0] < 0.5``,
    so a vector over fewer superpixels is a prefix of one over more.
    """
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if n_features < 1:
        raise ValueError(f"n_features must be >= 1, got {n_features}")
    samples = uniforms(seed, start, stop, n_features) < 0.5
    if start == 0 and stop > 0:
        samples[0] = True
    return samples


class Lime(SampledExplainer):
    """LIME on superpixels: ridge coefficients of the target probability on superpixel on/off vectors.

    - ``segmentation``: ``"quickshift"`` (kernel_size=4, max_dist=200, ratio=0.2, LIME's
      default), ``"slic"`` (``n_segments``) or a callable mapping the de-normalized RGB
      image ``[H, W, 3]`` (float64 in [0, 1]) to integer labels ``[H, W]`` (called from
      several threads at once, one image each). Images are de-normalized with ``mean``
      and ``std`` (ImageNet by default).
    - ``hide_color``: fill of hidden superpixels in normalized space: ``"mean"`` (the
      image's per-channel mean, the default here), ``"segment_mean"`` (each superpixel's
      own per-channel mean, what the lime package does with ``hide_color=None``) or a
      color given per channel.
    - Sample weights use lime's kernel ``sqrt(exp(-d**2 / kernel_width**2))`` of the
      cosine distance ``d`` between the on/off vector and the all-on vector (an all-off
      vector is at distance 1, as in scikit-learn).
    - ``alpha``: ridge penalty (the intercept is not penalized).
    - ``num_features``: keep only the ``num_features`` superpixels with the largest
      ``|coefficient|`` in a fit with ``selection_alpha`` (lime's "highest_weights",
      which uses 0.01) and refit on them with ``alpha``; the others are painted 0.
    - ``positive_only``: paint negative coefficients as 0.
    - ``batch_size``: perturbed images per model forward (several images share a
      forward, at least one image and one sample each).
    """

    name = "lime"
    partial_constants = ("segments",)

    @validated
    def __init__(
        self,
        model: nn.Module | None,
        n_samples: SampleCount = 1000,
        segmentation: Annotated[Literal["quickshift", "slic"] | Segmenter,
                                Param("superpixel algorithm, or a callable")] = "quickshift",
        n_segments: Annotated[int, Param("superpixels SLIC aims for", unit="superpixels", ge=1)] = 50,
        hide_color: Annotated[Literal["mean", "segment_mean"] | Sequence[float],
                              Param("fill of hidden superpixels (normalized space), or a color per channel")] = "mean",
        kernel_width: Annotated[float, Param("width of the cosine-distance kernel of the sample weights", gt=0)] = 0.25,
        alpha: Annotated[float, Param("ridge penalty", ge=0)] = 1.0,
        num_features: Annotated[int | None, Param("superpixels kept (None: all)", unit="superpixels", ge=1)] = None,
        selection_alpha: Annotated[float, Param("ridge penalty of the fit that selects num_features", ge=0)] = 0.01,
        positive_only: Annotated[bool, Param("paint negative coefficients as 0")] = False,
        mean: Annotated[Sequence[float], Param("per-channel mean the images were normalized with")] = IMAGENET_MEAN,
        std: Annotated[Sequence[Annotated[float, Param("", gt=0)]],
                       Param("per-channel standard deviation the images were normalized with")] = IMAGENET_STD,
        seed: Seed = 0,
        batch_size: BatchSize = 64,
    ) -> None:
        super().__init__(model, n_samples, seed, batch_size)
        self.n_segments = n_segments
        self.mean, self.std = tuple(mean), tuple(std)
        if len(self.mean) != len(self.std):
            raise ValueError(f"{self.name}: mean and std need one value per channel, got {mean}, {std}")
        if not isinstance(hide_color, str) and len(hide_color) != len(self.mean):
            raise ValueError(f"{self.name}: hide_color has {len(hide_color)} values but mean/std have {len(self.mean)}")
        self.hide_color: str | tuple[float, ...] = hide_color if isinstance(hide_color, str) else tuple(hide_color)
        self.kernel_width = kernel_width
        self.alpha = alpha
        self.selection_alpha = selection_alpha
        self.num_features = num_features
        self.segmentation = segmentation
        self.positive_only = positive_only

    @classmethod
    def cost(cls, params: Mapping[str, Any], size: tuple[int, int], channels: Mapping[str, int]) -> Work:
        """``n_samples`` forwards per image."""
        return Work(params["n_samples"])

    def segment(self, images: Tensor) -> Tensor:
        """Superpixel labels ``0 .. K_b - 1`` of each image, int64 ``[B, H, W]`` on the images' device."""
        if images.shape[1] != len(self.mean):
            raise ValueError(
                f"{self.name}: images have {images.shape[1]} channels but mean/std have {len(self.mean)} values"
            )
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        rgb = (images.detach().float().cpu() * std + mean).clamp(0.0, 1.0).permute(0, 2, 3, 1).double().numpy()
        # scikit-image segments without the GIL: on a GPU node the CPU cores segment side by side
        with ThreadPoolExecutor(max_workers=max(1, min(len(rgb), torch.get_num_threads()))) as pool:
            segmented = list(pool.map(self._segment_one, rgb))
        labels = []
        for index, (image, raw) in enumerate(zip(rgb, map(np.asarray, segmented))):
            if raw.shape != image.shape[:2]:
                raise ValueError(
                    f"{self.name}: segmentation of image {index} has shape {raw.shape}, expected {image.shape[:2]}"
                )
            _, contiguous = np.unique(raw, return_inverse=True)
            labels.append(contiguous.reshape(raw.shape).astype(np.int64))
        return torch.from_numpy(np.stack(labels)).to(images.device)

    def _segment_one(self, image: np.ndarray) -> np.ndarray:
        if callable(self.segmentation):
            return self.segmentation(image)
        from skimage.segmentation import quickshift, slic  # with SciPy: only where images are segmented

        if self.segmentation == "quickshift":
            return quickshift(image, kernel_size=4, max_dist=200, ratio=0.2)
        return slic(image, n_segments=self.n_segments, start_label=0)

    def fill(self, images: Tensor, segments: Tensor) -> Tensor:
        """The value of every pixel when its superpixel is hidden, ``[B, C, H, W]``."""
        if self.hide_color == "mean":
            return images.mean(dim=(2, 3), keepdim=True).expand_as(images)
        if self.hide_color == "segment_mean":
            n_images, channels = images.shape[:2]
            flat_segments = segments.flatten(1)
            n_labels = int(flat_segments.max()) + 1
            index = flat_segments.unsqueeze(1).expand(-1, channels, -1)
            totals = images.new_zeros((n_images, channels, n_labels)).scatter_add_(2, index, images.flatten(2))
            sizes = images.new_zeros((n_images, 1, n_labels)).scatter_add_(
                2, flat_segments.unsqueeze(1), images.new_ones((n_images, 1, flat_segments.shape[1]))
            )
            return (totals / sizes.clamp_min(1)).gather(2, index).view_as(images)
        color = torch.tensor(self.hide_color, dtype=images.dtype, device=images.device)
        return color.view(1, -1, 1, 1).expand_as(images)

    def host_constants(self, images: Tensor) -> dict[str, Tensor]:
        """``segments`` (:meth:`segment`): computed on the host whatever the images' device."""
        return {"segments": self.segment(images)}

    def prepare(self, images: Tensor, host: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """``segments`` (from ``host``, else :meth:`segment`) and ``fill`` (:meth:`fill`) of ``images``."""
        host = self.host_constants(images) if host is None else host
        segments = host["segments"].to(images.device, non_blocking=True)  # pinned when a loader made it
        return {"segments": segments, "fill": self.fill(images, segments)}

    def draw(self, start: int, stop: int, images: Tensor, constants: dict[str, Tensor]) -> dict[str, Tensor]:
        """``on``: the on/off vectors of samples ``start .. stop-1`` over the batch's largest number of
        superpixels, bool ``[n, K]`` on the images' device."""
        max_features = int(_feature_counts(constants["segments"]).max())
        return {"on": to_device(lime_samples(self.seed, start, stop, max_features), images.device)}

    def empty_sums(self, images: Tensor, constants: dict[str, Tensor]) -> dict[str, Tensor]:
        return self._zeros(images, int(_feature_counts(constants["segments"]).max()))

    def _zeros(self, images: Tensor, n_features: int) -> dict[str, Tensor]:
        n_images = images.shape[0]
        shapes = {
            "sum_w": (n_images,),
            "sum_wx": (n_images, n_features),
            "sum_wy": (n_images,),
            "sum_wxx": (n_images, n_features, n_features),
            "sum_wxy": (n_images, n_features),
        }
        return {key: images.new_zeros(shape, dtype=torch.int64) for key, shape in shapes.items()}

    def group_sums(
        self, images: Tensor, targets: Tensor, start: int, stop: int, constants: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        segments, fill = constants["segments"], constants["fill"]
        on = constants["on"]
        n_features = _feature_counts(segments)
        in_image = (torch.arange(on.shape[1], device=images.device) < n_features.unsqueeze(1)).double()
        sums = self._zeros(images, on.shape[1])
        for image_start, image_stop in batched(images.shape[0], self.forward_split(images.shape[0])[0]):
            chunk = slice(image_start, image_stop)
            keep = on[:, segments[chunk]].transpose(0, 1).unsqueeze(2)
            perturbed = torch.where(keep, images[chunk].unsqueeze(1), fill[chunk].unsqueeze(1))
            responses = self.target_probabilities(perturbed, targets[chunk]).double()
            features = on.double().unsqueeze(0) * in_image[chunk].unsqueeze(1)
            weights = self._kernel(features.sum(dim=2) / n_features[chunk].unsqueeze(1).double())
            weighted_features = features * weights.unsqueeze(2)
            sums["sum_w"][chunk] = to_fixed(weights.sum(dim=1))
            sums["sum_wx"][chunk] = to_fixed(weighted_features.sum(dim=1))
            sums["sum_wy"][chunk] = to_fixed((weights * responses).sum(dim=1))
            sums["sum_wxx"][chunk] = to_fixed(weighted_features.transpose(1, 2) @ features)
            sums["sum_wxy"][chunk] = to_fixed((weighted_features * responses.unsqueeze(2)).sum(dim=1))
        return sums

    def _kernel(self, fraction_on: Tensor) -> Tensor:
        """lime's kernel ``sqrt(exp(-d**2 / width**2))`` of the cosine distance ``d = 1 - sqrt(fraction_on)``
        between an on/off vector and the all-on vector."""
        distance = 1.0 - fraction_on.sqrt()
        return torch.exp(-(distance**2) / self.kernel_width**2).sqrt()

    def coefficients(self, partial: Partial) -> list[Tensor]:
        """Each image's ridge coefficients ``[K_b]`` (float64, CPU); unselected superpixels are 0."""
        n_features = _feature_counts(partial.constants["segments"]).cpu().tolist()
        sums = {key: from_fixed(value.detach().cpu()) for key, value in partial.sums.items()}
        if not bool((sums["sum_w"] > 0).all()):
            raise ValueError(f"{self.name}: the partial covers no samples; accumulate a non-empty range first")
        results = []
        for index, size in enumerate(n_features):
            total = sums["sum_w"][index]
            feature_mean = sums["sum_wx"][index, :size] / total
            response_mean = sums["sum_wy"][index] / total
            covariance = sums["sum_wxx"][index, :size, :size] - total * torch.outer(feature_mean, feature_mean)
            cross = sums["sum_wxy"][index, :size] - total * feature_mean * response_mean
            selected = torch.arange(size)
            if self.num_features is not None and self.num_features < size:
                ranking = _ridge(covariance, cross, self.selection_alpha).abs()
                selected = torch.argsort(ranking, descending=True, stable=True)[: self.num_features]
            coefficients = torch.zeros(size, dtype=torch.float64)
            coefficients[selected] = _ridge(covariance[selected][:, selected], cross[selected], self.alpha)
            results.append(coefficients)
        return results

    def finalize(self, partial: Partial) -> Tensor:
        segments = partial.constants["segments"]
        maps = []
        for coefficients, image_segments in zip(self.coefficients(partial), segments):
            if self.positive_only:
                coefficients = coefficients.clamp_min(0.0)
            maps.append(coefficients.to(segments.device)[image_segments])
        return torch.stack(maps).float()


def _feature_counts(segments: Tensor) -> Tensor:
    """The number of superpixels ``K_b`` of each image, int64 ``[B]``, from labels ``[B, H, W]``."""
    return segments.flatten(1).max(dim=1).values + 1


def _ridge(covariance: Tensor, cross: Tensor, alpha: float) -> Tensor:
    """Solution of ``(covariance + alpha I) beta = cross`` (least-norm where singular)."""
    system = covariance + alpha * torch.eye(covariance.shape[0], dtype=covariance.dtype)
    return torch.linalg.lstsq(system, cross.unsqueeze(1), driver="gelsd").solution.squeeze(1)
