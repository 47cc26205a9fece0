"""Tests of extremal perturbations: localisation on a model with a known region, model
hygiene, batching, the building blocks against plain computations, and validation."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.ndimage
import torch
from torch import nn

from pipeline.methods import build_method
from pipeline.methods.extremal import (
    AREA_MODES,
    SMOOTH_MAX_COLDNESS,
    ExtremalPerturbation,
    SmoothMaskGenerator,
    area_profile,
    area_ranking_loss,
    blur_pyramid,
    perturb,
)
from tests.methods.helpers import recorded_batch_sizes, seeded_batch

SIZE = 64
PATCH = (slice(10, 30), slice(34, 54))
FAST = dict(step=4, sigma=8.0, iterations=4)


@pytest.fixture(autouse=True)
def single_thread():
    """Run on one thread: the optimisation is many small ops, and two OpenMP threads
    on a busy two-core machine make it several times slower, not faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def checkerboard(size: int) -> torch.Tensor:
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return ((rows + cols) % 2 * 2 - 1).float()


class PatchModel(nn.Module):
    """Class 1's logit is ``gain`` times the correlation of channel 0 with a checkerboard
    over ``PATCH``: only that region matters, and blurring it lowers the logit."""

    def __init__(self, gain: float = 10.0) -> None:
        super().__init__()
        template = torch.zeros(SIZE, SIZE)
        template[PATCH] = checkerboard(SIZE)[PATCH]
        self.template = nn.Parameter(template / template.abs().sum())
        self.gain = gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = self.gain * (x[:, 0] * self.template).sum(dim=(1, 2))
        return torch.stack([torch.zeros_like(score), score], dim=1)


def patch_image() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    image = 0.5 * torch.randn(1, 3, SIZE, SIZE, generator=generator)
    image[0, 0][PATCH] = checkerboard(SIZE)[PATCH]
    return image


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)
    )


def small_batch() -> tuple[torch.Tensor, torch.Tensor]:
    return seeded_batch(1, [0, 2])


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a & b).sum()) / float((a | b).sum())


def test_masks_find_the_patch_at_their_area() -> None:
    region = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    region[PATCH] = True
    area = float(region.float().mean())
    explainer = ExtremalPerturbation(
        PatchModel(),
        areas=(area / 2, area, 2 * area),
        step=4,
        sigma=8.0,
        iterations=100,
        area_growth=1.03,
        jitter=False,
    )
    masks = explainer.explain_masks(patch_image(), torch.tensor([1]))[0]
    assert masks.shape == (3, SIZE, SIZE)
    small, matching, large = (mask > 0.5 for mask in masks)
    assert iou(matching, region) >= 0.5
    top = torch.zeros(SIZE * SIZE, dtype=torch.bool)
    top[masks[1].flatten().topk(int(region.sum())).indices] = True
    assert iou(top.view(SIZE, SIZE), region) >= 0.5
    assert float((small & region).sum()) >= 0.9 * float(small.sum())
    assert float((large & region).sum()) >= 0.9 * float(region.sum())
    assert int(small.sum()) < int(matching.sum()) < int(large.sum())


def reference_area_constraint_saliency(
    model: nn.Module, image: torch.Tensor, target: int, area: float, iterations: int, growth: float
) -> torch.Tensor:
    """A plain loop with the reference's (TorchRay's) area constraint: the mask canvas reaches
    ``sigma`` pixels beyond the image, its sorted values are compared with a reference vector
    whose first ``int(canvas_pixels * (1 - area))`` entries are 0, weight ``300 * growth**t``;
    SGD (lr 0.01, momentum 0.9, dampening 0.9) on the parameters, clamped to [0, 1]."""
    step, sigma = FAST["step"], FAST["sigma"]
    generator = SmoothMaskGenerator(SIZE, SIZE, step, sigma, margin=round(sigma))
    pyramid = blur_pyramid(image, 8, 20.0)
    params = torch.ones(1, *generator.grid_shape, requires_grad=True)
    optimizer = torch.optim.SGD([params], lr=0.01, momentum=0.9, dampening=0.9)
    canvas_pixels = (SIZE + 2 * round(sigma)) ** 2
    reference = torch.ones(1, canvas_pixels)
    reference[0, : int(canvas_pixels * (1 - area))] = 0
    weight = 300.0
    for t in range(iterations):
        canvas = generator(params)
        perturbed = perturb(pyramid, generator.crop(canvas).unsqueeze(0))[0]
        if t % 2 == 0:
            perturbed = perturbed.flip(-1)
        reward = model(perturbed)[0, target]
        regul = ((canvas.reshape(1, -1).sort(dim=1).values - reference) ** 2).mean() * weight
        optimizer.zero_grad()
        (regul - reward).backward()
        optimizer.step()
        with torch.no_grad():
            params.clamp_(0, 1)
        weight *= growth
    with torch.no_grad():
        return generator.crop(generator(params))[0]


