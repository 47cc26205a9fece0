"""The model-parameter randomization test (Adebayo et al., 2018, "Sanity Checks for Saliency
Maps", section 3.1, cascading randomization).

The model's blocks are re-initialized from the top, one more per step and cumulatively, on a
deep copy of the model; after each step the method explains the same images and targets again
and the step's value is the Spearman rank correlation between the original map and the
randomized one. A method whose maps stay the same when the model's weights are destroyed
(correlation near 1) does not explain the model. The metric's value is the correlation after
the last step (the top ``steps`` blocks randomized); every step's correlation is kept as a curve.

Blocks are the model's top-level children that hold parameters, in the order the model
registers them (a ResNet: ``conv1, bn1, layer1, ..., layer4, fc``), or the module names given
in ``blocks``, bottom to top. A block is re-initialized by the ``reset_parameters()`` of each
of its modules that has one (PyTorch's default initialization); a parameter no such module
covers (a ViT's class token or position embedding) is drawn from a normal with the
parameter's own mean and standard deviation.
"""
from __future__ import annotations

import copy
from typing import Annotated, Callable, Sequence

import torch
from torch import Tensor, nn

from ..methods.layers import resolve_module
from ..parameters import Param, validated

__all__ = [
    "randomization",
    "model_blocks",
    "reinitialize",
    "average_ranks",
    "spearman",
    "check_randomization_parameters",
    "check_randomization_blocks",
    "randomization_explanations",
    "MethodMaps",
]

#: the scored method: ``method(model, images, targets)`` -> maps ``[n, H, W]`` of ``model``
MethodMaps = Callable[[nn.Module, Tensor, Tensor], Tensor]


def model_blocks(model: nn.Module, names: Sequence[str] | None = None) -> list[tuple[str, nn.Module]]:
    """The blocks of ``model``, bottom to top: the modules ``names`` (dotted names), or by default its
    top-level children that hold parameters, in registration order."""
    if names is not None:
        try:
            return [(name, resolve_module(model, name)) for name in names]
        except ValueError as error:
            raise ValueError(f"randomization: blocks: {error}") from None
    blocks = [(name, child) for name, child in model.named_children() if any(True for _ in child.parameters())]
    if not blocks:
        raise ValueError(f"randomization: {type(model).__name__} has no top-level child with parameters; "
                         "name the blocks in `blocks`")
    return blocks


