"""Images, labels and ground-truth maps of an experiment.

An image's *key* is its path relative to the data root (ImageFolder) or to the
manifest's folder, in POSIX form and without extension: ``crab/img_0001``.
Keys are unique, sorted, and name the image everywhere (shards, results, tables).

Ground-truth maps (e.g. gaze fixation density maps) are found in ``gt_dir`` by the
image's relative path and stem (``gt_dir/crab/img_0001.png``), else by stem among the files directly in
``gt_dir`` (``gt_dir/img_0001.png``); a manifest's ``gt`` column takes precedence. PNG/JPEG
maps are read as grayscale and scaled to [0, 1] by their bit depth; ``.npy`` maps are used as
they are. A map with NaN or inf values, or one value everywhere, is a :class:`DataError`.

Every image and ground-truth file has a *stamp*, its fingerprint: ``size:mtime_ns`` by
default (taken from the directory entries of the discovery walk: one pass, one stat per
file, no file opened), or ``sha256:<hex>`` of its bytes with ``hash_inputs``;
``missing`` for a listed file that does not exist.

Images are scaled to [0, 1] by their bit depth: 8-bit modes by 255, 16-bit grayscale
(``I;16``, and ``I`` as PNG reads it) by 65535, then replicated to three channels.
They are resized as ``data.resize`` says: squashed to ``image_size``, or (``shorter_side_then_centre_crop``)
torchvision's ``Resize(resize_size)`` then ``CenterCrop(crop_size)``, and their ground-truth maps likewise.

An ImageFolder tree's classes are its sorted folder names, or ``data.class_names`` (the model's
classes in output order), where each folder is labelled by its name's index. ``subset.first_n``
keeps the first N images (in key order) of each class.
"""
from __future__ import annotations

import csv
import dataclasses
import os
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

from .config import DataConfig
from .digests import file_digest
from .errors import PipelineError

if TYPE_CHECKING:
    import numpy as np
    from PIL.Image import Image as PILImage
    from torch import Tensor

