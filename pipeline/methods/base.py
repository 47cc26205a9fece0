"""Shared machinery of the explanation methods.

Every method maps normalized images ``[B, 3, H, W]`` and target classes ``[B]`` to
float32 saliency maps ``[B, H, W]`` on the images' device. Three small bases cover them:

- :class:`Explainer`: the interface (``explain``); ``explain(images)`` or ``explain(images, None)``
  explains each image's predicted class (the model's arg-max), in every subclass.
- :class:`CamExplainer`: a template method for class-activation maps. It hooks the
  requested layers, runs one forward (and one backward when the method needs
  gradients) for all of them, turns each output into a ``[B, C, h, w]`` grid
  (:mod:`pipeline.methods.layers`: transformer tokens, channels-last) and upsamples
  each layer's map to the input size; a method only overrides :meth:`CamExplainer.layer_map`.
  The pass also gives the logits it ran on (:meth:`CamExplainer.explain_pass`): the predicted
  classes need no forward of their own.
- :class:`SampledExplainer`: methods that average over random samples (RISE, LIME).
  Sample ``i`` is a pure function of ``(seed, i)``, so a sample range can be computed
  anywhere (:meth:`~SampledExplainer.steps`, :meth:`~SampledExplainer.accumulate`),
  partial results add up (:meth:`~SampledExplainer.merge`) and
  :meth:`~SampledExplainer.finalize` turns the total into maps. The result is bitwise
  the same however the range was split, when the cuts are multiples of
  :meth:`~SampledExplainer.samples_per_forward` (:meth:`~SampledExplainer.check_alignment`):
  forward batches cover fixed absolute sample groups, and partial sums are int64 fixed
  point (:data:`FIXED_POINT_BITS`), whose addition is exact.

Methods never change the model's mode, always remove their hooks, and take
gradients with :func:`torch.autograd.grad`, so no ``.grad`` is left on parameters.

Parameters are declared once, in the ``__init__`` signatures, with their meaning, unit
and range (:class:`~pipeline.parameters.Param`; the shared ones are the aliases
:data:`Layers`, :data:`ReshapeRule`, :data:`Seed`, :data:`BatchSize`,
:data:`SampleCount`), and checked from there (:func:`~pipeline.parameters.validated`).
"""
from __future__ import annotations

import abc
import collections
import contextlib
import dataclasses
import functools
from typing import Annotated, Any, Callable, ClassVar, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..cost import Work
from ..parameters import Param, validated
from .layers import Reshape, layer_name, resolve_module, to_grid

__all__ = [
    "Explainer",
    "CamExplainer",
    "CamPass",
    "SampledExplainer",
    "Partial",
    "FIXED_POINT_BITS",
    "MAX_SAMPLES",
    "to_fixed",
    "from_fixed",
    "capture_outputs",
    "resolve_module",
    "upsample",
    "minmax_normalize",
    "check_targets",
    "Layers",
    "ReshapeRule",
    "Seed",
    "BatchSize",
    "SampleCount",
    "batched",
    "aligned_batches",
]

FIXED_POINT_BITS = 40
"""Partial sums are int64 multiples of ``2**-FIXED_POINT_BITS`` (about 9e-13): each forward
batch's float64 contribution is rounded to that grid once, far below float32 map precision."""

MAX_SAMPLES = 2 ** (63 - FIXED_POINT_BITS) - 1
"""The most samples a :class:`SampledExplainer` takes: every term of its sums lies in [0, 1]
per sample, so a total stays below ``MAX_SAMPLES * 2**FIXED_POINT_BITS < 2**63``."""


Layers = Annotated[str | nn.Module | Sequence[str | nn.Module],
                   Param("the layers: dotted module names (the entry's `layers`) or the modules themselves")]
ReshapeRule = Annotated[Reshape, Param("how a layer's output becomes a [B, C, h, w] grid (auto: by model family)")]
Seed = Annotated[int, Param("seed of the random draws", ge=0, lt=2**64)]
BatchSize = Annotated[int, Param("inputs per model forward (`auto` in a config: chosen on the device, "
                                 "see pipeline/batch_size.py)", unit="images", ge=1)]
