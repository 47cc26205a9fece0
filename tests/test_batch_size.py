"""``batch_size: auto``: the CPU rule, the out-of-memory back-off (a fake one on CPU, the real one on
CUDA), sampled batches cut at divisors of the shard size, and a run that records its choice and
whose sharded RISE sums equal one unsharded call at the chosen batch."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.batch_size import (
    HEADROOM,
    REFINEMENTS,
    choose_batch_size,
    cpu_batch_size,
    largest_batch,
    sampled_batch_size,
    with_batch_size,
)
from pipeline.config import parse_config
from pipeline.data import load_image
from pipeline.demo_model import ShapesNet
from pipeline.launching import run_local
from pipeline.methods import build_method
from pipeline.planning import Plan
from pipeline.rundir import plan_run
from pipeline.run_dir import RunDir
from pipeline.stages.merge import merge_chunk
from pipeline.store import read_shard
from tests.tiny_experiment import IMAGE_SIZE, ConfigFactory


def test_the_cpu_rule_is_a_megapixel_per_thread() -> None:
    assert cpu_batch_size((224, 224), threads=2) == 2 * 2**20 // (224 * 224) == 41
    assert cpu_batch_size((64, 64), threads=8) == 2048
    assert cpu_batch_size((64, 64), threads=8, cap=100) == 100
    assert cpu_batch_size((4096, 4096), threads=1) == 1


def test_with_batch_size_replaces_only_auto() -> None:
    assert with_batch_size({"batch_size": "auto", "n_masks": 8}, 3) == {"batch_size": 3, "n_masks": 8}
    assert with_batch_size({"batch_size": 7}, 3) == {"batch_size": 7}
    assert with_batch_size({}, 3) == {}


class FakeDevice:
    """A trial that runs out of memory above ``limit`` inputs, as a CUDA forward would."""

    def __init__(self, limit: int) -> None:
        self.limit, self.tried = limit, []

    def __call__(self, batch: int) -> None:
        self.tried.append(batch)
        if batch > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory (fake): {batch} inputs")


@pytest.mark.parametrize("limit", [1, 2, 37, 300, 1000, 4095])
def test_the_search_backs_off_to_within_a_sixteenth_of_the_largest_batch_that_fits(limit: int) -> None:
    device = FakeDevice(limit)
    found = largest_batch(device, 4096)
    assert found <= limit and found >= limit * (1 - 2.0**-REFINEMENTS)
    powers = [b for b in device.tried if b & (b - 1) == 0]
    assert powers == [2**k for k in range(len(powers))]  # doubling from 1 up to the first failure
    assert len(device.tried) <= 13 + REFINEMENTS  # bounded: log2(4096) + 1 doublings, then the bisections


def test_the_search_stops_at_the_cap_and_fails_when_nothing_fits() -> None:
    device = FakeDevice(10_000)
    assert largest_batch(device, 100) == 100 and max(device.tried) == 100
    with pytest.raises(MemoryError, match="not even one input"):
        largest_batch(FakeDevice(0), 100)


def test_the_search_lets_other_errors_through() -> None:
    def broken(batch: int) -> None:
        raise ValueError("shape mismatch")

    with pytest.raises(ValueError, match="shape mismatch"):
        largest_batch(broken, 64)


@pytest.mark.parametrize("batch, n_images, unit", [(400, 16, 1000), (512, 16, 1000), (512, 16, 1024), (10, 16, 1000),
                                                   (97, 5, 32), (5000, 5, 7), (3, 3, 1)])
def test_a_sampled_batch_is_whole_images_times_the_largest_divisor_of_the_unit(batch: int, n_images: int,
                                                                                  unit: int) -> None:
    chosen = sampled_batch_size(batch, n_images, unit)
    images = min(n_images, batch)
    fitting = [images * d for d in range(1, unit + 1) if unit % d == 0 and images * d <= batch]
    assert chosen == max(fitting)
    explainer = build_method("rise", None, n_masks=unit, grid_size=2, batch_size=chosen)
    assert unit % explainer.samples_per_forward(n_images) == 0  # every shard cut is a forward-batch cut


def test_choose_on_cpu_follows_the_rule() -> None:
    model = nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten())
    chosen, how = choose_batch_size(model, torch.zeros(2, 3, 32, 32), cap=50)
    assert chosen == cpu_batch_size((32, 32), torch.get_num_threads(), 50) and how.startswith("cpu rule")


@pytest.mark.gpu
def test_cuda_search_finds_the_memory_limit() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    free, total = torch.cuda.mem_get_info()
    per_input = total // 500  # about 500 inputs fill the device

    def allocate(batch: int) -> None:
        torch.empty(batch * per_input, dtype=torch.uint8, device="cuda")

    found = largest_batch(allocate, 4096)
    assert 0.9 * free / per_input * (1 - 2.0**-REFINEMENTS) <= found <= total / per_input

    class Hungry(nn.Module):
        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            allocate(inputs.shape[0])
            return inputs.flatten(1)[:, :4]

    chosen, how = choose_batch_size(Hungry(), torch.zeros(2, 3, 8, 8, device="cuda"))
    assert how.startswith("cuda search") and 1 <= chosen <= HEADROOM * total / per_input


def _images(plan: Plan, keys: list[str]) -> torch.Tensor:
    records = {r.key: r for r in plan.records}
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    return torch.stack([load_image(records[k].path, (IMAGE_SIZE, IMAGE_SIZE), mean, std) for k in keys])


def test_a_run_with_auto_records_its_batches_and_its_sharded_sums_equal_one_call(
    make_config: ConfigFactory, checkpoint: Path, tmp_path: Path
) -> None:
    raw = make_config()
    raw["methods"] = [{"name": "rise", "params": {"n_masks": 64, "grid_size": 4, "batch_size": "auto"}}]
    raw["metrics"] = [{"name": "insertion", "params": {"step": 64, "batch_size": "auto"}}]
    raw["sharding"] = {"images_per_shard": 5, "samples_per_shard": 24}
    run_dir = tmp_path / "run"
    plan = plan_run(parse_config(raw), run_dir)
    explain = plan.stage("explain")
    assert {s.samples for s in explain} == {(0, 24), (24, 48), (48, 64)}  # exact multiples of samples_per_shard
    assert run_local(run_dir, progress=False) == {}
    folder = RunDir(run_dir)
    for shard in plan.shards:
        attrs = read_shard(folder.shard(shard.id)).attrs
        assert attrs["batch_size_auto"].startswith("cpu rule") and attrs["batch_size"] >= 1
    chunk = plan.chunks()[0]
    shards = [s for s in explain if s.images == chunk]
    chosen = {read_shard(folder.shard(s.id)).attrs["batch_size"] for s in shards}
    assert len(chosen) == 1  # every shard of the chunk chose the same batch
    merged = merge_chunk(folder, parse_config(raw), shards)
    model = ShapesNet(num_classes=3, width=4)
    model.load_state_dict(torch.load(checkpoint, weights_only=True))
    images = _images(plan, merged.images.keys)
    rise = build_method("rise", model.eval(), n_masks=64, grid_size=4, batch_size=chosen.pop(), seed=0)
    expected = rise.explain(images, torch.from_numpy(merged.images.targets)).numpy()
    np.testing.assert_array_equal(merged.maps["-"], expected)
