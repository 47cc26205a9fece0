"""A tiny CNN for the shapes dataset, its CPU training loop and a checkpoint cache.

:class:`ShapesNet` is a small ResNet-like classifier whose stages are called ``layer1``,
``layer2`` and ``layer3`` (CAM methods target them as they target ResNet's stages),
followed by global average pooling and a linear head ``fc``.
:func:`train_shapes_net` trains it on an ImageFolder tree written by
:func:`pipeline.demo_data.make_shapes_dataset`, and :func:`ensure_shapes_checkpoint`
makes dataset and checkpoint once per parameter set and reuses them afterwards.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from .demo_data import Scene

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ShapesNet",
    "train_shapes_net",
    "load_shapes_net",
    "ensure_shapes_checkpoint",
    "one_torch_thread",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: bump when the generator or the training changes, so cached checkpoints are remade
_CACHE_VERSION = 3


class _ResidualBlock(nn.Module):
    """Two 3x3 conv-bn layers with a shortcut (1x1 conv-bn when the shape changes), then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ShapesNet(nn.Module):
    """Stem (stride 2), three residual stages (``layer2``/``layer3`` stride 2), GAP, ``fc``.

    With ``width=8`` it has about 20k parameters; a 64x64 input gives 8x8 maps at ``layer3``.
    """

    def __init__(self, num_classes: int = 4, width: int = 8) -> None:
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        if not isinstance(width, int) or width < 1:
            raise ValueError(f"width must be a positive int, got {width!r}")
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        )
        self.layer1 = nn.Sequential(_ResidualBlock(width, width, stride=1))
        self.layer2 = nn.Sequential(_ResidualBlock(width, 2 * width, stride=2))
        self.layer3 = nn.Sequential(_ResidualBlock(2 * width, 4 * width, stride=2))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _load_split(data_root: Path, image_size: int, mean: Sequence[float],
                std: Sequence[float]) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    """Normalized train/val images and labels from ``data_root/images``, plus the class count."""
    from torchvision import datasets, transforms  # only for training: the model itself needs none

    from .demo_data import is_validation_index

    folder = datasets.ImageFolder(
        str(Path(data_root) / "images"),
        transform=transforms.Compose([
            transforms.Resize((image_size, image_size)),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]),
    )
    if len(folder.classes) < 2:
        raise ValueError(f"data_root {data_root} needs images of at least 2 classes, found {folder.classes}")
    images, labels, held_out = [], [], []
    position_in_class = [0] * len(folder.classes)
    for index in range(len(folder)):
        image, label = folder[index]
        images.append(image)
        labels.append(label)
        held_out.append(is_validation_index(position_in_class[label]))
        position_in_class[label] += 1
    inputs, targets = torch.stack(images), torch.tensor(labels)
    val = torch.tensor(held_out)
    if val.all() or not val.any():
        raise ValueError(f"data_root {data_root} has too few images per class for a validation split")
    return inputs[~val], targets[~val], inputs[val], targets[val], len(folder.classes)


def _augment(batch: Tensor, generator: torch.Generator, pixel_dropout: float = 0.0) -> Tensor:
    """Random element of the square's symmetry group per image (flips and transposes); with
    ``pixel_dropout``, a fraction drawn uniformly from [0, ``pixel_dropout``) of each image's
    pixels set to 0 (the mean colour once normalized)."""
    flips = torch.rand(3, batch.shape[0], 1, 1, 1, generator=generator) < 0.5
    batch = torch.where(flips[0], batch.flip(-1), batch)
    batch = torch.where(flips[1], batch.flip(-2), batch)
    batch = torch.where(flips[2], batch.transpose(-1, -2), batch)
    if pixel_dropout > 0:
        fraction = torch.rand(batch.shape[0], 1, 1, 1, generator=generator) * pixel_dropout
        dropped = torch.rand(batch.shape[0], 1, *batch.shape[-2:], generator=generator) < fraction
        batch = batch.masked_fill(dropped, 0.0)
    return batch


