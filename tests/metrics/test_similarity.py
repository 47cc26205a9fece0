"""PCC against numpy.corrcoef and SSIM against scikit-image, on plainly prepared arrays."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from pipeline.metrics.similarity import pcc, ssim


def minmax(array: np.ndarray) -> np.ndarray:
    low, high = array.min(), array.max()
    return (array - low) / (high - low) if high > low else np.zeros_like(array)


def bilinear(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """Half-pixel-centred bilinear resize (align_corners=False), clamping at the border."""

    def taps(n_in: int, n_out: int) -> list[tuple[int, int, float]]:
        result = []
        for i in range(n_out):
            source = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
            low = int(source)
            result.append((low, min(low + 1, n_in - 1), source - low))
        return result

    out = np.zeros((height, width))
    for i, (r0, r1, fr) in enumerate(taps(array.shape[0], height)):
        for j, (c0, c1, fc) in enumerate(taps(array.shape[1], width)):
            top = (1 - fc) * array[r0, c0] + fc * array[r0, c1]
            bottom = (1 - fc) * array[r1, c0] + fc * array[r1, c1]
            out[i, j] = (1 - fr) * top + fr * bottom
    return out


def random_pair(seed: int, shape=(4, 24, 30)) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    maps = torch.rand(shape, generator=generator, dtype=torch.float64) * 5 - 1
    # a ground truth correlated with the map, so SSIM and PCC are far from 0
    gt = maps + torch.rand(shape, generator=generator, dtype=torch.float64)
    return maps, gt


def test_pcc_equals_numpy_corrcoef() -> None:
    maps, gt = random_pair(0)
    result = pcc(maps, gt)
    assert result.shape == (4,) and result.dtype == torch.float64
    for b in range(4):
        expected = np.corrcoef(minmax(maps[b].numpy()).ravel(), minmax(gt[b].numpy()).ravel())[0, 1]
        assert result[b].item() == pytest.approx(expected, abs=1e-12)


def test_pcc_resizes_gt_to_the_map_size() -> None:
    maps = torch.rand(2, 12, 10, dtype=torch.float64)
    gt = torch.rand(2, 5, 4, dtype=torch.float64)
    result = pcc(maps, gt)
    for b in range(2):
        resized = minmax(bilinear(gt[b].numpy(), 12, 10))
        expected = np.corrcoef(minmax(maps[b].numpy()).ravel(), resized.ravel())[0, 1]
        assert result[b].item() == pytest.approx(expected, abs=1e-12)


def test_pcc_of_a_constant_map_is_nan() -> None:
    maps = torch.rand(2, 8, 8)
    maps[1] = 3.0
    result = pcc(maps, torch.rand(2, 8, 8))
    assert not torch.isnan(result[0]) and torch.isnan(result[1])


@pytest.mark.parametrize("metric", [pcc, ssim])
def test_an_unusable_map_or_ground_truth_is_nan(metric) -> None:
    maps, gt = random_pair(1, shape=(5, 16, 16))
    maps[1] = 3.0
    maps[2, 4, 4] = float("nan")
    maps[3, 4, 4] = float("inf")
    gt[4] = 0.5
    result = metric(maps, gt)
    assert torch.isfinite(result[0]) and torch.isnan(result[1:]).all()


def test_ssim_defaults_equal_scikit_image_defaults() -> None:
    maps, gt = random_pair(1)
    result = ssim(maps, gt)
    for b in range(4):
        expected = structural_similarity(minmax(maps[b].numpy()), minmax(gt[b].numpy()), data_range=1)
        assert result[b].item() == pytest.approx(expected, abs=1e-10)


@pytest.mark.parametrize(
    "options",
    [
        {"gaussian_weights": True, "sigma": 1.5, "use_sample_covariance": False},  # Wang et al. (2004)
        {"gaussian_weights": True, "sigma": 1.5, "use_sample_covariance": True},
        {"gaussian_weights": True, "sigma": 2.0, "win_size": 7, "use_sample_covariance": False},  # window narrower than the Gaussian's reach
        {"gaussian_weights": False},
        {"gaussian_weights": False, "win_size": 5, "use_sample_covariance": True},
    ],
)
def test_ssim_equals_scikit_image(options: dict) -> None:
    maps, gt = random_pair(1)
    result = ssim(maps, gt, **options)
    for b in range(4):
        expected = structural_similarity(minmax(maps[b].numpy()), minmax(gt[b].numpy()), data_range=1, **options)
        assert result[b].item() == pytest.approx(expected, abs=1e-10)


def test_ssim_float32_and_resized_gt() -> None:
    maps = torch.rand(2, 16, 16)
    gt = torch.rand(2, 8, 8)
    result = ssim(maps, gt)
    for b in range(2):
        a = minmax(maps[b].double().numpy())
        g = minmax(bilinear(gt[b].double().numpy(), 16, 16))
        expected = structural_similarity(a, g, data_range=1)
        assert result[b].item() == pytest.approx(expected, abs=1e-6)


def test_ssim_ignores_scale_and_offset() -> None:
    maps, gt = random_pair(2)
    torch.testing.assert_close(ssim(maps * 7 + 3, gt), ssim(maps, gt))
    assert ssim(maps, maps).tolist() == pytest.approx([1.0] * 4, abs=1e-12)


def test_bad_input_is_rejected() -> None:
    maps, gt = random_pair(3, (2, 9, 9))
    with pytest.raises(ValueError, match="win_size"):
        ssim(maps, gt, win_size=4)
    with pytest.raises(ValueError, match="win_size"):
        ssim(maps, gt, gaussian_weights=True)  # the 11 x 11 Gaussian window does not fit
    with pytest.raises(ValueError, match="win_size"):
        ssim(maps[:, :6, :6], gt)  # nor the default 7 x 7 window
    with pytest.raises(ValueError, match="sigma"):
        ssim(maps, gt, sigma=0)
    with pytest.raises(ValueError, match="gt"):
        pcc(maps, gt[:1])
    with pytest.raises(ValueError, match="maps"):
        pcc(maps[0], gt)
    with pytest.raises(TypeError, match="gt"):
        ssim(maps, gt.numpy())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    maps, gt = random_pair(4)
    for metric in (pcc, ssim):
        result = metric(maps.cuda(), gt)
        assert result.device.type == "cuda"
        torch.testing.assert_close(result.cpu(), metric(maps, gt), rtol=0, atol=1e-10)