SampleCount = Annotated[int, Param("random samples per image", unit="samples", ge=1, le=MAX_SAMPLES)]


def to_fixed(values: Tensor) -> Tensor:
    """``values`` rounded to the nearest multiple of ``2**-FIXED_POINT_BITS``, as int64 counts of that unit."""
    return torch.round(values.double() * 2.0**FIXED_POINT_BITS).to(torch.int64)


def from_fixed(values: Tensor) -> Tensor:
    """float64 values of int64 fixed-point sums (the inverse of :func:`to_fixed` up to its rounding)."""
    return values.double() * 2.0**-FIXED_POINT_BITS


@contextlib.contextmanager
def capture_outputs(model: nn.Module, layers: Sequence[str]) -> Iterator[dict[str, Tensor]]:
    """Record the output of each named layer during forwards inside the block.

    The dictionary maps layer name to its latest output; hooks are removed on exit,
    also when the block raises.
    """
    captured: dict[str, Tensor] = {}
    handles = []
    try:
        for name in layers:
            module = resolve_module(model, name)

            def hook(_module: nn.Module, _inputs: object, output: Tensor, name: str = name) -> None:
                captured[name] = output

            handles.append(module.register_forward_hook(hook))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def upsample(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of ``[B, h, w]`` maps to ``[B, *size]`` (no-op when equal)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)


def minmax_normalize(maps: Tensor, eps: float = 1e-12) -> Tensor:
    """Scale each map of ``[..., h, w]`` to [0, 1]; a constant map becomes zeros."""
    flat = maps.flatten(-2)
    low = flat.min(dim=-1, keepdim=True).values
    high = flat.max(dim=-1, keepdim=True).values
    span = high - low
    scaled = torch.where(span > eps, (flat - low) / span.clamp_min(eps), torch.zeros_like(flat))
    return scaled.view_as(maps)