__all__ = [
    "ImageRecord",
    "ImageSet",
    "DataError",
    "discover_images",
    "file_stamp",
    "load_image",
    "load_gt",
    "load_data_image",
    "load_data_gt",
    "shorter_side_size",
    "centre_crop_offset",
    "load_batch",
    "load_images",
    "loader_workers",
    "IMAGE_EXTENSIONS",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm")
GT_EXTENSIONS = IMAGE_EXTENSIONS + (".npy",)


class DataError(PipelineError, ValueError):
    """The data description cannot be used; the message names the file or entry."""


@dataclasses.dataclass(frozen=True)
class ImageRecord:
    key: str
    path: Path
    label: int
    gt_path: Path | None = None
    #: the fingerprints of the image and of its ground-truth map (see the module docstring)
    stamp: str = dataclasses.field(default="", compare=False)
    gt_stamp: str | None = dataclasses.field(default=None, compare=False)


@dataclasses.dataclass(frozen=True)
class ImageSet:
    records: tuple[ImageRecord, ...]
    class_names: tuple[str, ...]
    #: how the stamps were taken: ``stat`` or ``sha256``
    fingerprint: str = "stat"

    def __len__(self) -> int:
        return len(self.records)


def _key(path: Path, base: Path) -> str:
    return path.relative_to(base).with_suffix("").as_posix()


def _stat_stamp(stat: os.stat_result) -> str:
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def file_stamp(path: Path, *, hash_inputs: bool = False) -> str:
    """The stamp of the file at ``path`` (see the module docstring)."""
    try:
        return f"sha256:{file_digest(path)}" if hash_inputs else _stat_stamp(os.stat(path))
    except FileNotFoundError:
        return "missing"


def _walk(root: Path, extensions: tuple[str, ...]) -> Iterator[tuple[str, str, str]]:
    """``(relative path without extension, absolute path, stamp)`` of every file under ``root`` whose
    extension is in ``extensions``, folder by folder in name order, from one pass over the tree
    (one stat per file, none opened; symbolic links to folders are not followed)."""
    prefix = len(str(root)) + 1
    pending = [str(root)]
    while pending:
        try:
            with os.scandir(pending.pop()) as scan:
                entries = sorted(scan, key=lambda entry: entry.name)
        except OSError:  # an unreadable folder is skipped, as os.walk does
            continue
        subfolders = []
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                subfolders.append(entry.path)
                continue
            stem, dot, extension = entry.name.rpartition(".")
            if dot and f".{extension.lower()}" in extensions:
                full = entry.path
                yield full[prefix : len(full) - len(extension) - 1].replace(os.sep, "/"), full, _stat_stamp(entry.stat())
        pending.extend(reversed(subfolders))


#: a file found by a walk and its stamp
_Stamped = tuple[Path, str]


def _index_gt(gt_dir: Path) -> tuple[dict[str, _Stamped], dict[str, _Stamped]]:
    """Ground-truth files (with stamps) by relative stem and by bare stem (files directly in ``gt_dir``)."""
    by_key: dict[str, _Stamped] = {}
    by_stem: dict[str, _Stamped] = {}
    if not gt_dir.is_dir():
        raise DataError(f"data.gt_dir: {gt_dir} is not a folder")
    for key, full, stamp in _walk(gt_dir, GT_EXTENSIONS):
        found = (Path(full), stamp)
        by_key.setdefault(key, found)
        if "/" not in key:
            by_stem.setdefault(key, found)
    return by_key, by_stem


#: an image found by discovery: key, path, label, its stamp (None: not stat'ed yet) and the
#: ground-truth map a manifest names
_Item = tuple[str, Path, int, "str | None", "Path | None"]


def _image_folder(root: Path, class_names: Sequence[str] | None) -> tuple[list[_Item], list[str]]:
    """``(key, path, label, stamp, None)`` of every image of an ImageFolder tree, and the class names:
    ``class_names`` (each folder's label is its name's index there) or the sorted folder names."""
    if not root.is_dir():
        raise DataError(f"data.root: {root} is not a folder")
    folders = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))
    if not folders:
        raise DataError(f"data.root: {root} has no class sub-folders (expected root/<class>/<image>)")
    names = list(class_names) if class_names else folders
    unknown = [folder for folder in folders if folder not in names]
    if unknown:
        raise DataError(f"data.class_names: the class folder(s) {', '.join(unknown)} of {root} are not among "
                        f"the class names {', '.join(names)}")
    items = [
        (f"{folder}/{key}", Path(full), names.index(folder), stamp, None)
        for folder in folders
        for key, full, stamp in _walk(root / folder, IMAGE_EXTENSIONS)
    ]
    return items, names


def _manifest(path: Path, class_names: Sequence[str] | None) -> tuple[list[tuple[Path, int, Path | None]], list[str]]:
    if not path.is_file():
        raise DataError(f"data.manifest: {path} does not exist")
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or not {"path", "label"} <= set(rows[0]):
        raise DataError(f"{path}: a manifest needs a header with columns path,label[,gt]")
    labels = [row["label"].strip() for row in rows]
    numeric = all(label.lstrip("-").isdigit() for label in labels)
    names = list(class_names) if class_names else (
        [str(i) for i in range(max(map(int, labels)) + 1)] if numeric else sorted(set(labels))
    )
    items = []
    for line, row in enumerate(rows, start=2):
        label = row["label"].strip()
        if numeric:
            index = int(label)
            if not 0 <= index < len(names):
                raise DataError(f"{path}:{line}: label {index} is outside 0..{len(names) - 1}")
        elif label in names:
            index = names.index(label)
        else:
            raise DataError(f"{path}:{line}: unknown class {label!r}; classes: {', '.join(names)}")
        gt = (row.get("gt") or "").strip()
        items.append((path.parent / row["path"].strip(), index, path.parent / gt if gt else None))
    return items, names


