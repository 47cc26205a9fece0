"""Images decoded ahead by loader workers: the same tensors as decoding in this process, in or out
of the scheduled order, and a run whose maps and sums do not depend on the number of workers."""
from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from pipeline.config import DataConfig, parse_config
from pipeline.data import ImageRecord, discover_images, load_batch
from pipeline.launching import run_local
from pipeline.methods.lime import Lime
from pipeline.rundir import plan_run
from pipeline.run_dir import RunDir
from pipeline.stages import prefetch
from pipeline.stages.prefetch import ImagePrefetcher
from tests.tiny_experiment import IMAGE_SIZE, ConfigFactory, ImageTree, add_broken_image


def _chunks(tree: ImageTree) -> tuple[DataConfig, list[list[ImageRecord]]]:
    data = DataConfig(root=tree.root, image_size=(IMAGE_SIZE, IMAGE_SIZE))
    records = list(discover_images(data).records)
    return data, [records[start : start + 4] for start in range(0, len(records), 4)]


def _assert_same(taken: tuple[list[ImageRecord], torch.Tensor, dict[str, str]],
                 expected: tuple[list[ImageRecord], torch.Tensor, dict[str, str]]) -> None:
    assert taken[0] == expected[0] and taken[2] == expected[2]
    assert torch.equal(taken[1], expected[1])


@pytest.mark.parametrize("workers", [0, 2])
def test_scheduled_chunks_are_the_images_of_load_batch_in_any_order(tree_copy: ImageTree, workers: int) -> None:
    broken = add_broken_image(tree_copy.root)
    data, chunks = _chunks(tree_copy)
    assert any(broken in {r.key for r in chunk} for chunk in chunks)
    prefetcher = ImagePrefetcher(data, workers)
    prefetcher.schedule([(f"shard{i}", chunk) for i, chunk in enumerate(chunks[:4])])
    order = [1, 0, 3, 2, 3]  # shard1 first (shard0 is dropped), shard0 again, shard3, shard2 (dropped), again
    for index in order:
        taken = prefetcher.take(f"shard{index}", chunks[index])
        _assert_same((taken.records, taken.images, taken.failures), load_batch(chunks[index], data))
    last = len(chunks) - 1
    taken = prefetcher.take("not scheduled", chunks[last])
    _assert_same((taken.records, taken.images, taken.failures), load_batch(chunks[last], data))
    prefetcher.close()


def test_shards_taken_in_the_scheduled_order_were_all_decoded_ahead(
    tree_copy: ImageTree, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, chunks = _chunks(tree_copy)
    decoded_here: list[int] = []
    monkeypatch.setattr(prefetch, "load_images", lambda records, *a, **k: decoded_here.append(len(records)))
    prefetcher = ImagePrefetcher(data, 2)
    prefetcher.schedule([(f"shard{i}", chunk) for i, chunk in enumerate(chunks)])
    for index, chunk in enumerate(chunks):
        assert torch.equal(prefetcher.take(f"shard{index}", chunk).images, load_batch(chunk, data)[1])
    assert decoded_here == []


def test_host_constants_come_with_the_chunk_and_a_failing_method_leaves_them_to_the_shard(
    tree_copy: ImageTree
) -> None:
    data, chunks = _chunks(tree_copy)
    lime = {"n_samples": 8, "segmentation": "slic", "n_segments": 4, "batch_size": "auto"}
    prefetcher = ImagePrefetcher(data, 2)
    prefetcher.schedule([("lime", chunks[0]), ("broken", chunks[1]), ("plain", chunks[2])],
                        methods={"lime": ("lime", lime), "broken": ("lime", {**lime, "n_segments": -3})})
    taken = prefetcher.take("lime", chunks[0])
    expected = Lime(None, **{**lime, "batch_size": 1}).segment(taken.images)
    assert taken.host.keys() == {"segments"} and torch.equal(taken.host["segments"], expected)
    broken, plain = prefetcher.take("broken", chunks[1]), prefetcher.take("plain", chunks[2])
    assert broken.host == {} and plain.host == {}
    assert torch.equal(broken.images, load_batch(chunks[1], data)[1])
    prefetcher.close()


def test_a_schedule_replaces_the_previous_one(tree_copy: ImageTree) -> None:
    data, chunks = _chunks(tree_copy)
    prefetcher = ImagePrefetcher(data, 2)
    prefetcher.schedule([("a", chunks[0]), ("b", chunks[1])])
    prefetcher.schedule([("b", chunks[2])])  # the same shard id, now with other records
    taken = prefetcher.take("b", chunks[2])
    assert taken.records == load_batch(chunks[2], data)[0]
    prefetcher.close()


def _outputs(run_dir: Path) -> dict[str, dict[str, np.ndarray]]:
    """Every dataset of every committed shard, by shard id and dataset path."""
    folder = RunDir(run_dir)
    outputs = {}
    for shard_id in sorted(folder.committed()):
        arrays: dict[str, np.ndarray] = {}
        with h5py.File(folder.shard(shard_id), "r") as handle:
            handle.visititems(lambda name, item: arrays.__setitem__(name, item[()])
                              if isinstance(item, h5py.Dataset) else None)
        outputs[shard_id] = arrays
    return outputs


def test_a_run_is_bitwise_the_same_with_0_and_2_loader_workers(
    make_config: ConfigFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Grad-CAM maps, RISE's and LIME's fixed-point sums and every metric: equal bit for bit; with
    workers, LIME's segmentation is computed in them, never in the process that runs the shards."""
    log = tmp_path / "segmented-by"
    original = Lime.segment

    def segment(self: Lime, images: torch.Tensor) -> torch.Tensor:
        with log.open("a") as handle:  # the workers are forked: a file reaches this process
            handle.write(f"{os.getpid()}\n")
        return original(self, images)

    monkeypatch.setattr(Lime, "segment", segment)
    outputs = []
    for workers in (0, 2):
        raw = make_config()
        raw["methods"].append(
            {"name": "lime", "params": {"n_samples": 24, "segmentation": "slic", "n_segments": 8, "batch_size": 10}})
        raw["compute"] = {"loader_workers": workers}
        run_dir = tmp_path / f"workers{workers}"
        plan = plan_run(parse_config(raw), run_dir)
        log.unlink(missing_ok=True)
        assert run_local(run_dir, progress=False) == {}
        pids = log.read_text().split()
        assert len(pids) == len([s for s in plan.stage("explain") if s.method == "lime"])
        assert all((pid == str(os.getpid())) == (workers == 0) for pid in pids), (workers, pids)
        outputs.append(_outputs(run_dir))
    zero, two = outputs
    assert zero.keys() == two.keys() and len(zero) > 0
    compared = 0
    for shard_id, arrays in zero.items():
        assert arrays.keys() == two[shard_id].keys(), shard_id
        for name, array in arrays.items():
            if array.dtype.kind in "fiub":
                np.testing.assert_array_equal(array, two[shard_id][name], err_msg=f"{shard_id}: {name}")
                compared += 1
    assert compared > len(zero)