def _predicted_by_default(explain: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``explain(images, targets)`` that takes the predicted classes when ``targets`` is omitted or None."""

    @functools.wraps(explain)
    def explain_targets(self: "Explainer", images: Tensor, targets: Tensor | None = None, *args: Any,
                        **kwargs: Any) -> Tensor:
        return explain(self, images, self.resolve_targets(images, targets), *args, **kwargs)

    return explain_targets


class Explainer(abc.ABC):
    """An explanation method bound to a model.

    Every subclass's ``explain`` takes ``targets=None`` (or none) as the predicted classes: it is
    wrapped when the subclass is defined, so a method implements it for given targets only.
    """

    name: ClassVar[str]

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "explain" in cls.__dict__:
            setattr(cls, "explain", _predicted_by_default(cls.__dict__["explain"]))

    @abc.abstractmethod
    def explain(self, images: Tensor, targets: Tensor | None = None) -> Tensor:
        """Saliency maps ``[B, H, W]`` (float32) for ``images`` ``[B, 3, H, W]`` and ``targets`` ``[B]``
        (None: each image's predicted class)."""

    def resolve_targets(self, images: Tensor, targets: Tensor | None) -> Tensor:
        """``targets``, or when None the model's predicted class of each image (one forward, no gradients)."""
        if targets is not None:
            return targets
        with torch.no_grad():
            return self.model(images).argmax(dim=1)

    @classmethod
    def cost(cls, params: Mapping[str, Any], size: tuple[int, int], channels: Mapping[str, int]) -> Work | None:
        """The model forwards and backwards :meth:`explain` makes per image with ``params`` (every
        parameter, defaults filled in) on ``size`` images; ``channels``: the channel count of each
        layer (CAM methods). ``None``: not declared (see :mod:`pipeline.cost`)."""
        return None


@dataclasses.dataclass(frozen=True)
class CamPass:
    """The maps ``[B, H, W]`` of every layer from one pass, and the logits ``[B, classes]`` of its forward."""

    maps: dict[str, Tensor]
    logits: Tensor


class CamExplainer(Explainer):
    """Template for class-activation-map methods on one or several layers.

    Subclasses set :attr:`needs_gradients` and implement :meth:`layer_map`.
    ``layer`` is a module's dotted name (``"layer4"``) or the module itself (``model.layer4``),
    or a list of them: all are fed by the same forward/backward pass in :meth:`explain_pass`
    and named by their dotted names (:attr:`layers`). ``reshape`` is how
    their outputs become grids (:mod:`pipeline.methods.layers`; ``auto`` by default).
    """

    needs_gradients: ClassVar[bool] = True
    #: :meth:`explain_pass` gives the logits of the forward the maps come from (False for a
    #: subclass that computes its maps otherwise, overriding :meth:`explain_layers`)
    classifies: ClassVar[bool] = True

    @validated
    def __init__(self, model: nn.Module, layer: Layers, reshape: ReshapeRule = "auto") -> None:
        super().__init__(model)
        given = [layer] if isinstance(layer, (str, nn.Module)) else list(layer)
        if not given:
            raise ValueError(f"{self.name}: at least one layer is needed")
        self.layers: list[str] = [layer_name(model, item) for item in given]
        self.reshape = reshape

    @classmethod
    def cost(cls, params: Mapping[str, Any], size: tuple[int, int], channels: Mapping[str, int]) -> Work | None:
        """One forward for all layers, and one backward when the method needs gradients."""
        return Work(1, int(cls.needs_gradients))

    def explain(self, images: Tensor, targets: Tensor | None = None) -> Tensor:
        if len(self.layers) != 1:
            raise ValueError(f"{self.name}: explain() needs one layer, got {self.layers}; use explain_layers()")
        return self.explain_layers(images, targets)[self.layers[0]]

    def explain_layers(self, images: Tensor, targets: Tensor | None = None) -> dict[str, Tensor]:
        """Maps ``[B, H, W]`` for every layer, from one forward (and backward) pass (``targets``
        None: the predicted classes)."""
        return self.explain_pass(images, targets).maps

    def explain_pass(self, images: Tensor, targets: Tensor | None = None) -> CamPass:
        """The maps of every layer and the logits of the one forward they come from (``targets`` None:
        the arg-max of those logits, the same classes as a forward without gradients would give)."""
        size = (images.shape[-2], images.shape[-1])
        with capture_outputs(self.model, self.layers) as captured, torch.enable_grad() if self.needs_gradients else torch.no_grad():
            inputs = images.detach().requires_grad_(self.needs_gradients)
            logits = self.model(inputs)
            if targets is None:
                targets = logits.detach().argmax(dim=1)
            activations = [captured[name] for name in self.layers]
            for name, act in zip(self.layers, activations):
                self._grid(name, act, size)
            if self.needs_gradients:
                score = logits.gather(1, targets.view(-1, 1)).sum()
                gradients: list[Tensor | None] = list(torch.autograd.grad(score, activations))
            else:
                gradients = [None] * len(activations)
        maps = {}
        for name, act, grad in zip(self.layers, activations, gradients):
            with torch.no_grad():
                grid_grad = None if grad is None else self._grid(name, grad.detach(), size)
                layer_map = self.layer_map(self._grid(name, act.detach(), size), grid_grad, images, targets)
                maps[name] = upsample(layer_map.float(), size).float()
        return CamPass(maps, logits.detach())

    def _grid(self, name: str, output: Tensor, size: tuple[int, int]) -> Tensor:
        try:
            return to_grid(self.model, name, output, self.reshape, size)
        except ValueError as error:
            raise ValueError(f"{self.name}: {error}") from None

    @abc.abstractmethod
    def layer_map(self, activations: Tensor, gradients: Tensor | None, images: Tensor, targets: Tensor) -> Tensor:
        """One layer's map ``[B, h, w]`` (or already ``[B, H, W]``) from its activations ``[B, C, h, w]``
        and, when :attr:`needs_gradients`, the gradients of the target logits with respect to them."""


@dataclasses.dataclass
class Partial:
    """Partial result of a :class:`SampledExplainer` over a range of samples.

    ``sums`` add up across ranges: int64, in units of ``2**-FIXED_POINT_BITS``
    (:func:`to_fixed`) or plain counts, so merging is exact integer addition.
    ``constants`` (e.g. a segmentation) are the same for every range of the same
    images. Every tensor's first dimension is the image.
    """

    sums: dict[str, Tensor]
    constants: dict[str, Tensor] = dataclasses.field(default_factory=dict)

    def to(self, device: torch.device | str) -> "Partial":
        return Partial(
            {k: v.to(device) for k, v in self.sums.items()},
            {k: v.to(device) for k, v in self.constants.items()},
        )


_NO_MODEL_MESSAGE = "this explainer was built with model=None: it merges and finalizes partials but runs no forward"


class _NoModel(nn.Module):
    """The model of a :class:`SampledExplainer` built with ``model=None``; a forward raises."""

    def forward(self, inputs: Tensor) -> Tensor:
        raise RuntimeError(_NO_MODEL_MESSAGE)


class SampledExplainer(Explainer):
    """Methods averaging over ``n_samples`` random samples, shardable by sample index.

    Samples go through the model in forward batches of :meth:`samples_per_forward`
    samples for up to ``batch_size`` images, over the absolute sample groups
    ``[k*m, (k+1)*m)`` (:func:`aligned_batches`), so a range cut at multiples of ``m``
    shares no forward batch with its neighbours. :meth:`steps` walks a range and yields
    running totals (for checkpoints); :meth:`accumulate` returns the last of them.

    ``model`` may be ``None`` for an explainer that only merges and finalizes partials
    (both need only the method's parameters); it then raises on any forward.

    Subclasses implement :meth:`empty_sums`, :meth:`group_sums` and :meth:`finalize`,
    override :meth:`prepare` when every range needs per-image constants (the constants
    named in :attr:`partial_constants` travel in the :class:`Partial`), and override
    :meth:`draw` to draw a whole range's random numbers at once, before the forward loop:
    the loop then only slices device tensors (no host copy or sync per forward batch).
    """

    #: names of the :meth:`prepare` constants kept in every :class:`Partial`
    partial_constants: ClassVar[tuple[str, ...]] = ()

    @validated
    def __init__(
        self, model: nn.Module | None, n_samples: SampleCount, seed: Seed = 0, batch_size: BatchSize = 64
    ) -> None:
        super().__init__(_NoModel() if model is None else model)
        self.n_samples = n_samples
        self.seed = seed
        self.batch_size = batch_size

    def explain(self, images: Tensor, targets: Tensor) -> Tensor:
        return self.finalize(self.accumulate(images, targets, 0, self.n_samples))

    def host_constants(self, images: Tensor) -> dict[str, Tensor]:
        """The part of :meth:`prepare`'s constants computed on the host from the images alone, without
        the model (none by default; LIME's segmentation): loader processes compute it ahead of the
        shard, beside decoding (:mod:`pipeline.stages.prefetch`), and give it to :meth:`prepare`."""
        return {}

    def prepare(self, images: Tensor, host: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Per-image constants every sample range of ``images`` needs (none by default), from
        :meth:`host_constants` when ``host`` gives them."""
        return {}

    def draw(self, start: int, stop: int, images: Tensor, constants: dict[str, Tensor]) -> dict[str, Tensor]:
        """The random draws of samples ``start .. stop-1`` on the images' device, each tensor's first
        dimension the sample (none by default); :meth:`group_sums` gets them sliced to its group."""
        return {}

    @abc.abstractmethod
    def empty_sums(self, images: Tensor, constants: dict[str, Tensor]) -> dict[str, Tensor]:
        """The sums of an empty range: int64 zeros of every key and shape."""

    @abc.abstractmethod
    def group_sums(
        self, images: Tensor, targets: Tensor, start: int, stop: int, constants: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        """The int64 sums over samples ``start .. stop-1``, one forward per chunk of images
        (``targets`` are int64 on the images' device; called without gradients). ``constants``
        holds :meth:`prepare`'s constants and this group's rows of the :meth:`draw` tensors."""

    def steps(
        self,
        images: Tensor,
        targets: Tensor,
        start: int,
        stop: int,
        *,
        resume: Partial | None = None,
        position: int | None = None,
        constants: dict[str, Tensor] | None = None,
    ) -> Iterator[tuple[Partial, int]]:
        """Walk samples ``start .. stop-1`` and yield ``(total, next)`` after each forward batch.

        ``total`` covers samples ``start .. next-1``: a new :class:`Partial` whose tensors
        are never modified afterwards, so it may be saved at any moment. To continue from
        a yielded pair, pass it back as ``resume`` and ``position``: the final total is
        bitwise the same. When no sample is left the total is yielded once, so the last
        yield always covers ``start .. stop-1``. :meth:`prepare` runs once, now, unless
        ``constants`` (its result for the same images) are given; :meth:`draw` runs once, now,
        for the samples left.
        """
        check_targets(images, targets)
        self.check_range(start, stop)
        if isinstance(self.model, _NoModel):
            raise RuntimeError(f"{self.name}: {_NO_MODEL_MESSAGE}")
        if (resume is None) != (position is None):
            raise ValueError(f"{self.name}: resume and position go together, got position={position}")
        per_forward = self.samples_per_forward(images.shape[0])
        position = start if position is None else position
        if position not in (start, stop) and not (start < position < stop and position % per_forward == 0):
            raise ValueError(
                f"{self.name}: position {position} is not a yielded position of samples {start}..{stop} "
                f"(start, stop or a multiple of {per_forward} between them)"
            )
        constants = self.prepare(images) if constants is None else constants
        empty = Partial(self.empty_sums(images, constants), {k: constants[k] for k in self.partial_constants})
        total = empty if resume is None else self._checked_resume(resume.to(images.device), empty)
        draws = self.draw(position, stop, images, constants)
        targets = targets.to(device=images.device, dtype=torch.long)
        return self._walk(images, targets, total, position, stop, constants, draws)

    def _walk(
        self,
        images: Tensor,
        targets: Tensor,
        total: Partial,
        position: int,
        stop: int,
        constants: dict[str, Tensor],
        draws: dict[str, Tensor],
    ) -> Iterator[tuple[Partial, int]]:
        if position == stop:
            yield total, stop
        per_forward = self.samples_per_forward(images.shape[0])
        for group_start, group_stop in aligned_batches(position, stop, per_forward):
            rows = slice(group_start - position, group_stop - position)
            group_constants = {**constants, **{key: value[rows] for key, value in draws.items()}}
            with torch.no_grad():
                group = self.group_sums(images, targets, group_start, group_stop, group_constants)
            total = Partial({k: v + group[k] for k, v in total.sums.items()}, dict(total.constants))
            yield total, group_stop

    def _checked_resume(self, resume: Partial, empty: Partial) -> Partial:
        """``resume``, after checking it is a total of this method over the same images."""
        for key, zeros in empty.sums.items():
            saved = resume.sums.get(key)
            if saved is None or saved.dtype != zeros.dtype or saved.shape != zeros.shape:
                raise ValueError(f"{self.name}: the resumed partial does not match {key!r} of these images")
        for key, value in empty.constants.items():
            saved = resume.constants.get(key)
            if saved is None or not torch.equal(saved, value):
                raise ValueError(f"{self.name}: the resumed partial disagrees on {key!r}: it is not of these images")
        return resume

    def accumulate(
        self, images: Tensor, targets: Tensor, start: int, stop: int, constants: dict[str, Tensor] | None = None
    ) -> Partial:
        """Partial sums over samples ``start .. stop-1`` (the last total of :meth:`steps`)."""
        total, _ = collections.deque(self.steps(images, targets, start, stop, constants=constants), maxlen=1)[0]
        return total

    def check_range(self, start: int, stop: int) -> None:
        """Raise unless ``start .. stop-1`` is a range of this explainer's samples."""
        if not 0 <= start <= stop <= self.n_samples:
            raise ValueError(
                f"{self.name}: sample range must satisfy 0 <= start <= stop <= {self.n_samples} samples, "
                f"got start={start}, stop={stop}"
            )

    def samples_per_forward(self, n_images: int) -> int:
        """Samples per model forward for a batch of ``n_images``: ``batch_size`` perturbed inputs, at least one sample."""
        if n_images < 1:
            raise ValueError(f"{self.name}: n_images must be >= 1, got {n_images}")
        return max(1, self.batch_size // min(n_images, self.batch_size))

    def forward_split(self, n_images: int) -> tuple[int, int]:
        """Images and samples per model forward: ``batch_size`` perturbed inputs, at least one of each."""
        return min(n_images, self.batch_size), self.samples_per_forward(n_images)

    def check_alignment(self, start: int, stop: int, n_images: int) -> None:
        """Raise unless samples ``start .. stop-1`` of ``n_images`` images are cut at multiples of
        :meth:`samples_per_forward` (``stop`` may also be ``n_samples``), so that shards cut
        there give bitwise the same merged total however the samples are split."""
        self.check_range(start, stop)
        per_forward = self.samples_per_forward(n_images)
        misaligned = [f"start={start}"] if start % per_forward else []
        if stop % per_forward and stop != self.n_samples:
            misaligned.append(f"stop={stop}")
        if misaligned:
            raise ValueError(
                f"{self.name}: samples {start}..{stop} must be cut at multiples of {per_forward} samples "
                f"per forward ({n_images} images, batch_size {self.batch_size}) or at n_samples={self.n_samples}; "
                f"{' and '.join(misaligned)} is not"
            )

    def target_probabilities(self, perturbed: Tensor, targets: Tensor) -> Tensor:
        """Softmax probability ``[b, m]`` of each image's target on its ``m`` perturbed
        versions ``perturbed`` ``[b, m, C, H, W]``, in one model forward."""
        images, samples = perturbed.shape[:2]
        probabilities = self.model(perturbed.flatten(0, 1)).float().softmax(dim=1).view(images, samples, -1)
        return probabilities.gather(2, targets.view(-1, 1, 1).expand(-1, samples, 1)).squeeze(2)

    @abc.abstractmethod
    def finalize(self, partial: Partial) -> Tensor:
        """Saliency maps ``[B, H, W]`` (float32) from the total over all samples."""

    @staticmethod
    def merge(partials: Sequence[Partial]) -> Partial:
        """Sum of partial results over disjoint sample ranges of the same images (exact, in any order)."""
        if not partials:
            raise ValueError("nothing to merge")
        first = partials[0]
        for partial in partials:
            for key, value in partial.sums.items():
                if value.dtype != torch.int64:
                    raise ValueError(f"partial sums must be int64 fixed point, got {value.dtype} for {key!r}")
        sums = {k: v.clone() for k, v in first.sums.items()}
        for other in partials[1:]:
            if other.sums.keys() != sums.keys() or other.constants.keys() != first.constants.keys():
                raise ValueError("partials of different methods cannot be merged")
            for key, value in other.sums.items():
                sums[key] += value.to(sums[key].device)
            for key, value in other.constants.items():
                if not torch.equal(value.to(first.constants[key].device), first.constants[key]):
                    raise ValueError(f"partials disagree on {key!r}: they are not of the same images")
        return Partial(sums, dict(first.constants))


def check_targets(images: Tensor, targets: Tensor) -> None:
    """Raise when images and targets do not describe the same batch."""
    if images.dim() != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
    if targets.shape != (images.shape[0],):
        raise ValueError(f"targets must be [B]={images.shape[0]}, got shape {tuple(targets.shape)}")


def batched(total: int, size: int) -> Iterator[tuple[int, int]]:
    """Consecutive ``(start, stop)`` ranges of at most ``size`` covering ``range(total)``."""
    for start in range(0, total, size):
        yield start, min(start + size, total)


def aligned_batches(start: int, stop: int, size: int) -> Iterator[tuple[int, int]]:
    """The non-empty ranges ``[k*size, (k+1)*size) ∩ [start, stop)``, in order."""
    while start < stop:
        upper = min((start // size + 1) * size, stop)
        yield start, upper
        start = upper