def _accuracy(model: nn.Module, inputs: Tensor, targets: Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` (in its current mode) on a dataset held in memory."""
    correct = torch.zeros((), dtype=torch.long)
    with torch.no_grad():
        for start in range(0, len(inputs), batch_size):
            logits = model(inputs[start:start + batch_size])
            correct += (logits.argmax(1) == targets[start:start + batch_size]).sum()
    return correct.item() / len(inputs)


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run torch on one intra-op thread inside, restoring the thread count after.

    The model is too small to gain from more threads, and on a busy machine two
    threads that wait for each other make training many times slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _save_atomically(state: dict[str, Tensor], checkpoint: Path) -> None:
    """``torch.save`` to a temporary file beside ``checkpoint``, then rename it into place."""
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=checkpoint.parent, prefix=checkpoint.name, suffix=".tmp")
    os.close(handle)
    try:
        torch.save(state, temporary)
        os.replace(temporary, checkpoint)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def train_shapes_net(
    data_root: Path,
    checkpoint: Path,
    *,
    epochs: int = 20,
    seed: int = 0,
    image_size: int = 64,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    width: int = 8,
    lr: float = 0.01,
    batch_size: int = 64,
    pixel_dropout: float = 0.0,
) -> dict[str, float]:
    """Train :class:`ShapesNet` on CPU on ``data_root/images`` and save its ``state_dict``.

    Images are resized to ``image_size`` and normalized with ``mean``/``std``; the
    training batches get random flips and transposes, and with ``pixel_dropout`` (in
    [0, 1)) up to that fraction of their pixels set to the mean colour, so that scattered
    missing pixels (as a Deletion curve with a random order makes them) are not taken for
    evidence of a class. Every fifth image of each class
    (:func:`pipeline.demo_data.is_validation_index`) is held out for validation.
    AdamW with a one-cycle learning-rate schedule peaking at ``lr``, on one torch
    thread. The global torch RNG and thread count are left as they were. Returns
    ``train_accuracy`` and ``val_accuracy`` (eval mode, without augmentation),
    ``epochs`` and ``seconds``.
    """
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    if not isinstance(batch_size, int) or batch_size < 2:
        raise ValueError(f"batch_size must be an int >= 2, got {batch_size!r}")
    if not 0 <= pixel_dropout < 1:
        raise ValueError(f"pixel_dropout must be in [0, 1), got {pixel_dropout!r}")
    started = time.perf_counter()
    train_x, train_y, val_x, val_y, num_classes = _load_split(Path(data_root), image_size, mean, std)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ShapesNet(num_classes=num_classes, width=width)
    steps_per_epoch = -(-len(train_x) // batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, epochs=epochs, steps_per_epoch=steps_per_epoch)
    with one_torch_thread():
        model.train()
        for _ in range(epochs):
            order = torch.randperm(len(train_x), generator=generator)
            for start in range(0, len(order), batch_size):
                batch = order[start:start + batch_size]
                loss = F.cross_entropy(model(_augment(train_x[batch], generator, pixel_dropout)), train_y[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
    model.eval()
    result = {
        "train_accuracy": _accuracy(model, train_x, train_y),
        "val_accuracy": _accuracy(model, val_x, val_y),
        "epochs": epochs,
    }
    _save_atomically(model.state_dict(), Path(checkpoint))
    result["seconds"] = time.perf_counter() - started
    return result


def load_shapes_net(checkpoint: Path, *, num_classes: int = 4, width: int = 8) -> ShapesNet:
    """A :class:`ShapesNet` with the weights of ``checkpoint``, in eval mode."""
    model = ShapesNet(num_classes=num_classes, width=width)
    model.load_state_dict(torch.load(Path(checkpoint), map_location="cpu", weights_only=True))
    return model.eval()


def _short_hash(parameters: dict[str, object]) -> str:
    text = json.dumps(parameters, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def ensure_shapes_checkpoint(
    cache_dir: Path,
    *,
    n_per_class: int = 400,
    image_size: int = 64,
    classes: Sequence[str] | None = None,
    data_seed: int = 0,
    epochs: int = 20,
    train_seed: int = 0,
    width: int = 8,
    lr: float = 0.01,
    batch_size: int = 64,
    scene: Scene = "single",
    pixel_dropout: float = 0.0,
) -> Path:
    """The checkpoint of a :class:`ShapesNet` trained with these parameters (``classes``: the demo's
    shapes by default; ``scene``: see
    :func:`~pipeline.demo_data.make_shapes_dataset`; ``pixel_dropout``: see
    :func:`train_shapes_net`), made when missing.

    The dataset goes to ``cache_dir/shapes-data-<hash>`` and the weights to
    ``cache_dir/shapes-net-<hash>.pt``, each hash a short digest of the parameters it
    depends on; both are written under temporary names and renamed into place, so a
    present file is always complete. Training uses ImageNet mean/std normalization.
    """
    from .demo_data import SHAPE_CLASSES, make_shapes_dataset  # drawing needs scikit-image; the model does not

    cache_dir = Path(cache_dir)
    classes = SHAPE_CLASSES if classes is None else classes
    data_parameters = {
        "version": _CACHE_VERSION, "n_per_class": n_per_class, "image_size": image_size,
        "classes": list(classes), "seed": data_seed,
    }
    if scene != "single":  # left out when default, so checkpoints made before scenes keep their hash
        data_parameters["scene"] = scene
    train_parameters = {
        "data": data_parameters, "epochs": epochs, "seed": train_seed, "width": width,
        "lr": lr, "batch_size": batch_size, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
    }
    if pixel_dropout:  # left out when 0, so checkpoints made before it keep their hash
        train_parameters["pixel_dropout"] = pixel_dropout
    checkpoint = cache_dir / f"shapes-net-{_short_hash(train_parameters)}.pt"
    if checkpoint.is_file():
        return checkpoint
    data_root = cache_dir / f"shapes-data-{_short_hash(data_parameters)}"
    if not (data_root / "manifest.csv").is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f"{data_root.name}.tmp"))
        make_shapes_dataset(staging, n_per_class=n_per_class, image_size=image_size,
                            classes=classes, seed=data_seed, scene=scene)
        try:
            staging.rename(data_root)
        except OSError:
            shutil.rmtree(staging)
            if not (data_root / "manifest.csv").is_file():
                raise
    train_shapes_net(data_root, checkpoint, epochs=epochs, seed=train_seed, image_size=image_size,
                     width=width, lr=lr, batch_size=batch_size, pixel_dropout=pixel_dropout)
    return checkpoint