def _read_split(path: Path) -> set[str]:
    if not path.is_file():
        raise DataError(f"data.subset.split_file: {path} does not exist")
    lines = (line.strip() for line in path.read_text().splitlines())
    return {str(Path(line).with_suffix("").as_posix()) for line in lines if line and not line.startswith("#")}


def discover_images(config: DataConfig, *, hash_inputs: bool = False) -> ImageSet:
    """Every image the config describes, with labels, ground truth and stamps, sorted by key.

    Files are listed, not opened (``hash_inputs`` reads the chosen ones to hash them): an
    unreadable image fails later, in its shard.
    """
    if config.root is not None:
        base = config.root
        items, names = _image_folder(base, config.class_names)
    else:
        assert config.manifest is not None
        base = config.manifest.parent
        listed, names = _manifest(config.manifest, config.class_names)
        items = [
            (_key(path, base) if path.is_relative_to(base) else path.with_suffix("").as_posix(), path, label, None, gt)
            for path, label, gt in listed
        ]
    gt_by_key, gt_by_stem = _index_gt(config.gt_dir) if config.gt_dir else ({}, {})
    records = []
    for key, path, label, stamp, listed_gt in items:
        found = gt_by_key.get(key) or gt_by_stem.get(key.rpartition("/")[2])
        gt, gt_stamp = (listed_gt, None) if listed_gt else found or (None, None)
        records.append(ImageRecord(key, path, label, gt, stamp or "", gt_stamp))
    records.sort(key=lambda r: r.key)
    duplicates = sorted(k for k, n in Counter(r.key for r in records).items() if n > 1)
    if duplicates:
        raise DataError(f"image keys are not unique: {', '.join(duplicates[:5])}")
    subset = config.subset
    if subset.classes is not None:
        unknown = sorted(set(subset.classes) - set(names))
        if unknown:
            raise DataError(f"data.subset.classes: unknown class(es) {', '.join(unknown)}; classes: {', '.join(names)}")
        wanted = {names.index(c) for c in subset.classes}
        records = [r for r in records if r.label in wanted]
    if subset.split_file is not None:
        split = _read_split(subset.split_file)
        records = [r for r in records if r.key in split]
    if subset.first_n is not None:
        records = _first_per_class(records, subset.first_n)
    if not records:
        raise DataError(f"no images found for data at {base} (after the subset)")
    stamped = tuple(_stamped(r, hash_inputs) for r in records)
    return ImageSet(stamped, tuple(names), "sha256" if hash_inputs else "stat")


def _first_per_class(records: Sequence[ImageRecord], count: int) -> list[ImageRecord]:
    """The first ``count`` records of each label, in the order of ``records``."""
    seen: Counter[int] = Counter()
    kept = []
    for record in records:
        seen[record.label] += 1
        if seen[record.label] <= count:
            kept.append(record)
    return kept


def _stamped(record: ImageRecord, hash_inputs: bool) -> ImageRecord:
    """``record`` with the stamps the walk did not take (listed files, or every one when hashing)."""
    gt_missing = record.gt_path is not None and record.gt_stamp is None
    if record.stamp and not gt_missing and not hash_inputs:  # the walk stamped both files
        return record
    stamp = record.stamp if record.stamp and not hash_inputs else file_stamp(record.path, hash_inputs=hash_inputs)
    gt_stamp = record.gt_stamp
    if record.gt_path is not None and (gt_missing or hash_inputs):
        gt_stamp = file_stamp(record.gt_path, hash_inputs=hash_inputs)
    return dataclasses.replace(record, stamp=stamp, gt_stamp=gt_stamp)


#: Pillow modes of 16-bit grayscale images, read as integers up to 65535
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


def _sixteen_bit(image: "PILImage", path: Path) -> bool:
    """True for 16-bit grayscale; other integer or float modes are refused (their range is unknown)."""
    if image.mode in _SIXTEEN_BIT_MODES or (image.mode == "I" and image.format == "PNG"):
        return True
    if image.mode in ("I", "F"):
        raise DataError(f"cannot read image {path}: pixel format {image.mode} ({image.format}) has no known range")
    return False


