"""The sampled-method machinery shared by RISE, Gaussian RISE and LIME: forward batches
at absolute sample groups, int64 fixed-point sums, bitwise split-independent merging,
the resumable step loop, per-shard constants and explainers built without a model."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.methods import SampledExplainer, build_method
from pipeline.methods.base import (
    FIXED_POINT_BITS,
    MAX_SAMPLES,
    Partial,
    aligned_batches,
    from_fixed,
    to_fixed,
)
from pipeline.methods.lime import Lime
from tests.host_syncs import HostSyncs
from tests.methods.helpers import make_tiny_cam_net, recorded_batch_sizes, seeded_batch

METHODS = ["rise", "rise-gaussian", "lime"]
N_SAMPLES = 47
BATCH_SIZE = 12
PER_FORWARD = 4
"""Samples per forward for the 3 images of :func:`batch` at ``BATCH_SIZE``."""


class CountingSegmenter:
    """Squares of 8 pixels (16 superpixels) or 16 pixels (4) by the brightness of the first pixel;
    counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        self.calls += 1
        block = 8 if rgb[0, 0, 0] > 0.5 else 16
        index = np.arange(rgb.shape[0]) // block
        return index[:, None] * (rgb.shape[1] // block) + index[None, :]


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Three 32x32 images whose segmentations differ in superpixel count, and their targets."""
    images, targets = seeded_batch(11, [1, 4, 0])
    images[0, 0, 0, 0], images[1, 0, 0, 0] = 3.0, -3.0
    return images, targets


def params(name: str, **extra: object) -> dict[str, object]:
    """``N_SAMPLES`` samples, ``BATCH_SIZE``, seed 3 (and a :class:`CountingSegmenter` for LIME), updated by ``extra``."""
    if name == "lime":
        count: dict[str, object] = {"n_samples": N_SAMPLES, "segmentation": CountingSegmenter()}
    else:
        count = {"n_masks": N_SAMPLES, "grid_size": 4}
    return {"seed": 3, "batch_size": BATCH_SIZE, **count, **extra}


def make(name: str, **extra: object) -> SampledExplainer:
    """``name`` over the tiny CAM network with :func:`params`."""
    method = build_method(name, make_tiny_cam_net(), **params(name, **extra))
    assert isinstance(method, SampledExplainer)
    return method


def assert_partials_equal(first: Partial, second: Partial) -> None:
    assert first.sums.keys() == second.sums.keys() and first.constants.keys() == second.constants.keys()
    for key in first.sums:
        assert first.sums[key].dtype == torch.int64
        assert torch.equal(first.sums[key], second.sums[key]), key
    for key in first.constants:
        assert torch.equal(first.constants[key], second.constants[key]), key


def test_fixed_point_sums_are_exact_in_any_order() -> None:
    a, b, c = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    assert not torch.equal((a + b) + c, a + (b + c))
    assert torch.equal((to_fixed(a) + to_fixed(b)) + to_fixed(c), to_fixed(a) + (to_fixed(b) + to_fixed(c)))
    values = torch.tensor([0.0, 1.0, 0.75, 1 / 3, 2.0**-FIXED_POINT_BITS], dtype=torch.float64)
    fixed = to_fixed(values)
    assert fixed.dtype == torch.int64
    assert fixed.tolist()[:3] == [0, 2**FIXED_POINT_BITS, 3 * 2 ** (FIXED_POINT_BITS - 2)]
    assert fixed[4] == 1
    assert float((from_fixed(fixed) - values).abs().max()) <= 2.0 ** -(FIXED_POINT_BITS + 1)


def test_the_largest_total_fits_int64() -> None:
    """Each sample adds at most 1 to every sum: ``MAX_SAMPLES`` of them stay below 2**63."""
    largest = torch.tensor(MAX_SAMPLES, dtype=torch.int64) * to_fixed(torch.tensor(1.0))
    assert 0 < int(largest) < 2**63 - 1
    assert (MAX_SAMPLES + 1) * 2**FIXED_POINT_BITS == 2**63


@pytest.mark.parametrize("name", METHODS)
def test_too_many_samples_for_int64(name: str) -> None:
    count = "n_samples" if name == "lime" else "n_masks"
    assert make(name, **{count: MAX_SAMPLES}).n_samples == MAX_SAMPLES
    with pytest.raises(ValueError, match=f"{count} should be less than or equal to {MAX_SAMPLES}, got {MAX_SAMPLES+1}"):
        make(name, **{count: MAX_SAMPLES + 1})


def test_aligned_batches() -> None:
    assert list(aligned_batches(0, 10, 4)) == [(0, 4), (4, 8), (8, 10)]
    assert list(aligned_batches(2, 13, 4)) == [(2, 4), (4, 8), (8, 12), (12, 13)]
    assert list(aligned_batches(5, 6, 4)) == [(5, 6)]
    assert list(aligned_batches(6, 6, 4)) == []


@pytest.mark.parametrize("n_images, batch_size, expected", [(3, 12, (3, 4)), (3, 2, (2, 1)), (20, 64, (20, 3))])
def test_samples_per_forward(n_images: int, batch_size: int, expected: tuple[int, int]) -> None:
    method = make("rise", batch_size=batch_size)
    assert method.forward_split(n_images) == expected
    assert method.samples_per_forward(n_images) == expected[1]


def test_forward_batches_follow_absolute_sample_groups() -> None:
    """3 images, 4 samples per forward: samples 2..10 go through as groups 2-3, 4-7 and 8-10."""
    model = make_tiny_cam_net()
    images, targets = batch()
    method = build_method("rise", model, **params("rise"))
    assert isinstance(method, SampledExplainer)
    with recorded_batch_sizes(model) as sizes:
        method.accumulate(images, targets, 2, 11)
    assert sizes == [3 * 2, 3 * 4, 3 * 3]


def test_check_alignment() -> None:
    method = make("rise")
    method.check_alignment(0, 8, 3)
    method.check_alignment(PER_FORWARD, N_SAMPLES, 3)
    with pytest.raises(ValueError, match=r"samples 3\.\.20 .* multiples of 4 .*\(3 images, batch_size 12\).* start=3 is"):
        method.check_alignment(3, 20, 3)
    with pytest.raises(ValueError, match=r"start=5 and stop=18"):
        method.check_alignment(5, 18, 3)
    with pytest.raises(ValueError, match="sample range"):
        method.check_alignment(0, N_SAMPLES + 1, 3)
    method.check_alignment(5, 18, 12)  # one sample per forward for 12 images


@pytest.mark.parametrize("name", METHODS)
def test_aligned_splits_merge_to_bitwise_the_single_run(name: str) -> None:
    method = make(name)
    images, targets = batch()
    single = method.accumulate(images, targets, 0, N_SAMPLES)
    m = PER_FORWARD
    for bounds in ([0, m, 5 * m, N_SAMPLES], [0, 2 * m, 3 * m, 11 * m, N_SAMPLES], [0, 11 * m, N_SAMPLES]):
        method.check_alignment(bounds[0], bounds[-1], len(images))
        partials = [method.accumulate(images, targets, a, b) for a, b in zip(bounds, bounds[1:])]
        merged = method.merge(partials[::-1])
        assert_partials_equal(merged, single)
        assert torch.equal(method.finalize(merged), method.finalize(single))
    assert torch.equal(method.finalize(single), method.explain(images, targets))


@pytest.mark.parametrize("name", METHODS)
def test_misaligned_splits_agree_within_float32(name: str) -> None:
    method = make(name)
    images, targets = batch()
    bounds = [0, 1, 6, 31, N_SAMPLES]
    merged = method.merge([method.accumulate(images, targets, a, b) for a, b in zip(bounds, bounds[1:])])
    torch.testing.assert_close(method.finalize(merged), method.explain(images, targets), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", METHODS)
def test_steps_yield_running_totals_that_resume_bitwise(name: str) -> None:
    method = make(name)
    images, targets = batch()
    start = PER_FORWARD
    yields = list(method.steps(images, targets, start, N_SAMPLES))
    assert [position for _, position in yields] == [*range(2 * PER_FORWARD, N_SAMPLES, PER_FORWARD), N_SAMPLES]
    final = yields[-1][0]
    assert_partials_equal(final, method.accumulate(images, targets, start, N_SAMPLES))
    for total, position in yields[:: len(yields) // 3]:
        assert_partials_equal(total, method.accumulate(images, targets, start, position))
        saved = Partial({k: v.clone() for k, v in total.sums.items()}, {k: v.clone() for k, v in total.constants.items()})
        resumed = list(method.steps(images, targets, start, N_SAMPLES, resume=saved, position=position))
        assert resumed[0][1] == min(position + PER_FORWARD, N_SAMPLES)
        assert_partials_equal(resumed[-1][0], final)


@pytest.mark.parametrize("name", METHODS)
def test_yielded_totals_are_never_modified(name: str) -> None:
    method = make(name)
    images, targets = batch()
    snapshots, yielded = [], []
    for total, _ in method.steps(images, targets, 0, 5 * PER_FORWARD):
        yielded.append(total)
        snapshots.append({k: v.clone() for k, v in total.sums.items()})
    assert len({id(total) for total in yielded}) == len(yielded) == 5
    for total, snapshot in zip(yielded, snapshots):
        assert all(torch.equal(total.sums[key], value) for key, value in snapshot.items())
    key = "sum_w" if name == "lime" else "weighted"
    assert not torch.equal(yielded[0].sums[key], yielded[-1].sums[key])


@pytest.mark.parametrize("name", METHODS)
def test_steps_with_nothing_left_yield_the_total_once(name: str) -> None:
    method = make(name)
    images, targets = batch()
    ((empty, position),) = method.steps(images, targets, 8, 8)
    assert position == 8 and all(not bool(value.any()) for value in empty.sums.values())
    total = method.accumulate(images, targets, 8, 16)
    ((resumed, position),) = method.steps(images, targets, 8, 16, resume=total, position=16)
    assert position == 16 and resumed.sums.keys() == total.sums.keys()
    assert_partials_equal(resumed, total)


def test_bad_resumes() -> None:
    method = make("lime")
    images, targets = batch()
    total = method.accumulate(images, targets, 0, 8)
    with pytest.raises(ValueError, match="resume and position go together"):
        method.steps(images, targets, 0, 20, resume=total)
    with pytest.raises(ValueError, match=r"position 6 is not a yielded position of samples 0\.\.20"):
        method.steps(images, targets, 0, 20, resume=total, position=6)
    with pytest.raises(ValueError, match="disagrees on 'segments'"):
        method.steps(images.flip(0), targets, 0, 20, resume=total, position=8)
    stale = Partial({k: from_fixed(v) for k, v in total.sums.items()}, total.constants)
    with pytest.raises(ValueError, match="does not match 'sum_w'"):
        method.steps(images, targets, 0, 20, resume=stale, position=8)
    with pytest.raises(ValueError, match="int64 fixed point, got torch.float64"):
        method.merge([total, stale])


def test_lime_segments_once_per_shard() -> None:
    segmenter = CountingSegmenter()
    method = make("lime", segmentation=segmenter)
    assert isinstance(method, Lime)
    images, targets = batch()
    yields = list(method.steps(images, targets, 0, N_SAMPLES))
    assert len(yields) == 12 and segmenter.calls == len(images)
    assert list(yields[-1][0].constants) == ["segments"]
    constants = method.prepare(images)
    assert set(constants) == {"segments", "fill"} and segmenter.calls == 2 * len(images)
    partial = method.accumulate(images, targets, 0, 2 * PER_FORWARD, constants=constants)
    resumed = list(method.steps(images, targets, 0, N_SAMPLES, resume=partial, position=8, constants=constants))
    assert segmenter.calls == 2 * len(images)
    assert_partials_equal(resumed[-1][0], yields[-1][0])


@pytest.mark.parametrize("name", METHODS)
def test_built_without_a_model_merges_and_finalizes(name: str) -> None:
    method = make(name)
    images, targets = batch()
    partials = [method.accumulate(images, targets, 0, 8), method.accumulate(images, targets, 8, N_SAMPLES)]
    offline = build_method(name, None, **params(name))
    assert isinstance(offline, SampledExplainer)
    merged = offline.merge(partials)
    assert torch.equal(offline.finalize(merged), method.explain(images, targets))
    with pytest.raises(RuntimeError, match="built with model=None"):
        offline.accumulate(images, targets, 0, 8)


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_the_forward_loop_makes_no_host_transfer(name: str, device: str) -> None:
    """The draws are made once, before the loop; every forward batch then only slices device tensors
    (on CUDA also no synchronization at all)."""
    method = build_method(name, make_tiny_cam_net().to(device), **params(name))
    assert isinstance(method, SampledExplainer)
    images, targets = (tensor.to(device) for tensor in batch())
    steps = method.steps(images, targets, 0, N_SAMPLES)
    with HostSyncs() as syncs:
        walked = sum(1 for _ in steps)
    assert walked == -(-N_SAMPLES // PER_FORWARD) and syncs.calls == []
