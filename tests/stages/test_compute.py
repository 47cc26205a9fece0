"""The config's compute section: forward precision by autocast, channels-last layout, and
how bfloat16 changes RISE maps and their Insertion/Deletion AUCs on the demo model."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline.config import ComputeConfig, ConfigError, ExperimentConfig, config_dict, parse_config
from pipeline.demo_model import ensure_shapes_checkpoint, load_shapes_net
from pipeline.methods import build_method
from pipeline.metrics import deletion, insertion
from pipeline.models import ModelError
from pipeline.stages.context import apply_compute


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def test_default_compute_is_float32_and_left_out_of_the_saved_config(make_config) -> None:  # type: ignore[no-untyped-def]
    raw = make_config()
    config = parse_config(raw, source="test")
    assert config.compute == ComputeConfig() and config.compute.precision == "float32"
    assert "compute" not in config_dict(config)
    raw["compute"] = {"precision": "bfloat16", "channels_last": True, "loader_workers": 2}
    changed = parse_config(raw, source="test")
    assert config_dict(changed)["compute"] == raw["compute"]
    assert ExperimentConfig.model_validate(config_dict(changed)) == changed


@pytest.mark.parametrize("compute", [{"precision": "half"}, {"loader_workers": -1}, {"loader_workers": "many"}])
def test_bad_compute(make_config, compute: dict[str, object]) -> None:  # type: ignore[no-untyped-def]
    raw = make_config()
    raw["compute"] = compute
    with pytest.raises(ConfigError, match="compute"):
        parse_config(raw, source="test")


def test_bfloat16_autocasts_only_the_forward_and_keeps_module_names() -> None:
    model = apply_compute(small_net(), ComputeConfig(precision="bfloat16", channels_last=True), torch.device("cpu"))
    assert [name for name, _ in model.named_modules()] == [name for name, _ in small_net().named_modules()]
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert model(torch.randn(2, 3, 8, 8)).dtype == torch.bfloat16
    assert (torch.randn(2, 2) @ torch.randn(2, 2)).dtype == torch.float32  # outside the forward: float32
    with pytest.raises(ModelError, match="CUDA"):
        apply_compute(small_net(), ComputeConfig(precision="float16"), torch.device("cpu"))


def test_a_deep_copy_of_an_autocast_model_runs_its_own_weights() -> None:
    """The randomization test re-initializes a deep copy: its forward must not call the original's."""
    model = apply_compute(small_net(), ComputeConfig(precision="bfloat16"), torch.device("cpu"))
    duplicate = copy.deepcopy(model)
    with torch.no_grad():
        duplicate[-1].bias.fill_(100.0)
        images = torch.rand(2, 3, 8, 8)
        assert (model(images) < 50).all() and (duplicate(images) > 50).all()
        assert duplicate(images).dtype == torch.bfloat16


def test_what_bfloat16_changes_in_rise_maps_and_aucs(tmp_path: Path) -> None:
    """On the demo's shapes network (briefly trained), RISE maps under bfloat16 correlate with the
    float32 maps and Insertion/Deletion AUCs move little; the numbers are printed (pytest -s) for the docs."""
    checkpoint = ensure_shapes_checkpoint(tmp_path, n_per_class=6, image_size=32, epochs=2)
    torch.manual_seed(0)
    images = torch.randn(4, 3, 32, 32)
    results = {}
    for precision in ("float32", "bfloat16"):
        model = apply_compute(load_shapes_net(checkpoint).eval(), ComputeConfig(precision=precision),
                              torch.device("cpu"))
        targets = torch.tensor([0, 1, 2, 3])
        maps = build_method("rise", model, n_masks=256, grid_size=4, batch_size=64).explain(images, targets)
        auc_in, _ = insertion(model, images, maps, targets, step=32)
        auc_del, _ = deletion(model, images, maps, targets, step=32)
        assert maps.dtype == torch.float32 and auc_in.dtype == torch.float32
        results[precision] = (maps, auc_in, auc_del)
    (maps32, in32, del32), (maps16, in16, del16) = results["float32"], results["bfloat16"]
    correlation = float(torch.corrcoef(torch.stack([maps32.flatten(), maps16.flatten()]))[0, 1])
    insertion_change, deletion_change = float((in16 - in32).abs().max()), float((del16 - del32).abs().max())
    print(f"bf16 vs fp32: map correlation {correlation:.4f}, largest AUC change: insertion "
          f"{insertion_change:.4f}, deletion {deletion_change:.4f}")
    assert correlation > 0.9 and insertion_change < 0.05 and deletion_change < 0.05
