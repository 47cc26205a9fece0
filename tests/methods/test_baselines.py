"""The random and centre baselines: independent computations, shard independence, the registry."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.methods import build_method, method_class
from pipeline.methods.centre import DEFAULT_CENTRE_SIGMA, CentreBias
from pipeline.methods.random_map import RandomMap
from tests.methods.helpers import seeded_batch
from tests.tiny_experiment import ConfigFactory, one_thread


def test_random_map_is_a_function_of_seed_and_image_content() -> None:
    images, targets = seeded_batch(4, [0, 1, 2, 0])
    explainer = build_method("random", nn.Identity(), seed=7)
    maps = explainer.explain(images, targets)
    assert maps.shape == (4, 32, 32) and maps.dtype == torch.float32
    assert float(maps.min()) >= 0 and float(maps.max()) < 1
    # another shard: other images around it, another position, another target
    alone = explainer.explain(images[2:3], torch.tensor([1]))
    torch.testing.assert_close(alone[0], maps[2], rtol=0, atol=0)
    reordered = explainer.explain(images.flip(0), targets)
    torch.testing.assert_close(reordered.flip(0), maps, rtol=0, atol=0)
    # different images and different seeds give unrelated maps
    assert abs(np.corrcoef(maps[0].flatten(), maps[1].flatten())[0, 1]) < 0.15
    other_seed = RandomMap(nn.Identity(), seed=8).explain(images, targets)
    assert abs(np.corrcoef(maps[0].flatten(), other_seed[0].flatten())[0, 1]) < 0.15


def test_random_map_is_uniform() -> None:
    images, targets = seeded_batch(5, [0] * 8)
    values = RandomMap(nn.Identity()).explain(images, targets).flatten().double().numpy()
    histogram, _ = np.histogram(values, bins=10, range=(0, 1))
    expected = len(values) / 10  # 819.2 per bin: a 5-sigma band is about +-143
    assert np.all(np.abs(histogram - expected) < 5 * math.sqrt(expected))


def test_centre_equals_a_plain_gaussian() -> None:
    images = torch.zeros(2, 3, 12, 20)
    maps = CentreBias(nn.Identity()).explain(images, torch.tensor([0, 1]))
    assert maps.shape == (2, 12, 20) and maps.dtype == torch.float32
    expected = np.empty((12, 20))
    for y in range(12):
        for x in range(20):
            zy = (y - 5.5) / (DEFAULT_CENTRE_SIGMA * 12)
            zx = (x - 9.5) / (DEFAULT_CENTRE_SIGMA * 20)
            expected[y, x] = math.exp(-(zy * zy + zx * zx) / 2)
    for b in range(2):
        np.testing.assert_allclose(maps[b].numpy(), expected, rtol=0, atol=1e-7)
    narrow = build_method("centre", nn.Identity(), sigma=0.1).explain(images, torch.tensor([0, 1]))
    assert float(narrow[0, 0, 0]) < float(maps[0, 0, 0])


def test_registry_and_validation() -> None:
    assert method_class("random") is RandomMap and method_class("centre") is CentreBias
    for bad in (0, -0.5, float("nan"), True):
        with pytest.raises(ValueError, match="sigma"):
            CentreBias(nn.Identity(), sigma=bad)
    with pytest.raises(ValueError, match="seed"):
        RandomMap(nn.Identity(), seed=-1)
    images, _ = seeded_batch(0, [0, 1])
    with pytest.raises(ValueError, match="targets"):
        RandomMap(nn.Identity()).explain(images, torch.tensor([0]))


def test_baselines_run_through_shards_metrics_and_tables(make_config: ConfigFactory, tmp_path: Path) -> None:
    from pipeline.analysis import load_run
    from pipeline.config import parse_config
    from pipeline.launching import run_local
    from pipeline.rundir import plan_run
    from pipeline.stages import reduce_run

    random_maps = []
    for images_per_shard in (5, 2):
        raw = make_config()
        raw["methods"] = [{"name": "random"}, {"name": "centre"}]
        raw["sharding"]["images_per_shard"] = images_per_shard
        run_dir = tmp_path / f"run_{images_per_shard}"
        with one_thread():
            plan_run(parse_config(raw), run_dir)
            assert run_local(run_dir, progress=False) == {}
            reduce_run(run_dir, progress=False)
        run = load_run(run_dir)
        assert set(run.metrics["method"]) == {"random", "centre"}
        assert set(run.metrics["metric"]) == {"insertion", "deletion", "pcc"}
        centre = run.maps("centre")
        assert np.all(centre == centre[:1])
        random_maps.append(run.maps("random"))
    # the random map of an image does not depend on how the images were sharded
    np.testing.assert_array_equal(random_maps[0], random_maps[1])
    assert not np.array_equal(random_maps[0][0], random_maps[0][1])