def test_default_concentrates_on_the_evidence_as_the_reference_does() -> None:
    region = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    region[PATCH] = True
    area, iterations, growth = float(region.float().mean()), 40, 1.05

    def concentration(saliency: torch.Tensor) -> float:
        return float(saliency[region].mean() / saliency[~region].mean())

    model, image = PatchModel(), patch_image()
    options = {**FAST, "iterations": iterations}
    explainer = ExtremalPerturbation(model, areas=(area,), smooth=0.0, area_growth=growth, **options)
    default = concentration(explainer.explain(image, torch.tensor([1]))[0])
    reference = concentration(reference_area_constraint_saliency(model, image, 1, area, iterations, growth))
    assert reference > 2  # the evidence is found at all
    assert default >= 0.98 * reference


@pytest.mark.parametrize("area_mode", AREA_MODES)
def test_output_shape_dtype_range_and_determinism(area_mode: str) -> None:
    images, targets = small_batch()
    explainer = ExtremalPerturbation(tiny_net(), area_mode=area_mode, **FAST)
    first = explainer.explain(images, targets)
    second = explainer.explain(images, targets)
    assert first.shape == (2, 32, 32) and first.dtype == torch.float32
    assert torch.isfinite(first).all()
    assert torch.equal(first, second)
    masks = explainer.explain_masks(images, targets)
    assert masks.shape == (2, 3, 32, 32) and masks.dtype == torch.float32
    assert masks.min() >= 0 and masks.max() <= 1


