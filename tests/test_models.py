"""pipeline.models: factories, torchvision architectures, checkpoints, digests, devices."""
from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline.config import ModelConfig
from pipeline.demo_model import ShapesNet
from pipeline.models import ModelError, build_model, load_checkpoint, model_digest, select_device
from tests.tiny_experiment import write_checkpoint

FACTORY = "pipeline.demo_model:ShapesNet"


def _shapes_config(**fields: object) -> ModelConfig:
    return ModelConfig(factory=FACTORY, kwargs={"width": 4}, num_classes=3, **fields)  # type: ignore[arg-type]


def _reference_state(seed: int = 3, num_classes: int = 3) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return ShapesNet(num_classes=num_classes, width=4).state_dict()


def _assert_loaded(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


def test_factory_model_is_built_in_eval_mode() -> None:
    model = build_model(_shapes_config())
    assert isinstance(model, ShapesNet)
    assert not model.training
    assert model.fc.out_features == 3 and model.fc.in_features == 16
    assert {"layer1", "layer2", "layer3", "fc"} <= dict(model.named_modules()).keys()
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 3)


def test_torchvision_architecture_is_built_without_weights() -> None:
    model = build_model(ModelConfig(arch="resnet18", num_classes=3))
    assert type(model).__name__ == "ResNet"
    assert not model.training
    assert model.fc.out_features == 3
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 3)


def test_builder_errors_name_the_problem() -> None:
    with pytest.raises(ModelError, match="model.arch: unknown torchvision architecture 'resnet17'; known: .*resnet18"):
        build_model(ModelConfig(arch="resnet17"))
    with pytest.raises(ModelError, match="model.factory: cannot import 'no_such_package.models'"):
        build_model(ModelConfig(factory="no_such_package.models:build"))
    with pytest.raises(ModelError, match="model.factory: 'pipeline.demo_model' has no callable 'Absent'"):
        build_model(ModelConfig(factory="pipeline.demo_model:Absent"))
    with pytest.raises(ModelError, match="rejected its arguments .*'depth': 3"):
        build_model(ModelConfig(factory=FACTORY, kwargs={"depth": 3}))
    with pytest.raises(ModelError, match="returned a tuple, not a torch module"):
        build_model(ModelConfig(factory="builtins:tuple"))


@pytest.mark.parametrize("layout", ["state_dict", "wrapped_state_dict", "wrapped_model", "data_parallel"])
def test_checkpoint_layouts_load(tmp_path: Path, layout: str) -> None:
    state = _reference_state()
    saved = {
        "state_dict": state,
        "wrapped_state_dict": {"state_dict": state, "epoch": 3},
        "wrapped_model": {"model": state, "optimizer": {}},
        "data_parallel": {f"module.{k}": v for k, v in state.items()},
    }[layout]
    path = tmp_path / "model.pt"
    torch.save(saved, path)
    model = build_model(_shapes_config(checkpoint=path))
    _assert_loaded(model, state)
    fresh = _reference_state(seed=4)
    assert not torch.equal(fresh["fc.weight"], state["fc.weight"])  # so the check above means something


def test_a_checkpoint_of_another_class_count_fails_naming_file_keys_and_shapes(tmp_path: Path) -> None:
    path = write_checkpoint(tmp_path / "four_classes.pt", num_classes=4)
    with pytest.raises(ModelError) as error:
        build_model(_shapes_config(checkpoint=path))
    message = str(error.value)
    assert message.startswith(f"checkpoint {path} does not fit the model:")
    assert "fc.weight: checkpoint (4, 16) vs model (3, 16)" in message
    assert "fc.bias: checkpoint (4,) vs model (3,)" in message
    assert "layer1" not in message  # only the mismatching keys are listed


def test_missing_and_unexpected_keys_are_listed(tmp_path: Path) -> None:
    state = _reference_state()
    del state["fc.bias"]
    state["extra.weight"] = torch.zeros(2)
    path = tmp_path / "model.pt"
    torch.save(state, path)
    model = ShapesNet(num_classes=3, width=4)
    with pytest.raises(ModelError) as error:
        load_checkpoint(model, path)
    assert "missing keys: fc.bias" in str(error.value)
    assert "unexpected keys: extra.weight" in str(error.value)


def test_unusable_checkpoint_files(tmp_path: Path) -> None:
    model = ShapesNet(num_classes=3, width=4)
    with pytest.raises(ModelError, match=f"model.checkpoint: {tmp_path / 'absent.pt'} does not exist"):
        load_checkpoint(model, tmp_path / "absent.pt")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(ModelError, match="tensor.pt holds a Tensor, not a state_dict"):
        load_checkpoint(model, tmp_path / "tensor.pt")
    torch.save({"layer": nn.Linear(2, 2)}, tmp_path / "pickled.pt")  # a module is refused by weights_only
    with pytest.raises(ModelError, match=r"pickled.pt holds pickled Python objects .* save model.state_dict\(\)"):
        load_checkpoint(model, tmp_path / "pickled.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="garbage.pt cannot be loaded"):
        load_checkpoint(model, tmp_path / "garbage.pt")


def test_model_digest_follows_the_checkpoint_bytes(tmp_path: Path) -> None:
    first = write_checkpoint(tmp_path / "a" / "model.pt", seed=0)
    digest = model_digest(_shapes_config(checkpoint=first))
    assert digest == model_digest(_shapes_config(checkpoint=first))
    copy = tmp_path / "b" / "copy.pt"
    copy.parent.mkdir()
    shutil.copyfile(first, copy)
    assert model_digest(_shapes_config(checkpoint=copy)) == digest  # same bytes elsewhere
    first.touch()
    assert model_digest(_shapes_config(checkpoint=first)) == digest  # a new mtime is no change
    write_checkpoint(first, seed=1)
    changed = model_digest(_shapes_config(checkpoint=first))
    assert changed != digest
    assert model_digest(_shapes_config(checkpoint=copy)) == digest
    assert model_digest(_shapes_config()) != digest  # no checkpoint
    widened = ModelConfig(factory=FACTORY, kwargs={"width": 8}, num_classes=3, checkpoint=copy)
    assert model_digest(widened) != digest
    with pytest.raises(ModelError, match="does not exist"):
        model_digest(_shapes_config(checkpoint=tmp_path / "absent.pt"))


def test_select_device() -> None:
    assert select_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert select_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="device 'cuda:1' asked for, but CUDA is not available"):
            select_device("cuda:1")


def test_a_whole_pickled_model_gets_the_command_that_saves_its_state_dict(tmp_path: Path) -> None:
    torch.manual_seed(0)
    whole = ShapesNet(num_classes=3, width=4)
    path = tmp_path / "whole.pt"
    torch.save(whole, path)
    with pytest.raises(ModelError, match=r"save model\.state_dict\(\) instead") as error:
        load_checkpoint(ShapesNet(num_classes=3, width=4), path)
    message = str(error.value)
    command = next(line.strip() for line in message.splitlines() if line.strip().startswith("python -c"))
    subprocess.run([sys.executable, "-c", shlex.split(command)[2]], check=True, cwd=Path(__file__).parents[1])
    target = tmp_path / "whole_state_dict.pt"
    assert message.endswith(f"then set model.checkpoint: {target}")
    model = ShapesNet(num_classes=3, width=4)
    load_checkpoint(model, target)
    for name, value in whole.state_dict().items():
        assert torch.equal(model.state_dict()[name], value)