def _unit_gray(image: "PILImage", path: Path) -> "np.ndarray":
    """A grayscale image as float32 in [0, 1], scaled by its bit depth."""
    import numpy as np

    if _sixteen_bit(image, path):
        return np.asarray(image, dtype=np.float32) / 65535.0
    return np.asarray(image.convert("L"), dtype=np.float32) / 255.0


def shorter_side_size(size: tuple[int, int], shorter: int) -> tuple[int, int]:
    """``(height, width)`` of an image of ``size`` whose shorter side is resized to ``shorter``, the aspect
    ratio kept and the longer side rounded down (torchvision's ``Resize(shorter)``)."""
    height, width = size
    if height <= width:
        return shorter, int(shorter * width / height)
    return int(shorter * height / width), shorter


def centre_crop_offset(size: tuple[int, int], crop: tuple[int, int]) -> tuple[int, int]:
    """``(top, left)`` of the centre ``crop`` of an image of ``size`` (torchvision's ``CenterCrop``,
    half-pixel offsets rounded half to even as Python's ``round``)."""
    return int(round((size[0] - crop[0]) / 2.0)), int(round((size[1] - crop[1]) / 2.0))


def _fit(image: "PILImage", size: tuple[int, int], resize_size: int | None) -> "PILImage":
    """``image`` squashed to ``size`` (height, width) when ``resize_size`` is None, else resized to a shorter
    side of ``resize_size`` and centre-cropped to ``size``; bilinear, as Pillow resizes (antialiased)."""
    from PIL import Image

    if resize_size is None:
        return image.resize((size[1], size[0]), Image.BILINEAR)
    height, width = shorter_side_size((image.height, image.width), resize_size)
    top, left = centre_crop_offset((height, width), size)
    return image.resize((width, height), Image.BILINEAR).crop((left, top, left + size[1], top + size[0]))