@pytest.mark.parametrize("training", [True, False])
def test_model_mode_gradients_hooks_and_weights_untouched(training: bool) -> None:
    model = tiny_net().train(training)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images, targets = small_batch()
    with torch.no_grad():
        ExtremalPerturbation(model, **FAST).explain(images.requires_grad_(), targets)
    assert all(m.training == training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    assert images.grad is None
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks and not module._backward_hooks
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_images_and_areas_share_one_forward_per_iteration() -> None:
    model = tiny_net()
    images, targets = small_batch()
    with recorded_batch_sizes(model) as batch_sizes:
        ExtremalPerturbation(model, areas=(0.1, 0.2, 0.3), **FAST).explain(images, targets)
    assert batch_sizes == [2 * 3] * FAST["iterations"]


def test_batch_of_images_equals_images_one_by_one() -> None:
    images, targets = small_batch()
    explainer = ExtremalPerturbation(tiny_net(), areas=(0.1, 0.3), **FAST)
    together = explainer.explain_masks(images, targets)
    alone = torch.cat([explainer.explain_masks(images[i : i + 1], targets[i : i + 1]) for i in range(2)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)


def test_jitter_flips_the_model_input_on_even_iterations() -> None:
    """With a model blind to horizontal flips the masks evolve alike with and without
    jitter, so the inputs differ exactly by the flip on even iterations."""
    images, targets = small_batch()
    seen: dict[bool, list[torch.Tensor]] = {True: [], False: []}
    for jitter in (True, False):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
        model.register_forward_pre_hook(lambda _m, inputs, jitter=jitter: seen[jitter].append(inputs[0].detach()))
        ExtremalPerturbation(model, step=4, sigma=8.0, iterations=2, jitter=jitter).explain(images, targets)
    torch.testing.assert_close(seen[True][0], seen[False][0].flip(-1))
    torch.testing.assert_close(seen[True][1], seen[False][1])


def test_saliency_is_the_smoothed_sum_of_the_masks() -> None:
    images, targets = small_batch()
    model = tiny_net()
    masks = ExtremalPerturbation(model, **FAST).explain_masks(images, targets).numpy()
    plain = ExtremalPerturbation(model, smooth=0.0, **FAST).explain(images, targets).numpy()
    np.testing.assert_allclose(plain, masks.sum(axis=1), atol=1e-5)
    smooth = 0.09
    smoothed = ExtremalPerturbation(model, smooth=smooth, **FAST).explain(images, targets).numpy()
    sigma = smooth * 32
    for i in range(2):
        expected = scipy.ndimage.gaussian_filter(
            masks[i].sum(axis=0).astype(np.float64), sigma, mode="constant", cval=0.0, radius=math.ceil(4 * sigma)
        )
        np.testing.assert_allclose(smoothed[i], expected, atol=1e-5)


def test_area_ranking_loss_matches_a_plain_computation() -> None:
    rng = np.random.default_rng(0)
    masks = rng.random((3, 5, 7)).astype(np.float32)
    areas = [0.1, 0.5, 0.93]
    profile = area_profile(35, areas)
    assert profile.shape == (3, 35)
    loss = area_ranking_loss(torch.from_numpy(masks), profile).numpy()
    for i, area in enumerate(areas):
        values = sorted(masks[i].ravel().tolist())
        zeros = int(math.floor(35 * (1 - area)))
        reference = [0.0] * zeros + [1.0] * (35 - zeros)
        expected = sum((v - r) ** 2 for v, r in zip(values, reference)) / 35
        assert loss[i] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("num_levels, max_blur", [(4, 3.0), (3, 20.0)])
def test_blur_pyramid_levels_are_gaussian_blurs(num_levels: int, max_blur: float) -> None:
    generator = torch.Generator().manual_seed(2)
    images = torch.randn(2, 3, 20, 24, generator=generator, dtype=torch.float64)
    pyramid = blur_pyramid(images, num_levels, max_blur)
    assert pyramid.shape == (2, num_levels, 3, 20, 24)
    for level in range(num_levels):
        sigma = max_blur * (num_levels - 1 - level) / (num_levels - 1)
        for n in range(2):
            for c in range(3):
                channel = images[n, c].numpy()
                if sigma == 0:
                    expected = channel
                else:
                    expected = scipy.ndimage.gaussian_filter(
                        channel, sigma, mode="constant", cval=0.0, radius=math.ceil(4 * sigma)
                    )
                np.testing.assert_allclose(pyramid[n, level, c].numpy(), expected, atol=1e-10)


def test_perturb_interpolates_linearly_between_levels() -> None:
    generator = torch.Generator().manual_seed(3)
    pyramid = torch.randn(2, 5, 3, 4, 6, generator=generator, dtype=torch.float64)
    masks = torch.rand(2, 3, 4, 6, generator=generator, dtype=torch.float64)
    masks[0, 0, 0, :3] = torch.tensor([0.0, 1.0, 0.5])
    out = perturb(pyramid, masks)
    assert out.shape == (2, 3, 3, 4, 6)
    for n in range(2):
        for k in range(3):
            for y in range(4):
                for x in range(6):
                    position = float(masks[n, k, y, x]) * 4
                    low = min(int(math.floor(position)), 3)
                    weight = position - low
                    expected = (1 - weight) * pyramid[n, low, :, y, x] + weight * pyramid[n, low + 1, :, y, x]
                    torch.testing.assert_close(out[n, k, :, y, x], expected)
    torch.testing.assert_close(out[0, 0, :, 0, 1], pyramid[0, 4, :, 0, 1])
    torch.testing.assert_close(out[0, 0, :, 0, 0], pyramid[0, 0, :, 0, 0])


def test_smooth_mask_of_one_active_grid_point() -> None:
    size, step, sigma = 40, 5, 10.0
    generator = SmoothMaskGenerator(size, size, step, sigma)
    grid = math.ceil(size / step)
    assert generator.grid_shape == (grid, grid)
    centres_y, centres_x = generator.centres
    for centres in (centres_y, centres_x):
        assert torch.allclose(centres[1:] - centres[:-1], torch.full((grid - 1,), float(step), dtype=centres.dtype))
        assert float(centres[0]) == pytest.approx(size - 1 - float(centres[-1]))
    params = torch.zeros(1, grid, grid)
    params[0, 3, 4] = 1.0
    mask = generator(params)[0].double()
    radius = 1 + math.ceil(sigma / step)
    neighbours = (2 * radius + 1) ** 2
    cy, cx = float(centres_y[3]), float(centres_x[4])
    checked_near = checked_far = 0
    for y in range(size):
        for x in range(size):
            dy, dx = abs(y - cy), abs(x - cx)
            if max(dy, dx) <= (radius - 1) * step:
                z = math.hypot(dy, dx) / sigma
                k = math.exp(-2 * max(z - 0.5, 0.0) ** 2)
                e = math.exp(SMOOTH_MAX_COLDNESS * k)
                assert float(mask[y, x]) == pytest.approx(k * e / (e + neighbours - 1), abs=1e-5)
                checked_near += 1
            elif max(dy, dx) > (radius + 1) * step:
                assert float(mask[y, x]) == 0.0
                checked_far += 1
    assert checked_near > 100 and checked_far > 100


def test_smooth_mask_margin_extends_the_canvas() -> None:
    generator = SmoothMaskGenerator(30, 20, 4, 8.0, margin=8)
    canvas = generator(torch.ones(2, *generator.grid_shape))
    assert canvas.shape == (2, 46, 36)
    image = generator.crop(canvas)
    assert image.shape == (2, 30, 20)
    assert float(image.min()) > 0.9 and float(canvas.max()) <= 1.0
    assert float(canvas[:, 0, 0].max()) < float(image.min())


def test_build_method_and_registry() -> None:
    explainer = build_method("extremal", tiny_net(), iterations=3, areas=[0.2])
    assert isinstance(explainer, ExtremalPerturbation) and explainer.areas == (0.2,)


@pytest.mark.parametrize(
    "params, name",
    [
        (dict(areas=(0.0,)), "area"),
        (dict(areas=(0.1, 1.0)), "area"),
        (dict(areas=()), "areas"),
        (dict(areas=("0.1",)), "area"),
        (dict(iterations=0), "iterations"),
        (dict(iterations=2.5), "iterations"),
        (dict(step=0), "step"),
        (dict(sigma=0.0), "sigma"),
        (dict(num_levels=1), "num_levels"),
        (dict(max_blur=-1.0), "max_blur"),
        (dict(area_weight=0.0), "area_weight"),
        (dict(area_growth=float("nan")), "area_growth"),
        (dict(lr=0.0), "lr"),
        (dict(momentum=1.0), "momentum"),
        (dict(dampening=1.5), "dampening"),
        (dict(smooth=-0.1), "smooth"),
        (dict(area_mode="pixels"), "area_mode"),
    ],
)
def test_bad_parameters_are_rejected(params: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        ExtremalPerturbation(tiny_net(), **params)


def test_bad_inputs_are_rejected() -> None:
    images, targets = small_batch()
    explainer = ExtremalPerturbation(tiny_net(), **FAST)
    with pytest.raises(ValueError, match="jitter should be a valid boolean"):
        ExtremalPerturbation(tiny_net(), jitter="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="images"):
        explainer.explain(images[0], targets)
    with pytest.raises(ValueError, match="targets"):
        explainer.explain(images, targets[:1])
    with pytest.raises(ValueError, match="targets"):
        explainer.explain(images, torch.tensor([0, 3]))
    with pytest.raises(TypeError, match="targets"):
        explainer.explain(images, targets.float())