def reinitialize(block: nn.Module, seed: int) -> None:
    """Re-initialize every parameter (and BatchNorm statistics) of ``block`` in place, seeded by
    ``seed`` (the global RNG of the block's device is left as it was)."""
    cuda = sorted({p.device.index or 0 for p in block.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda), torch.no_grad():
        torch.manual_seed(seed)
        covered: set[int] = set()
        for module in block.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
                covered.update(id(p) for p in module.parameters(recurse=False))
        for parameter in block.parameters():
            if id(parameter) not in covered:
                std = parameter.std().item() if parameter.numel() > 1 else 1.0
                parameter.normal_(parameter.mean().item(), std)


def average_ranks(values: Tensor) -> Tensor:
    """Ranks 1..m of each row of ``values`` ``[n, m]`` (float64), ties given their average rank
    (as :func:`scipy.stats.rankdata`)."""
    n, m = values.shape
    order = values.argsort(dim=1, stable=True)
    ordered = values.gather(1, order)
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    group = starts.long().cumsum(dim=1) - 1
    positions = torch.arange(1, m + 1, dtype=torch.float64, device=values.device).expand(n, m)
    totals = torch.zeros(n, m, dtype=torch.float64, device=values.device).scatter_add_(1, group, positions)
    counts = torch.zeros(n, m, dtype=torch.float64, device=values.device).scatter_add_(
        1, group, torch.ones_like(positions))
    averaged = (totals / counts.clamp_min(1.0)).gather(1, group)
    return torch.empty_like(averaged).scatter_(1, order, averaged)


def spearman(first: Tensor, second: Tensor) -> Tensor:
    """Spearman rank correlation of each pair of maps ``[n, H, W]`` (float64 ``[n]``): the Pearson
    correlation of their average ranks, as :func:`scipy.stats.spearmanr`. A constant map shares no
    ordering with the other: 0; a map with NaN or inf values: NaN."""
    a, b = first.flatten(1).double(), second.flatten(1).double()
    finite = torch.isfinite(a).all(dim=1) & torch.isfinite(b).all(dim=1)
    ranks_a = average_ranks(torch.where(finite[:, None], a, 0.0))
    ranks_b = average_ranks(torch.where(finite[:, None], b, 0.0))
    centred_a = ranks_a - ranks_a.mean(dim=1, keepdim=True)
    centred_b = ranks_b - ranks_b.mean(dim=1, keepdim=True)
    spread = (centred_a.square().sum(dim=1) * centred_b.square().sum(dim=1)).sqrt()
    correlation = (centred_a * centred_b).sum(dim=1) / spread.clamp_min(1e-300)
    correlation = torch.where(spread > 0, correlation.clamp(-1.0, 1.0), 0.0)
    return torch.where(finite, correlation, torch.nan)


def check_randomization_parameters(size: tuple[int, int], *, blocks: Sequence[str] | None, steps: int | None) -> None:
    """Raise ``ValueError`` naming ``steps`` when it exceeds the ``blocks`` given."""
    if steps is not None and blocks is not None and steps > len(blocks):
        raise ValueError(f"steps ({steps}) exceeds the {len(blocks)} blocks given")


def check_randomization_blocks(model: nn.Module, *, blocks: Sequence[str] | None, steps: int | None,
                               **_: object) -> None:
    """Raise ``ValueError`` when ``blocks`` names no module of ``model`` or ``steps`` exceeds its blocks."""
    names = [name for name, _ in model_blocks(model, blocks)]
    if steps is not None and steps > len(names):
        raise ValueError(f"steps ({steps}) exceeds the model's {len(names)} blocks ({', '.join(names)})")


Blocks = Annotated[Sequence[Annotated[str, Param("a module name", min_length=1)]] | None, Param(
    "the blocks re-initialized from the last to the first, as module names (None: the model's top-level "
    "children with parameters)", min_length=1)]
Steps = Annotated[int | None, Param("blocks re-initialized, from the top (None: every block)", unit="blocks", ge=1)]
Seed = Annotated[int, Param("seed of the re-initialization (step k uses seed + k - 1)", ge=0, lt=2**63)]


def randomization_explanations(model: nn.Module, *, blocks: Sequence[str] | None, steps: int | None,
                               **_: object) -> int:
    """The explanations of each image the test makes: one per cascade step."""
    return steps or len(model_blocks(model, blocks))


@validated
def randomization(
    model: nn.Module,
    images: Tensor,
    maps: Tensor,
    targets: Tensor,
    method: MethodMaps,
    *,
    blocks: Blocks = None,
    steps: Steps = None,
    seed: Seed = 0,
) -> tuple[Tensor, Tensor]:
    """The cascading randomization test of ``maps`` ``[n, H, W]``, the maps ``method`` gives ``model``.

    Step ``k`` (1..``steps``; default every block) re-initializes the ``k``-th block from the top
    with seed ``seed + k - 1`` on a deep copy of ``model`` (the blocks above it stay randomized)
    and explains ``images`` for ``targets`` with ``method`` again. Returns the per-image value,
    the Spearman correlation after the last step (the top ``steps`` blocks randomized), and the
    per-image correlations of every step ``[n, steps]``. The model itself is not changed.
    """
    check_randomization_blocks(model, blocks=blocks, steps=steps, seed=seed)
    randomized = copy.deepcopy(model)
    cascade = model_blocks(randomized, blocks)[::-1]
    correlations = []
    for step, (_, block) in enumerate(cascade[: steps or len(cascade)]):
        reinitialize(block, seed + step)
        changed = method(randomized, images, targets)
        with torch.no_grad():
            correlations.append(spearman(maps, changed.detach()))
    curve = torch.stack(correlations, dim=1)
    return curve[:, -1], curve