def load_image(
    path: Path, size: tuple[int, int], mean: Sequence[float], std: Sequence[float], *, resize_size: int | None = None
) -> Tensor:
    """A normalized float tensor ``[3, *size]``: the image squashed to ``size``, or with ``resize_size``
    its shorter side resized to that and the centre cropped (``data.resize``); raises
    :class:`DataError` naming the file."""
    import numpy as np
    import torch
    from PIL import Image

    try:
        with Image.open(path) as image:
            if _sixteen_bit(image, path):
                gray = _fit(Image.fromarray(_unit_gray(image, path), mode="F"), size, resize_size)
                array = np.repeat(np.asarray(gray, dtype=np.float32)[..., None], 3, axis=2)
            else:
                rgb = _fit(image.convert("RGB"), size, resize_size)
                array = np.asarray(rgb, dtype=np.float32) / 255.0
    except (OSError, ValueError) as error:
        raise DataError(f"cannot read image {path}: {error}") from None
    tensor = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)
    return (tensor - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def load_gt(path: Path, size: tuple[int, int], *, resize_size: int | None = None) -> Tensor:
    """A ground-truth map ``[*size]`` (float32) resized bilinearly (not antialiased) as its image is:
    squashed to ``size``, or with ``resize_size`` to that shorter side and centre-cropped to ``size``;
    raises :class:`DataError` naming the file when it cannot be read, is not 2-D, has NaN or inf
    values or is constant."""
    import numpy as np
    import torch
    from PIL import Image
    from torch.nn import functional as F

    try:
        if path.suffix.lower() == ".npy":
            array = np.load(path).astype(np.float32)
        else:
            with Image.open(path) as image:
                array = _unit_gray(image, path)
    except (OSError, ValueError) as error:
        raise DataError(f"cannot read ground-truth map {path}: {error}") from None
    if array.ndim != 2:
        raise DataError(f"ground-truth map {path} must be 2-D, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise DataError(f"ground-truth map {path} has NaN or inf values")
    if array.min() == array.max():
        raise DataError(f"ground-truth map {path} is constant ({array.flat[0]:g} everywhere): it marks no region")
    tensor = torch.from_numpy(array)[None, None]
    if resize_size is None:
        return F.interpolate(tensor, size=size, mode="bilinear", align_corners=False)[0, 0]
    resized = shorter_side_size((array.shape[0], array.shape[1]), resize_size)
    if resized != array.shape:
        tensor = F.interpolate(tensor, size=resized, mode="bilinear", align_corners=False)
    top, left = centre_crop_offset(resized, size)
    return tensor[0, 0, top : top + size[0], left : left + size[1]].contiguous()


def load_data_image(path: Path, config: DataConfig) -> Tensor:
    """:func:`load_image` with the size, resizing and normalization of ``config``."""
    return load_image(path, config.image_size, config.mean, config.std, resize_size=config.resize_size)


def load_data_gt(path: Path, config: DataConfig) -> Tensor:
    """:func:`load_gt` with the size and resizing of ``config``."""
    return load_gt(path, config.image_size, resize_size=config.resize_size)


def load_batch(
    records: Sequence[ImageRecord], config: DataConfig
) -> tuple[list[ImageRecord], Tensor, dict[str, str]]:
    """The images that load, stacked ``[n, 3, H, W]``, and an error message for each that does not."""
    import torch

    loaded, tensors, failures = [], [], {}
    for record in records:
        try:
            tensors.append(load_data_image(record.path, config))
            loaded.append(record)
        except DataError as error:
            failures[record.key] = str(error)
    height, width = config.image_size
    stacked = torch.stack(tensors) if tensors else torch.empty(0, 3, height, width)
    return loaded, stacked, failures


class _RecordImages:
    """A map-style dataset of ``records``: item ``i`` is ``(i, image or None, error or None)``."""

    def __init__(self, records: Sequence[ImageRecord], config: DataConfig) -> None:
        self.records, self.config = list(records), config

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[int, "Tensor | None", str | None]:
        record = self.records[index]
        try:
            return index, load_data_image(record.path, self.config), None
        except DataError as error:
            return index, None, str(error)


def _as_list(items: list[tuple[int, "Tensor | None", str | None]]) -> list[tuple[int, "Tensor | None", str | None]]:
    return items


def loader_workers(setting: int | str) -> int:
    """Decoding processes for ``setting``: a number, or ``"auto"``: the CPUs of the Slurm task but one
    (``SLURM_CPUS_PER_TASK``), else ``min(4, CPUs)``."""
    if setting != "auto":
        return int(setting)
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit():
        return max(0, int(slurm) - 1)
    return min(4, os.cpu_count() or 1)


def load_images(
    records: Sequence[ImageRecord], config: DataConfig, *, workers: int = 0
) -> tuple[list[ImageRecord], Tensor, dict[str, str]]:
    """As :func:`load_batch`, decoding and resizing in ``workers`` processes of a
    :class:`torch.utils.data.DataLoader` (0: in this process). The result, in record order,
    does not depend on ``workers``."""
    import torch
    from torch.utils.data import DataLoader

    workers = min(workers, len(records))
    if workers == 0:
        return load_batch(records, config)
    per_batch = -(-len(records) // (2 * workers))  # two batches per worker: decoding overlaps collecting
    loader = DataLoader(
        _RecordImages(records, config), batch_size=per_batch, num_workers=workers, collate_fn=_as_list
    )
    loaded, tensors, failures = [], [], {}
    for batch in loader:
        for index, image, error in batch:
            if image is None:
                failures[records[index].key] = str(error)
            else:
                loaded.append(records[index])
                tensors.append(image)
    height, width = config.image_size
    stacked = torch.stack(tensors) if tensors else torch.empty(0, 3, height, width)
    return loaded, stacked, failures
