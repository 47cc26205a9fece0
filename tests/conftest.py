"""Fixtures of the core tests: the tiny experiment of :mod:`tests.tiny_experiment`.

Session fixtures (``image_tree``, ``checkpoint``, ``finished_run``) are shared and
must not be changed; ``tree_copy`` and ``run_copy`` are private copies a test may change.
"""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from pipeline.config import parse_config
from tests.tiny_experiment import (
    ConfigFactory,
    FinishedRun,
    ImageTree,
    add_broken_image,
    one_thread,
    tiny_config,
    write_checkpoint,
    write_image_tree,
    YamlWriter,
)


@pytest.fixture(autouse=True)
def _core_tests_on_one_thread(request: pytest.FixtureRequest) -> Iterator[None]:
    """The core tests (files directly in tests/) run torch on one thread; other folders are left alone."""
    if Path(request.node.path).parent != Path(__file__).parent:
        yield
        return
    with one_thread():
        yield


@pytest.fixture(scope="session")
def image_tree(tmp_path_factory: pytest.TempPathFactory) -> ImageTree:
    """The clean tree (read-only: use ``tree_copy`` to change it)."""
    return write_image_tree(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The untrained model's checkpoint (read-only)."""
    return write_checkpoint(tmp_path_factory.mktemp("model") / "tiny.pt")


@pytest.fixture
def make_config(image_tree: ImageTree, checkpoint: Path) -> ConfigFactory:
    """``make_config(root=None, gt_dir=..., checkpoint_path=None)``: a fresh config dict of the tiny experiment."""

    def build(root: Path | None = None, gt_dir: Path | None = image_tree.gt_dir,
              checkpoint_path: Path | None = None) -> dict[str, Any]:
        return tiny_config(root or image_tree.root, gt_dir, checkpoint_path or checkpoint)

    return build


@pytest.fixture
def write_yaml(tmp_path: Path) -> YamlWriter:
    """``write_yaml(config_dict, name="experiment.yaml")``: the dict as a YAML file in the test's folder."""

    def write(raw: dict[str, Any], name: str = "experiment.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        return path

    return write


@pytest.fixture
def tree_copy(image_tree: ImageTree, tmp_path: Path) -> ImageTree:
    """A private copy of the clean tree that a test may change."""
    base = tmp_path / "data"
    shutil.copytree(image_tree.root, base / "images")
    shutil.copytree(image_tree.gt_dir, base / "gt")
    return dataclasses.replace(
        image_tree,
        root=base / "images",
        gt_dir=base / "gt",
        gt_files={k: base / "gt" / p.relative_to(image_tree.gt_dir) for k, p in image_tree.gt_files.items()},
    )


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory: pytest.TempPathFactory, image_tree: ImageTree, checkpoint: Path) -> FinishedRun:
    """The tiny experiment on the tree plus one unreadable image, planned, run and reduced once."""
    from pipeline.launching import run_local
    from pipeline.stages import reduce_run
    from pipeline.rundir import plan_run

    base = tmp_path_factory.mktemp("finished")
    shutil.copytree(image_tree.root, base / "images")
    broken = add_broken_image(base / "images")
    raw = tiny_config(base / "images", image_tree.gt_dir, checkpoint)
    run_dir = base / "run"
    with one_thread():
        plan_run(parse_config(raw), run_dir)
        assert run_local(run_dir, progress=False) == {}
        reduce_run(run_dir, progress=False)
    return FinishedRun(run_dir, raw, dataclasses.replace(image_tree, root=base / "images"), broken)


@pytest.fixture
def run_copy(finished_run: FinishedRun, tmp_path: Path) -> Path:
    """A private copy of the finished run's folder."""
    target = tmp_path / "run_copy"
    shutil.copytree(finished_run.run_dir, target)
    return target
