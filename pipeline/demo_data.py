"""A self-made image dataset for demos and tests: coloured shapes on cluttered backgrounds.

:func:`make_shapes_dataset` writes, deterministically for a seed,

- ``root/images/<class>/<class>_<idx:04d>.png``: RGB images in ImageFolder layout on a
  muted smooth-noise background with a few muted distractor lines and elongated blobs.
  In the ``single`` scene each holds one shape of its class (circle, square, triangle
  or cross) in a random saturated colour; in the ``majority`` scene it holds three or
  four smaller shapes of its class and up to three of other classes, each class at
  least two shapes behind (the class is the shape drawn most often), so the shapes of
  other classes are evidence against it.
  Only the outline tells a shape (colours are drawn alike for every class), so the
  evidence is the objects' edges and corners, which a blur destroys: Insertion and
  Deletion then tell good saliency maps from bad ones;
- ``root/gt/<class>/<class>_<idx:04d>.png``: 8-bit grayscale ground-truth maps, the
  mask of the shapes of the image's class blurred with a Gaussian and scaled to a
  maximum of 255, standing in for a gaze-fixation density map;
- ``root/manifest.csv``: one row per image with ``path``, ``label`` and ``gt`` (paths
  relative to ``root``), plus ``split`` (``train``/``val``) when asked for.

Labels are class indices in sorted class-name order, the order of
:class:`torchvision.datasets.ImageFolder`, so they match the outputs of a model trained
on the tree. The held-out images are the same ones :func:`is_validation_index` names.
"""
from __future__ import annotations

import csv
import dataclasses
import math
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np
from PIL import Image
from skimage.draw import disk, ellipse, polygon
from skimage.filters import gaussian

__all__ = [
    "SHAPE_CLASSES",
    "SCENES",
    "Scene",
    "VALIDATION_EVERY",
    "ShapeRecord",
    "ShapesDatasetInfo",
    "is_validation_index",
    "make_shapes_dataset",
]

#: the shapes the generator can draw, in its default order
SHAPE_CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "cross")

#: every ``VALIDATION_EVERY``-th image of each class (positions 4, 9, 14, ...) is held out
VALIDATION_EVERY = 5

#: ``single``: one shape of the class; ``majority``: several shapes, most of them of the class
Scene = Literal["single", "majority"]
SCENES: tuple[str, ...] = ("single", "majority")

_MIN_IMAGE_SIZE = 16
_SHAPE_EXTENT = (0.20, 0.35)  # shape extent as a fraction of the image side
_MAJORITY_EXTENT = (0.16, 0.24)  # the same, for the shapes of a majority scene
_PLACEMENT_TRIES = 60  # draws of a majority scene's shape before it is left out for lack of room
_SATURATION = 0.3  # how much colour the background and distractors keep (0: grey)


@dataclasses.dataclass(frozen=True)
class ShapeRecord:
    """One generated image: relative paths, label and what was drawn."""

    path: str
    gt: str
    label: int
    class_name: str
    index: int
    colour: tuple[int, int, int]  # of the (first) shape of its class
    split: str


@dataclasses.dataclass(frozen=True)
class ShapesDatasetInfo:
    """What :func:`make_shapes_dataset` wrote; ``classes[label]`` is a label's class name."""

    root: Path
    manifest: Path
    classes: tuple[str, ...]
    image_size: int
    n_per_class: int
    seed: int
    records: tuple[ShapeRecord, ...]


def is_validation_index(position: int) -> bool:
    """Whether the image at ``position`` (0-based, within its class, sorted by name) is held out."""
    return position % VALIDATION_EVERY == VALIDATION_EVERY - 1


def _rotate(points: np.ndarray, angle: float) -> np.ndarray:
    """Rotate ``[N, 2]`` (row, col) points about the origin by ``angle`` radians."""
    cos, sin = math.cos(angle), math.sin(angle)
    return points @ np.array([[cos, sin], [-sin, cos]])


def _square(extent: float, rng: np.random.Generator) -> np.ndarray:
    half = extent / 2
    corners = np.array([[-half, -half], [-half, half], [half, half], [half, -half]])
    return _rotate(corners, rng.uniform(-math.pi / 12, math.pi / 12))


def _triangle(extent: float, rng: np.random.Generator) -> np.ndarray:
    radius = extent / math.sqrt(3) * 1.15  # equilateral, side a bit longer than the extent
    angles = np.deg2rad([90.0, 210.0, 330.0]) + rng.uniform(0, 2 * math.pi)
    return radius * np.stack([-np.sin(angles), np.cos(angles)], axis=1)


def _cross(extent: float, rng: np.random.Generator) -> np.ndarray:
    half, arm = extent / 2, extent / 6
    outline = np.array([
        [-half, -arm], [-half, arm], [-arm, arm], [-arm, half], [arm, half], [arm, arm],
        [half, arm], [half, -arm], [arm, -arm], [arm, -half], [-arm, -half], [-arm, -arm],
    ])
    return _rotate(outline, rng.uniform(-math.pi / 12, math.pi / 12))


