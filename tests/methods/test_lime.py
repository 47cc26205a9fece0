"""LIME: the sample vectors, recovery of a model linear in the superpixels, agreement
with a plain weighted least-squares fit (also with feature selection), sharding,
determinism, segmentation options and the explainer contract."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from skimage.segmentation import quickshift, slic
from torch import nn

from pipeline.methods import build_method
from pipeline.methods.lime import Lime, lime_samples

SIZE = 16


def blocks(image_size: int, block: int) -> np.ndarray:
    """Labels of a grid of ``block x block`` squares, row by row."""
    index = np.arange(image_size) // block
    return index[:, None] * (image_size // block) + index[None, :]


def segment_by_brightness(rgb: np.ndarray) -> np.ndarray:
    """16 squares for a bright top-left pixel, 4 otherwise: images of one batch differ in superpixel count."""
    return blocks(rgb.shape[0], 4 if rgb[0, 0, 0] > 0.5 else 8)


class TinyNet(nn.Module):
    """A convolution, global average pooling and a linear head over 4 classes (weights scaled up)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)
        with torch.no_grad():
            self.fc.weight.mul_(6.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


class SegmentLinearModel(nn.Module):
    """Two classes with probabilities ``a`` and ``1 - a``,
    ``a = 0.5 + sum_k beta_k * (mean of channel 0 on segment k)``."""

    def __init__(self, segments: np.ndarray, betas: np.ndarray) -> None:
        super().__init__()
        one_hot = torch.from_numpy(np.stack([segments == k for k in range(len(betas))])).float()
        self.register_buffer("averaging", one_hot / one_hot.sum(dim=(1, 2), keepdim=True))
        self.register_buffer("betas", torch.from_numpy(betas).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        segment_means = torch.einsum("bhw,khw->bk", x[:, 0], self.averaging)
        probability = 0.5 + segment_means @ self.betas
        return torch.stack([probability.log(), (1 - probability).log()], dim=1)


def images_with_brightness() -> torch.Tensor:
    """Two images: the first has a bright top-left pixel (16 segments), the second not (4)."""
    torch.manual_seed(3)
    images = torch.randn(2, 3, SIZE, SIZE)
    images[0, 0, 0, 0], images[1, 0, 0, 0] = 3.0, -3.0
    return images


def plain_lime(
    model: nn.Module,
    image: torch.Tensor,
    target: int,
    segments: np.ndarray,
    n_samples: int,
    seed: int,
    kernel_width: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """On/off vectors, responses and lime weights, sample by sample; hidden pixels take the image's channel means."""
    n_features = int(segments.max()) + 1
    vectors = lime_samples(seed, 0, n_samples, n_features).astype(float)
    fill = image.mean(dim=(1, 2), keepdim=True).expand_as(image)
    responses, weights = [], []
    for vector in vectors:
        keep = torch.from_numpy(vector[segments]).bool()
        perturbed = torch.where(keep, image, fill)
        with torch.no_grad():
            responses.append(torch.softmax(model(perturbed[None]), dim=1)[0, target].item())
        norm = np.linalg.norm(vector)
        distance = 1.0 if norm == 0 else 1.0 - vector.sum() / (norm * np.sqrt(n_features))
        weights.append(np.sqrt(np.exp(-(distance**2) / kernel_width**2)))
    return vectors, np.array(responses), np.array(weights)


def plain_ridge(features: np.ndarray, responses: np.ndarray, weights: np.ndarray, alpha: float) -> np.ndarray:
    """argmin sum_i w_i (y_i - b - x_i . beta)^2 + alpha |beta|^2 by least squares on an augmented system."""
    n, k = features.shape
    root = np.sqrt(weights)[:, None]
    data_rows = root * np.hstack([np.ones((n, 1)), features])
    penalty_rows = np.hstack([np.zeros((k, 1)), np.sqrt(alpha) * np.eye(k)])
    design = np.vstack([data_rows, penalty_rows])
    response = np.concatenate([root[:, 0] * responses, np.zeros(k)])
    return np.linalg.lstsq(design, response, rcond=None)[0][1:]


def test_lime_samples() -> None:
    samples = lime_samples(5, 0, 400, 9)
    assert samples.shape == (400, 9) and samples.dtype == bool
    assert samples[0].all()
    for index in (1, 7, 399):
        assert np.array_equal(lime_samples(5, index, index + 1, 9)[0], samples[index])
    assert np.array_equal(lime_samples(5, 0, 400, 4), samples[:, :4])
    # 399 * 9 fair coin flips: the on-fraction is within 5 standard errors (0.042) of 1/2.
    assert abs(samples[1:].mean() - 0.5) < 5 * 0.5 / np.sqrt(399 * 9)
    assert not np.array_equal(lime_samples(6, 0, 400, 9), samples)


@pytest.mark.parametrize("hide_color, fill_of", [((0.0, 0.0, 0.0), lambda v: 0.0), ("mean", lambda v: v.mean())])
def test_recovers_a_model_linear_in_the_superpixels(hide_color: object, fill_of: object) -> None:
    segments = blocks(SIZE, 4)
    rng = np.random.default_rng(0)
    betas = rng.uniform(-0.02, 0.02, 16)
    values = rng.uniform(-1.0, 1.0, 16)
    images = torch.from_numpy(rng.standard_normal((2, 3, SIZE, SIZE))).float()
    images[:, 0] = torch.from_numpy(values[segments]).float()
    model = SegmentLinearModel(segments, betas)
    method = build_method(
        "lime", model, n_samples=300, segmentation=lambda rgb: segments, hide_color=hide_color, alpha=1e-6
    )
    assert isinstance(method, Lime)
    partial = method.accumulate(images, torch.tensor([0, 1]), 0, 300)
    coefficients = method.coefficients(partial)
    # hiding segment k moves its channel-0 mean from values[k] to the fill value
    expected = betas * (values - fill_of(values))
    np.testing.assert_allclose(coefficients[0].numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(coefficients[1].numpy(), -expected, atol=1e-5)
    saliency = method.finalize(partial)
    np.testing.assert_allclose(saliency[0].numpy(), expected[segments], atol=1e-5)


@pytest.mark.parametrize("num_features", [None, 3])
def test_equals_plain_weighted_ridge(num_features: int | None) -> None:
    model, images, targets = TinyNet(), images_with_brightness(), torch.tensor([2, 0])
    n_samples, seed, width, alpha = 48, 4, 0.25, 1.0
    method = Lime(
        model,
        n_samples=n_samples,
        segmentation=segment_by_brightness,
        kernel_width=width,
        alpha=alpha,
        num_features=num_features,
        seed=seed,
        batch_size=20,
    )
    partial = method.accumulate(images, targets, 0, n_samples)
    coefficients = method.coefficients(partial)
    saliency = method.finalize(partial)
    for index, block in enumerate((4, 8)):
        segments = blocks(SIZE, block)
        assert np.array_equal(partial.constants["segments"][index].numpy(), segments)
        features, responses, weights = plain_lime(
            model, images[index], int(targets[index]), segments, n_samples, seed, width
        )
        expected = plain_ridge(features, responses, weights, alpha)
        if num_features is not None:
            ranking = plain_ridge(features, responses, weights, 0.01)
            selected = np.argsort(-np.abs(ranking), kind="stable")[:num_features]
            expected = np.zeros_like(expected)
            expected[selected] = plain_ridge(features[:, selected], responses, weights, alpha)
            assert np.count_nonzero(coefficients[index].numpy()) == num_features
        assert np.abs(expected).max() > 1e-4
        np.testing.assert_allclose(coefficients[index].numpy(), expected, rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(saliency[index].numpy(), expected[segments], rtol=1e-5, atol=1e-9)


def test_positive_only_zeroes_negative_coefficients() -> None:
    model, images, targets = TinyNet(), images_with_brightness(), torch.tensor([1, 3])
    params = dict(n_samples=40, segmentation=segment_by_brightness, seed=1)
    signed = Lime(model, **params).explain(images, targets)
    positive = Lime(model, positive_only=True, **params).explain(images, targets)
    assert bool((signed < 0).any())
    torch.testing.assert_close(positive, signed.clamp_min(0.0))


def test_shards_merge_to_the_single_run() -> None:
    model, images, targets = TinyNet(), images_with_brightness(), torch.tensor([1, 2])
    method = Lime(model, n_samples=50, segmentation=segment_by_brightness, seed=2, batch_size=9)
    bounds = [0, 4, 20, 32, 50]  # multiples of the 4 samples per forward of 2 images, and n_samples
    method.check_alignment(4, 50, len(images))
    merged = method.merge([method.accumulate(images, targets, a, b) for a, b in zip(bounds, bounds[1:])])
    reference = method.accumulate(images, targets, 0, 50)
    for key, value in reference.sums.items():
        assert torch.equal(merged.sums[key], value)
    assert torch.equal(merged.constants["segments"], reference.constants["segments"])
    assert torch.equal(method.finalize(merged), method.explain(images, targets))


def test_seed_determines_the_result() -> None:
    model, images, targets = TinyNet(), images_with_brightness(), torch.tensor([0, 1])
    params = dict(n_samples=30, segmentation=segment_by_brightness)
    first = Lime(model, seed=3, **params).explain(images, targets)
    assert torch.equal(first, Lime(model, seed=3, **params).explain(images, targets))
    assert not torch.allclose(first, Lime(model, seed=8, **params).explain(images, targets))


def test_segment_mean_fill() -> None:
    images = images_with_brightness()
    method = Lime(TinyNet(), segmentation=segment_by_brightness, hide_color="segment_mean")
    segments = method.segment(images)
    fill = method.fill(images, segments)
    for index in range(2):
        labels = segments[index].numpy()
        for label in np.unique(labels):
            region = labels == label
            expected = images[index].numpy()[:, region].mean(axis=1)
            region_fill = fill[index].numpy()[:, region]
            np.testing.assert_allclose(region_fill, np.broadcast_to(expected[:, None], region_fill.shape), atol=1e-6)


MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def quadrant_images() -> torch.Tensor:
    """Normalized 32x32 images of four flat colored quadrants plus light noise: regions quickshift and SLIC find."""
    torch.manual_seed(5)
    rgb = torch.full((2, 3, 32, 32), 0.2) + 0.02 * torch.rand(2, 3, 32, 32)
    rgb[:, 0, :, 16:] = 0.9
    rgb[:, 1, 16:, :] = 0.8
    return (rgb - MEAN) / STD


@pytest.mark.parametrize("segmentation", ["quickshift", "slic"])
def test_segmentation_of_the_denormalized_image(segmentation: str) -> None:
    images = quadrant_images()
    segments = Lime(TinyNet(), segmentation=segmentation, n_segments=8).segment(images)
    assert segments.dtype == torch.int64 and segments.shape == (2, 32, 32)
    for image, labels in zip(images, segments):
        rgb = (image * STD + MEAN).clamp(0, 1).permute(1, 2, 0).double().numpy()
        if segmentation == "quickshift":
            direct = quickshift(rgb, kernel_size=4, max_dist=200, ratio=0.2)
        else:
            direct = slic(rgb, n_segments=8, start_label=0)
        contiguous = np.unique(direct, return_inverse=True)[1].reshape(direct.shape)
        assert np.array_equal(labels.numpy(), contiguous)
        assert labels.max() >= 3


def test_images_are_segmented_side_by_side_in_torch_s_threads() -> None:
    """Two images meet at a barrier only when two threads segment them at once; each keeps its own labels."""
    barrier = threading.Barrier(2, timeout=10)

    def halves(rgb: np.ndarray) -> np.ndarray:
        barrier.wait()
        labels = np.zeros(rgb.shape[:2], np.int64)
        labels[:, : 8 if rgb[..., 0].mean() > 0.5 else 24] = 1
        return labels

    images = quadrant_images()
    images[1, 0] = (0.1 - MEAN[0, 0]) / STD[0, 0]  # the second image dark in channel 0
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        segments = Lime(TinyNet(), segmentation=halves).segment(images)
    finally:
        torch.set_num_threads(threads)
    assert segments[0, 0].tolist() == [1] * 8 + [0] * 24 and segments[1, 0].tolist() == [1] * 24 + [0] * 8


@pytest.mark.parametrize("segmentation", ["quickshift", "slic"])
@pytest.mark.parametrize("training", [True, False])
def test_explainer_contract(segmentation: str, training: bool) -> None:
    model = TinyNet().train(training)
    method = build_method("lime", model, n_samples=16, segmentation=segmentation, n_segments=8)
    saliency = method.explain(quadrant_images(), torch.tensor([0, 3]))
    assert saliency.shape == (2, 32, 32) and saliency.dtype == torch.float32
    assert bool(torch.isfinite(saliency).all())
    assert all(module.training == training for module in model.modules())
    assert all(parameter.grad is None for parameter in model.parameters())


def test_unknown_parameter_lists_valid_ones() -> None:
    with pytest.raises(TypeError, match="valid parameters: .*n_samples.*hide_color"):
        build_method("lime", TinyNet(), samples=10)


@pytest.mark.parametrize(
    "params, match",
    [
        ({"segmentation": "felzenszwalb"}, "segmentation"),
        ({"hide_color": "black"}, "hide_color"),
        ({"kernel_width": 0.0}, "kernel_width"),
        ({"alpha": -1.0}, "alpha"),
        ({"num_features": 0}, "num_features"),
        ({"std": (0.2, 0.2)}, "mean and std"),
        ({"std": (0.2, 0.2, float("nan"))}, r"std\[2\] should be a finite number, got nan"),
        ({"hide_color": (0.0, 0.0)}, "hide_color has 2 values but mean/std have 3"),
        ({"hide_color": ("x", 0.0, 0.0)}, r"hide_color\[0\] should be a valid number, got 'x'"),
        ({"n_segments": 2.5}, "n_segments should be a valid integer, got 2.5"),
        ({"n_samples": 100.0}, "n_samples should be a valid integer, got 100.0"),
        ({"batch_size": "64"}, "batch_size should be a valid integer, got '64'"),
        ({"kernel_width": "wide"}, "kernel_width should be a valid number, got 'wide'"),
        ({"positive_only": "yes"}, "positive_only should be a valid boolean, got 'yes'"),
    ],
)
def test_bad_parameters(params: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_method("lime", TinyNet(), **params)


def test_bad_inputs() -> None:
    images, targets = images_with_brightness(), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="sample range"):
        Lime(TinyNet(), n_samples=4, segmentation=segment_by_brightness).accumulate(images, targets, 2, 5)
    with pytest.raises(ValueError, match="segmentation of image 0 has shape"):
        Lime(TinyNet(), segmentation=lambda rgb: np.zeros((3, 3))).accumulate(images, targets, 0, 2)
