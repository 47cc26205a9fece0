"""The randomization test against an independent computation (deep copy, reset_parameters, SciPy's
Spearman correlation), and its sanity: Grad-CAM depends on the weights, the centre baseline does not."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from scipy import stats
from torch import Tensor, nn

from pipeline.demo_model import ShapesNet
from pipeline.methods import build_method
from pipeline.metrics import METRICS, randomization, spearman
from pipeline.metrics.randomization import average_ranks, check_randomization_parameters, model_blocks, reinitialize


def _gradcam(model: nn.Module, images: Tensor, targets: Tensor) -> Tensor:
    return build_method("gradcam", model, layer="layer3").explain(images, targets)


def _centre(model: nn.Module, images: Tensor, targets: Tensor) -> Tensor:
    return build_method("centre", model).explain(images, targets)


@pytest.fixture(scope="module")
def model() -> ShapesNet:
    torch.manual_seed(1)  # its Grad-CAM maps of the batch below are not constant
    return ShapesNet(num_classes=3, width=4).eval()


@pytest.fixture(scope="module")
def batch() -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(4, 3, 32, 32, generator=generator), torch.tensor([0, 1, 2, 1])


def test_average_ranks_and_spearman_equal_scipy_with_ties() -> None:
    rng = np.random.default_rng(0)
    first = rng.integers(0, 5, size=(6, 7, 9)).astype(np.float32)  # many ties
    second = rng.random((6, 7, 9)).astype(np.float32)
    second[0] = first[0] * 2 + 1  # a monotone copy
    np.testing.assert_array_equal(average_ranks(torch.from_numpy(first).flatten(1)).numpy(),
                                  stats.rankdata(first.reshape(6, -1), axis=1))
    got = spearman(torch.from_numpy(first), torch.from_numpy(second)).numpy()
    expected = [stats.spearmanr(a.ravel(), b.ravel()).statistic for a, b in zip(first, second)]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    assert got[0] == pytest.approx(1.0)


def test_spearman_of_a_constant_map_is_zero_and_of_a_nan_map_nan() -> None:
    maps = torch.rand(3, 5, 5, generator=torch.Generator().manual_seed(0))
    other = maps.clone()
    other[1] = 0.5
    other[2, 1, 1] = torch.nan
    got = spearman(maps, other)
    assert got[0] == pytest.approx(1.0) and got[1] == 0.0 and torch.isnan(got[2])


def test_default_blocks_are_the_top_level_children_with_parameters(model: ShapesNet) -> None:
    assert [name for name, _ in model_blocks(model)] == ["stem", "layer1", "layer2", "layer3", "fc"]
    assert [block for _, block in model_blocks(model, ["layer3.0", "fc"])] == [model.layer3[0], model.fc]
    with pytest.raises(ValueError, match="randomization: blocks: unknown layer 'nothing'"):
        model_blocks(model, ["nothing"])


def test_values_equal_an_independent_cascade(model: ShapesNet, batch: tuple[Tensor, Tensor]) -> None:
    images, targets = batch
    maps = _gradcam(model, images, targets)
    before = copy.deepcopy(model.state_dict())
    values, curves = randomization(model, images, maps, targets, _gradcam, steps=3, seed=7)
    expected = np.zeros((len(images), 3))
    for step in range(3):
        randomized = copy.deepcopy(model)
        for index, name in enumerate(["fc", "layer3", "layer2"][: step + 1]):
            torch.manual_seed(7 + index)
            for module in getattr(randomized, name).modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
        changed = _gradcam(randomized, images, targets)
        for row in range(len(images)):
            expected[row, step] = stats.spearmanr(maps[row].ravel(), changed[row].ravel()).statistic
    np.testing.assert_allclose(curves.numpy(), expected, rtol=0, atol=1e-9)
    np.testing.assert_array_equal(values.numpy(), curves[:, -1].numpy())
    for name, tensor in model.state_dict().items():  # the scored model keeps its weights
        torch.testing.assert_close(tensor, before[name], rtol=0, atol=0)


def test_gradcam_changes_when_the_last_block_is_randomized(model: ShapesNet, batch: tuple[Tensor, Tensor]) -> None:
    images, targets = batch
    maps = _gradcam(model, images, targets)
    values, curves = randomization(model, images, maps, targets, _gradcam)
    assert curves.shape == (len(images), 5)
    assert (values < 0.8).all(), values
    first_step, _ = randomization(model, images, maps, targets, _gradcam, steps=1)
    assert (first_step < 0.9).all() and first_step.mean() < 0.7, first_step


def test_the_centre_baseline_ignores_the_model(model: ShapesNet, batch: tuple[Tensor, Tensor]) -> None:
    images, targets = batch
    maps = _centre(model, images, targets)
    _, curves = randomization(model, images, maps, targets, _centre)
    np.testing.assert_allclose(curves.numpy(), 1.0, rtol=0, atol=1e-12)


def test_parameters_without_reset_are_redrawn_with_their_own_scale() -> None:
    block = nn.Module()
    block.token = nn.Parameter(torch.full((1000,), 3.0) + torch.linspace(-1, 1, 1000))
    block.linear = nn.Linear(4, 4)
    kept = block.token.detach().clone()
    reinitialize(block, seed=0)
    assert not torch.equal(block.token, kept)
    assert block.token.mean().item() == pytest.approx(3.0, abs=0.1)
    assert block.token.std().item() == pytest.approx(kept.std().item(), rel=0.15)
    again = copy.deepcopy(block)
    reinitialize(block, seed=0)
    reinitialize(again, seed=0)
    torch.testing.assert_close(block.linear.weight, again.linear.weight, rtol=0, atol=0)


def test_too_many_steps_name_the_blocks(model: ShapesNet, batch: tuple[Tensor, Tensor]) -> None:
    images, targets = batch
    maps = _centre(model, images, targets)
    with pytest.raises(ValueError, match="steps \\(6\\) exceeds .* 5 blocks \\(stem, layer1"):
        randomization(model, images, maps, targets, _centre, steps=6)


@pytest.mark.parametrize(("params", "message"), [
    ({"blocks": "fc"}, "blocks 'str' instances are not allowed as a Sequence value, got 'fc'"),
    ({"blocks": []}, "blocks value should have at least 1 item after validation, not 0, got \\[\\]"),
    ({"blocks": [""]}, "blocks\\[0\\] string should have at least 1 character, got ''"),
    ({"steps": 0}, "steps should be greater than or equal to 1, got 0"),
    ({"blocks": ["fc"], "steps": 2}, "steps \\(2\\) exceeds the 1 blocks"),
    ({"seed": -1}, "seed should be greater than or equal to 0, got -1"),
])
def test_parameter_checks_name_the_parameter(params: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        METRICS["randomization"].check_values(params, (32, 32))
    check_randomization_parameters((32, 32), blocks=None, steps=None)
