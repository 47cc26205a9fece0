"""Insertion / deletion against hand-computed curves and a plain one-step-at-a-time loop."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.ndimage
import torch
from torch import nn

from pipeline.metrics.insertion_deletion import blur_substrate, deletion, insertion, pixel_rank


def sigmoid(value: float) -> float:
    return 1.0 / (1.0 + math.exp(-value))


def linear_model(weights: list[float]) -> nn.Module:
    """Logits [w . x, 0] for a 1-channel image x, so p(class 0) = sigmoid(w . x)."""
    linear = nn.Linear(len(weights), 2, bias=False)
    with torch.no_grad():
        linear.weight.zero_()
        linear.weight[0] = torch.tensor(weights)
    return nn.Sequential(nn.Flatten(), linear)


def tiny_convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)
    ).eval()


# pixel i has saliency i, so the order is 15, 14, ..., 0: groups {15..12}, {11..8}, {7..4}, {3..0}
HAND_MAP = torch.arange(16, dtype=torch.float32).view(1, 4, 4)
# each group's weights sum to 1, 2, -1, 0 (pixels 0-3: 0, 4-7: -0.25, 8-11: 0.5, 12-15: 0.25)
HAND_WEIGHTS = [0.0] * 4 + [-0.25] * 4 + [0.5] * 4 + [0.25] * 4


def test_insertion_hand_computed() -> None:
    model = linear_model(HAND_WEIGHTS)
    images = torch.ones(2, 1, 4, 4)
    maps = HAND_MAP.repeat(2, 1, 1)
    auc, curves = insertion(model, images, maps, torch.tensor([0, 1]), step=4, substrate="zeros")
    # logits after inserting 0, 1, 2, 3, 4 groups of ones: 0, 1, 3, 2, 2
    expected = [0.5, sigmoid(1), sigmoid(3), sigmoid(2), sigmoid(2)]
    torch.testing.assert_close(curves[0], torch.tensor(expected), rtol=0, atol=1e-6)
    torch.testing.assert_close(curves[1], 1 - torch.tensor(expected), rtol=0, atol=1e-6)
    expected_auc = (0.5 / 2 + sigmoid(1) + sigmoid(3) + sigmoid(2) + sigmoid(2) / 2) / 4
    assert auc[0].item() == pytest.approx(expected_auc, abs=1e-6)
    assert auc[1].item() == pytest.approx(1 - expected_auc, abs=1e-6)


def test_deletion_hand_computed() -> None:
    model = linear_model(HAND_WEIGHTS)
    auc, curves = deletion(model, torch.ones(1, 1, 4, 4), HAND_MAP, torch.tensor([0]), step=4)
    # logits after deleting 0..4 groups (zeros substrate): 2, 1, -1, 0, 0
    expected = [sigmoid(2), sigmoid(1), sigmoid(-1), 0.5, 0.5]
    torch.testing.assert_close(curves[0], torch.tensor(expected), rtol=0, atol=1e-6)
    expected_auc = (sigmoid(2) / 2 + sigmoid(1) + sigmoid(-1) + 0.5 + 0.5 / 2) / 4
    assert auc.item() == pytest.approx(expected_auc, abs=1e-6)


def test_last_step_smaller_than_step() -> None:
    model = linear_model(HAND_WEIGHTS)
    # step 5 over 16 pixels: 4 steps inserting 15..11, 10..6, 5..1 and 0
    _, curves = insertion(model, torch.ones(1, 1, 4, 4), HAND_MAP, torch.tensor([0]), step=5, substrate="zeros")
    logits = [0, 1.5, 2.5, 2.0, 2.0]
    torch.testing.assert_close(curves[0], torch.tensor([sigmoid(v) for v in logits]), rtol=0, atol=1e-6)


def sampled_gaussian(size: int = 11, sigma: float = 5.0) -> np.ndarray:
    offsets = np.arange(size) - size // 2
    g = np.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (2 * sigma**2))
    return g / g.sum()


def rise_kernel(size: int = 11, sigma: float = 5.0) -> np.ndarray:
    """The RISE evaluation code's ``gkern``: SciPy's Gaussian filter of a unit impulse."""
    delta = np.zeros((size, size))
    delta[size // 2, size // 2] = 1.0
    return scipy.ndimage.gaussian_filter(delta, sigma)


def numpy_blur(images: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    out = np.empty_like(images)
    for b in range(images.shape[0]):
        for c in range(images.shape[1]):
            out[b, c] = scipy.ndimage.convolve(images[b, c], kernel, mode="constant", cval=0.0)
    return out


def reference_curves(model, images, maps, targets, step, background, inserting):
    """One image, one step at a time: copy the first t*step pixels of the order into the start image."""
    n_images, channels, height, width = images.shape
    n_steps = math.ceil(height * width / step)
    curves = np.zeros((n_images, n_steps + 1))
    for b in range(n_images):
        saliency = maps[b].reshape(-1)
        order = sorted(range(height * width), key=lambda i: (-saliency[i], i))
        start, end = (background[b], images[b]) if inserting else (images[b], background[b])
        for t in range(n_steps + 1):
            current = start.reshape(channels, -1).copy()
            changed = order[: t * step]
            current[:, changed] = end.reshape(channels, -1)[:, changed]
            with torch.no_grad():
                logits = model(torch.from_numpy(current.reshape(1, channels, height, width)).float())
            curves[b, t] = torch.softmax(logits, dim=1)[0, targets[b]].item()
    return curves


@pytest.mark.parametrize("substrate", ["blur", "zeros", "mean", "tensor"])
@pytest.mark.parametrize("inserting", [True, False])
def test_batched_equals_plain_loop(substrate: str, inserting: bool) -> None:
    model = tiny_convnet()
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, 8, 8, generator=generator)
    maps = torch.randint(0, 6, (3, 8, 8), generator=generator).float()  # many ties
    targets = torch.tensor([0, 3, 4])
    fill = torch.randn(3, 1, 1, generator=generator)
    images_np = images.numpy().astype(np.float64)
    background = {
        "blur": numpy_blur(images_np, rise_kernel()),
        "zeros": np.zeros_like(images_np),
        "mean": np.broadcast_to(images_np.mean(axis=(2, 3), keepdims=True), images_np.shape).copy(),
        "tensor": np.broadcast_to(fill.numpy(), images_np.shape).copy(),
    }[substrate]
    expected = reference_curves(model, images_np, maps.numpy(), targets.tolist(), 5, background, inserting)

    metric = insertion if inserting else deletion
    given = fill if substrate == "tensor" else substrate
    seen: list[int] = []
    handle = model.register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0].shape[0]))
    try:
        auc, curves = metric(model, images, maps, targets, step=5, substrate=given, batch_size=7)
    finally:
        handle.remove()
    assert curves.shape == (3, 14)  # ceil(64 / 5) = 13 steps
    np.testing.assert_allclose(curves.numpy(), expected, rtol=0, atol=2e-6)
    np.testing.assert_allclose(auc.numpy(), np.trapezoid(expected, dx=1 / 13, axis=1), rtol=0, atol=2e-6)
    assert max(seen) <= 7 and sum(seen) == 3 * 14


def test_batch_size_does_not_change_the_result() -> None:
    model = tiny_convnet()
    images = torch.randn(2, 3, 8, 8)
    maps = torch.rand(2, 8, 8)
    targets = torch.tensor([1, 2])
    reference = insertion(model, images, maps, targets, step=3, batch_size=1)
    for batch_size in (4, 23, 1000):
        result = insertion(model, images, maps, targets, step=3, batch_size=batch_size)
        torch.testing.assert_close(result, reference, rtol=0, atol=1e-6)


def test_ties_follow_ascending_pixel_index() -> None:
    model = tiny_convnet()
    images = torch.randn(1, 3, 6, 6)
    targets = torch.tensor([2])
    # equal saliency everywhere = strictly decreasing saliency in row-major order
    flat = deletion(model, images, torch.ones(1, 6, 6), targets, step=4)
    ordered = deletion(model, images, -torch.arange(36.0).view(1, 6, 6), targets, step=4)
    torch.testing.assert_close(flat, ordered, rtol=0, atol=0)
    tied = torch.tensor([[0.0, 1, 1, 0], [2, 1, 0, 2], [0, 0, 1, 1], [2, 0, 0, 0]]).view(1, 4, 4)
    # value 2 at pixels 4, 7, 12; value 1 at 1, 2, 5, 10, 11; value 0 elsewhere: pixel -> rank
    expected = [8, 3, 4, 9, 0, 5, 10, 1, 11, 12, 6, 7, 2, 13, 14, 15]
    assert pixel_rank(tied)[0].tolist() == expected


def test_pixel_rank_matches_python_sort() -> None:
    maps = torch.randint(0, 4, (3, 5, 7)).float()
    for b in range(3):
        saliency = maps[b].flatten().tolist()
        order = sorted(range(35), key=lambda i: (-saliency[i], i))
        rank = pixel_rank(maps)[b]
        assert [int(rank[i]) for i in order] == list(range(35))


@pytest.mark.parametrize(("kernel", "reference"), [("rise", rise_kernel), ("gaussian", sampled_gaussian)])
def test_blur_equals_explicit_convolution(kernel: str, reference) -> None:
    images = torch.randn(2, 3, 7, 13, dtype=torch.float64)  # smaller than the kernel on one side
    expected = numpy_blur(images.numpy(), reference())
    blurred = blur_substrate(images, kernel=kernel)
    assert blurred.dtype == torch.float64
    np.testing.assert_allclose(blurred.numpy(), expected, rtol=0, atol=1e-12)
    blurred32 = blur_substrate(images.float(), kernel=kernel)
    np.testing.assert_allclose(blurred32.numpy(), expected, rtol=0, atol=1e-5)


def test_default_kernel_is_scipy_smoothed_delta() -> None:
    image = torch.zeros(1, 1, 21, 21, dtype=torch.float64)
    image[0, 0, 10, 10] = 1.0
    response = blur_substrate(image)[0, 0, 5:16, 5:16]
    np.testing.assert_allclose(response.numpy(), rise_kernel(), rtol=0, atol=1e-12)
    # not the sampled Gaussian: the reflected tails make it flatter
    assert np.abs(rise_kernel() - sampled_gaussian()).max() > 1e-4


def rise_evaluation_insertion(
    model: nn.Module, image: torch.Tensor, saliency: np.ndarray, target: int, step: int
) -> np.ndarray:
    """Insertion as the RISE evaluation code computes it (``CausalMetric.single_run``, mode "ins"):
    the substrate is ``conv2d`` with ``gkern(11, 5)`` on the diagonal of a 3 x 3 channel kernel
    and padding 5; pixels in the order ``flip(argsort(saliency))`` are copied ``step`` at a time."""
    kernel = np.zeros((3, 3, 11, 11))
    for c in range(3):
        kernel[c, c] = rise_kernel()
    start = torch.nn.functional.conv2d(image, torch.from_numpy(kernel).float(), padding=5).numpy()
    finish = image.numpy()
    height, width = saliency.shape
    pixels = height * width
    n_steps = (pixels + step - 1) // step
    order = np.flip(np.argsort(saliency.reshape(-1, pixels), axis=1), axis=-1)
    scores = np.empty(n_steps + 1)
    for i in range(n_steps + 1):
        with torch.no_grad():
            probabilities = torch.softmax(model(torch.from_numpy(start)), dim=1)
        scores[i] = float(probabilities[0, target])
        if i < n_steps:
            coords = order[:, step * i : step * (i + 1)]
            start.reshape(1, 3, pixels)[0, :, coords] = finish.reshape(1, 3, pixels)[0, :, coords]
    return scores


def test_default_insertion_equals_the_rise_evaluation_code() -> None:
    torch.manual_seed(5)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 5)).eval()  # sensitive to every pixel
    with torch.no_grad():
        model[1].weight.mul_(20)
    generator = torch.Generator().manual_seed(5)
    image = torch.randn(1, 3, 16, 16, generator=generator)
    saliency = torch.rand(1, 16, 16, generator=generator, dtype=torch.float64)  # no ties
    with torch.no_grad():
        target = model(image).argmax(dim=1)
    expected = rise_evaluation_insertion(model, image, saliency[0].numpy(), int(target), 20)
    auc, curves = insertion(model, image, saliency.float(), target, step=20)
    np.testing.assert_allclose(curves[0].numpy(), expected, rtol=0, atol=1e-6)
    expected_auc = (expected.sum() - expected[0] / 2 - expected[-1] / 2) / (len(expected) - 1)
    assert auc.item() == pytest.approx(expected_auc, abs=1e-6)
    # the sampled Gaussian gives another curve
    _, gaussian = insertion(model, image, saliency.float(), target, step=20, blur="gaussian")
    assert np.abs(gaussian[0].numpy() - expected).max() > 1e-3


def test_model_mode_and_gradients_untouched() -> None:
    model = tiny_convnet().train()
    images = torch.randn(1, 3, 8, 8)
    auc, curves = insertion(model, images, torch.rand(1, 8, 8), torch.tensor([0]), step=16)
    assert model.training
    assert not curves.requires_grad and not auc.requires_grad
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    deletion(model, images, torch.rand(1, 8, 8), torch.tensor([0]), step=16)
    assert not model.training


def test_bad_input_is_rejected() -> None:
    model = tiny_convnet()
    images = torch.randn(1, 3, 16, 16)  # 256 pixels: the default step of 224 fits
    maps = torch.rand(1, 16, 16)
    targets = torch.tensor([0])
    with pytest.raises(ValueError, match="maps"):
        insertion(model, images, torch.rand(1, 4, 4), targets)
    with pytest.raises(ValueError, match="step"):
        insertion(model, images, maps, targets, step=0)
    with pytest.raises(ValueError, match="step 257 exceeds the 256 pixels"):
        insertion(model, images, maps, targets, step=257)
    with pytest.raises(ValueError, match="batch_size"):
        insertion(model, images, maps, targets, batch_size=0)
    with pytest.raises(ValueError, match="substrate"):
        deletion(model, images, maps, targets, substrate="noise")
    with pytest.raises(ValueError, match="insertion: blur should be 'rise' or 'gaussian', got 'box'"):
        insertion(model, images, maps, targets, blur="box")
    with pytest.raises(ValueError, match="substrate"):
        deletion(model, images, maps, targets, substrate=torch.zeros(2, 1, 1))
    with pytest.raises(ValueError, match="NaN"):
        deletion(model, images, torch.full((1, 16, 16), float("nan")), targets)
    with pytest.raises(ValueError, match="targets"):
        deletion(model, images, maps, torch.tensor([0, 1]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    model = tiny_convnet()
    images = torch.randn(3, 3, 16, 16)
    maps = torch.rand(3, 16, 16)
    targets = torch.tensor([0, 1, 2])
    for metric in (insertion, deletion):
        cpu = metric(model, images, maps, targets, step=10, substrate="blur", batch_size=16)
        gpu = metric(model.cuda(), images, maps, targets, step=10, substrate="blur", batch_size=16)
        assert gpu[1].device.type == "cuda"
        torch.testing.assert_close(tuple(t.cpu() for t in gpu), cpu, rtol=0, atol=1e-4)
        model.cpu()