def _circle(extent: float, rng: np.random.Generator) -> np.ndarray:
    angles = np.linspace(0, 2 * math.pi, 64, endpoint=False)
    return extent / 2 * np.stack([np.sin(angles), np.cos(angles)], axis=1)


#: class name -> outline centred on the origin, as (row, col) vertices
_OUTLINES: dict[str, Callable[[float, np.random.Generator], np.ndarray]] = {
    "circle": _circle,
    "square": _square,
    "triangle": _triangle,
    "cross": _cross,
}


def _smooth_noise(size: int, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian-filtered white noise ``[size, size, 3]``, standardized per channel."""
    noise = gaussian(rng.normal(size=(size, size, 3)), sigma=sigma, mode="wrap", channel_axis=-1)
    return (noise - noise.mean(axis=(0, 1))) / noise.std(axis=(0, 1))


def _background(size: int, clutter: float, rng: np.random.Generator) -> np.ndarray:
    """Smooth colour noise in two octaves, ``[size, size, 3]`` floats in [0, 1]."""
    coarse = _smooth_noise(size, size / rng.uniform(6, 12), rng)
    fine = _smooth_noise(size, 1.0, rng)
    base = rng.uniform(0.3, 0.7, 3)
    return np.clip(base + clutter * (0.15 * coarse + 0.05 * fine), 0.0, 1.0)


def _draw_distractors(image: np.ndarray, clutter: float, rng: np.random.Generator) -> None:
    """Paint a few thin bars and elongated blobs, none of them a class shape."""
    size = image.shape[0]
    for _ in range(int(rng.integers(round(3 * clutter), round(6 * clutter) + 1))):
        colour = rng.uniform(0, 1, 3)
        centre = rng.uniform(0.1 * size, 0.9 * size, 2)
        angle = rng.uniform(0, math.pi)
        if rng.random() < 0.5:
            length, width = rng.uniform(0.15, 0.3) * size, rng.uniform(1.0, 2.0)
            bar = np.array([[-width, -length], [-width, length], [width, length], [width, -length]]) / 2
            rows, cols = polygon(*(_rotate(bar, angle) + centre).T, shape=image.shape[:2])
        else:
            minor = rng.uniform(0.02, 0.04) * size
            rows, cols = ellipse(*centre, minor, minor * rng.uniform(2.5, 3.5),
                                 shape=image.shape[:2], rotation=angle)
        image[rows, cols] = colour


def _shape_mask(class_name: str, size: int, rng: np.random.Generator,
                extent_range: tuple[float, float] = _SHAPE_EXTENT) -> np.ndarray:
    """Boolean mask of one randomly sized, placed and turned shape, fully inside the image."""
    extent = rng.uniform(*extent_range) * size
    outline = _OUTLINES[class_name](extent, rng)
    low = -outline.min(axis=0) + 1
    high = size - 2 - outline.max(axis=0)
    outline = outline + rng.uniform(low, np.maximum(low, high))
    mask = np.zeros((size, size), dtype=bool)
    if class_name == "circle":
        rows, cols = disk(outline.mean(axis=0), extent / 2, shape=mask.shape)
    else:
        rows, cols = polygon(outline[:, 0], outline[:, 1], shape=mask.shape)
    mask[rows, cols] = True
    return mask


def _muted(image: np.ndarray) -> np.ndarray:
    """``image`` with most of its colour removed (mixed with its grey level)."""
    grey = image.mean(axis=-1, keepdims=True)
    return grey + _SATURATION * (image - grey)


def _shape_colour(rng: np.random.Generator) -> np.ndarray:
    """A saturated colour of random hue, the same distribution for every class."""
    hue = rng.uniform(0, 2 * math.pi)
    return 0.55 + 0.4 * np.cos(hue + np.array([0.0, 2 * math.pi / 3, 4 * math.pi / 3]))


def _majority_shapes(class_name: str, classes: Sequence[str], size: int,
                     rng: np.random.Generator) -> list[tuple[str, np.ndarray]]:
    """Three or four shapes of ``class_name`` and one fewer of other classes (each drawn among
    ``classes``), apart from each other; a shape that finds no room is left out, and so is a
    shape of another class when its class would otherwise no longer trail by two."""
    count = int(rng.integers(3, 5))
    others = [c for c in classes if c != class_name]
    names = [class_name] * count + [others[int(rng.integers(len(others)))] for _ in range(count - 1)]
    taken = np.zeros((size, size), dtype=bool)
    placed: list[tuple[str, np.ndarray]] = []
    for name in names:
        for _ in range(_PLACEMENT_TRIES):
            mask = _shape_mask(name, size, rng, _MAJORITY_EXTENT)
            if not (mask & taken).any():
                break
        else:
            continue
        own = sum(n == class_name for n, _ in placed)
        if name != class_name and sum(n == name for n, _ in placed) + 1 > own - 2:
            continue
        taken |= gaussian(mask.astype(np.float64), sigma=1.5) > 0.01  # a margin of about 3 pixels
        placed.append((name, mask))
    return placed


def _render(class_name: str, size: int, clutter: float, gt_sigma: float, rng: np.random.Generator,
            scene: Scene = "single", classes: Sequence[str] = SHAPE_CLASSES,
            ) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int]]:
    """One ``uint8`` RGB image, its ``uint8`` ground-truth map and the colour of its class's shape."""
    image = _muted(_background(size, clutter, rng))
    _draw_distractors(image, clutter, rng)
    image = _muted(image)
    if scene == "single":
        shapes = [(class_name, _shape_mask(class_name, size, rng))]
    else:
        shapes = _majority_shapes(class_name, classes, size, rng)
    rgb = np.round(image * 255).astype(np.uint8)
    evidence = np.zeros((size, size), dtype=bool)
    colours = []
    for name, mask in shapes:
        colour = np.round(_shape_colour(rng) * 255).astype(np.uint8)
        rgb[mask] = colour
        if name == class_name:
            evidence |= mask
            colours.append(colour)
    density = gaussian(evidence.astype(np.float64), sigma=gt_sigma * size)
    gt = np.round(density / density.max() * 255).astype(np.uint8)
    return rgb, gt, (int(colours[0][0]), int(colours[0][1]), int(colours[0][2]))


def _check_arguments(n_per_class: int, image_size: int, classes: Sequence[str], gt_sigma: float,
                     scene: str) -> None:
    if not isinstance(n_per_class, int) or n_per_class < 1:
        raise ValueError(f"n_per_class must be a positive int, got {n_per_class!r}")
    if not isinstance(image_size, int) or image_size < _MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be an int >= {_MIN_IMAGE_SIZE}, got {image_size!r}")
    if isinstance(classes, str) or not classes:
        raise ValueError(f"classes must be a non-empty sequence of names, got {classes!r}")
    unknown = [name for name in classes if name not in _OUTLINES]
    if unknown:
        raise ValueError(f"classes has unknown shapes {unknown}; known: {', '.join(SHAPE_CLASSES)}")
    if len(set(classes)) != len(classes):
        raise ValueError(f"classes has duplicates: {list(classes)}")
    if not gt_sigma > 0:
        raise ValueError(f"gt_sigma must be > 0, got {gt_sigma!r}")
    if scene not in SCENES:
        raise ValueError(f"scene must be one of {', '.join(SCENES)}, got {scene!r}")
    if scene == "majority" and len(classes) < 2:
        raise ValueError(f"the majority scene needs at least 2 classes, got {list(classes)}")


def make_shapes_dataset(
    root: Path,
    *,
    n_per_class: int = 40,
    image_size: int = 64,
    classes: Sequence[str] = SHAPE_CLASSES,
    seed: int = 0,
    split: bool = True,
    clutter: float = 1.0,
    gt_sigma: float = 0.08,
    scene: Scene = "single",
) -> ShapesDatasetInfo:
    """Write the shapes dataset under ``root`` and return what was written.

    ``gt_sigma`` is the ground-truth blur as a fraction of ``image_size``; ``scene`` is
    ``single`` (one shape per image) or ``majority`` (the class is the shape drawn most often). With
    ``split`` the manifest gets a ``split`` column marking the held-out images
    (:func:`is_validation_index`); records carry the same split either way.
    Identical arguments give byte-identical files.
    """
    _check_arguments(n_per_class, image_size, classes, gt_sigma, scene)
    root = Path(root)
    rng = np.random.default_rng(seed)
    label_of = {name: label for label, name in enumerate(sorted(classes))}
    records = []
    for class_name in classes:
        (root / "images" / class_name).mkdir(parents=True, exist_ok=True)
        (root / "gt" / class_name).mkdir(parents=True, exist_ok=True)
        for index in range(n_per_class):
            rgb, gt, colour = _render(class_name, image_size, clutter, gt_sigma, rng, scene, classes)
            name = f"{class_name}/{class_name}_{index:04d}.png"
            Image.fromarray(rgb).save(root / "images" / name)
            Image.fromarray(gt).save(root / "gt" / name)
            records.append(ShapeRecord(
                path=f"images/{name}", gt=f"gt/{name}", label=label_of[class_name],
                class_name=class_name, index=index, colour=colour,
                split="val" if is_validation_index(index) else "train",
            ))
    manifest = root / "manifest.csv"
    columns = ["path", "label", "gt"] + (["split"] if split else [])
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for record in records:
            writer.writerow([record.path, record.label, record.gt] + ([record.split] if split else []))
    return ShapesDatasetInfo(
        root=root, manifest=manifest, classes=tuple(sorted(classes)), image_size=image_size,
        n_per_class=n_per_class, seed=seed, records=tuple(records),
    )
