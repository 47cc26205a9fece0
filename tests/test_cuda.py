"""On a CUDA device (every test skips without one): every built-in method and metric gives the CPU's
result within a stated tolerance, RISE's partial sums are bitwise the same however the samples are
split on the device, a CAM method's pass gives the logits of a forward without gradients bit for bit (an
explain shard takes its predicted classes from there), prefetched images arrive pinned, and a run of the
demo config completes there.

Tolerance: TF32 is switched off, so the device differs from the CPU only by the order of float32
sums: maps and metric values agree within ``atol=1e-4, rtol=1e-3`` (maps lie in [0, 1]); Extremal
Perturbation, an optimization of a few steps, within ``2e-3``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from pipeline.config import ComputeConfig, DataConfig, parse_config
from pipeline.data import discover_images
from pipeline.demo import IMAGE_SIZE as DEMO_SIZE, demo_config
from pipeline.demo_data import make_shapes_dataset
from pipeline.demo_model import ensure_shapes_checkpoint
from pipeline.launching import run_local
from pipeline.methods import METHODS, SampledExplainer, build_method
from pipeline.metrics import BUILTIN_METRICS, metric_spec
from pipeline.models import apply_compute
from pipeline.rundir import plan_run
from pipeline.run_dir import RunDir
from pipeline.stages import reduce_run
from pipeline.stages.prefetch import ImagePrefetcher
from pipeline.store import read_shard
from tests.methods.helpers import make_tiny_cam_net, seeded_batch
from tests.tiny_experiment import IMAGE_SIZE, ImageTree

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

LAYER = "features.3"
PARAMS: dict[str, dict[str, Any]] = {
    "rise": {"n_masks": 40, "grid_size": 4, "batch_size": 12, "seed": 3},
    "rise-gaussian": {"n_masks": 40, "grid_size": 4, "batch_size": 12, "seed": 3},
    "lime": {"n_samples": 40, "segmentation": "slic", "n_segments": 10, "batch_size": 12, "seed": 3},
    "extremal": {"step": 4, "sigma": 8.0, "iterations": 4},
    "random": {"seed": 7},
}
TOLERANCE = {"atol": 1e-4, "rtol": 1e-3}


@pytest.fixture(autouse=True)
def _no_tf32() -> Iterator[None]:
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _params(name: str) -> dict[str, Any]:
    from pipeline.methods import CamExplainer, method_class

    return {**PARAMS.get(name, {}), **({"layer": LAYER} if issubclass(method_class(name), CamExplainer) else {})}


@pytest.mark.parametrize("name", METHODS)
def test_every_method_gives_the_cpu_maps(name: str) -> None:
    images, targets = seeded_batch(1, [1, 3])
    on_cpu = build_method(name, make_tiny_cam_net(), **_params(name)).explain(images, targets)
    on_gpu = build_method(name, make_tiny_cam_net().cuda(), **_params(name)).explain(images.cuda(), targets.cuda())
    assert on_gpu.device.type == "cuda" and on_gpu.dtype == torch.float32
    tolerance = {"atol": 2e-3, "rtol": 2e-3} if name == "extremal" else TOLERANCE
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, **tolerance)


@pytest.mark.parametrize("name", BUILTIN_METRICS)
def test_every_metric_gives_the_cpu_values(name: str) -> None:
    spec = metric_spec(name)
    images, targets = seeded_batch(2, [0, 2, 4])
    maps = torch.rand(3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(5))
    gt = torch.rand(3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(6))
    params = {"step": 64} if name in ("insertion", "deletion") else {}
    on_cpu = spec.values(spec.call(make_tiny_cam_net(), images, maps, targets, gt, params))
    on_gpu = spec.values(spec.call(make_tiny_cam_net().cuda(), images.cuda(), maps.cuda(), targets.cuda(),
                                   gt.cuda(), params))
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, equal_nan=True, **TOLERANCE)


@pytest.mark.parametrize("name", ["rise", "rise-gaussian", "lime"])
def test_partial_sums_on_the_device_are_bitwise_the_same_however_split(name: str) -> None:
    method = build_method(name, make_tiny_cam_net().cuda(), **PARAMS[name])
    assert isinstance(method, SampledExplainer)
    images, targets = (t.cuda() for t in seeded_batch(3, [1, 4, 0]))
    unit = method.samples_per_forward(len(images))
    single = method.accumulate(images, targets, 0, method.n_samples)
    for cuts in ([0, unit, 5 * unit, method.n_samples], [0, 3 * unit, method.n_samples]):
        merged = method.merge([method.accumulate(images, targets, a, b) for a, b in zip(cuts, cuts[1:])][::-1])
        for key, value in single.sums.items():
            assert value.device.type == "cuda" and torch.equal(merged.sums[key], value), key
        assert torch.equal(method.finalize(merged), method.finalize(single))


@pytest.mark.parametrize("precision", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("name", ["gradcam", "fem", "scorecam"])
def test_a_cam_pass_gives_the_logits_of_a_forward_without_gradients(name: str, precision: str) -> None:
    """A CAM explain shard's predicted classes come from its own pass (see tests/methods/test_cam_common.py)."""
    model = apply_compute(make_tiny_cam_net(), ComputeConfig(precision=precision), torch.device("cuda"))
    images = seeded_batch(3, [1, 4, 0])[0].cuda()
    with torch.no_grad():
        plain = model(images)
    assert torch.equal(build_method(name, model, layer=LAYER).explain_pass(images).logits, plain)  # type: ignore[attr-defined]


def test_prefetched_images_are_pinned_for_the_copy(image_tree: ImageTree) -> None:
    data = DataConfig(root=image_tree.root, image_size=(IMAGE_SIZE, IMAGE_SIZE))
    records = list(discover_images(data).records)[:4]
    prefetcher = ImagePrefetcher(data, 2, pin=True)
    prefetcher.schedule([("a", records)])
    assert prefetcher.take("a", records).images.is_pinned()
    assert prefetcher.take("not scheduled", records).images.is_pinned()


def test_the_demo_config_runs_on_cuda(tmp_path: Path) -> None:
    """The demo's methods and metrics, on a briefly trained demo network and two images per class."""
    checkpoint = ensure_shapes_checkpoint(tmp_path, n_per_class=8, image_size=DEMO_SIZE, epochs=1)
    make_shapes_dataset(tmp_path / "data", n_per_class=2, image_size=DEMO_SIZE, seed=2024, split=False)
    raw = {**demo_config(tmp_path / "data", checkpoint), "device": "cuda"}
    run_dir = tmp_path / "run"
    plan = plan_run(parse_config(raw), run_dir)
    assert run_local(run_dir, progress=False) == {}
    reduce_run(run_dir, progress=False)
    assert (run_dir / "results.h5").is_file()
    folder = RunDir(run_dir)
    assert {read_shard(folder.shard(s.id)).attrs["device"] for s in plan.shards} == {"cuda"}
