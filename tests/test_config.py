"""pipeline.config: loading, path resolution, error messages, method checks, round-trip."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from pipeline.config import (
    ConfigError,
    ExperimentConfig,
    config_dict,
    config_hash,
    load_config,
    parse_config,
    save_config,
)
from pipeline.methods import METHODS
from tests.tiny_experiment import ConfigFactory, YamlWriter


def _problems(error: pytest.ExceptionInfo[ConfigError]) -> list[str]:
    """The problem lines of a ConfigError message (the first line is the header)."""
    header, *lines = str(error.value).splitlines()
    assert header.endswith(f"{len(lines)} problem{'s' if len(lines) > 1 else ''}"), header
    return [line.strip() for line in lines]


def _reject(raw: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as error:
        parse_config(raw)
    return _problems(error)


def test_valid_config_loads_with_defaults(make_config: ConfigFactory, write_yaml: YamlWriter) -> None:
    raw = make_config()
    config = load_config(write_yaml(raw))
    assert isinstance(config, ExperimentConfig)
    assert config.name == "tiny"
    assert config.data.root == Path(raw["data"]["root"])
    assert config.data.image_size == (32, 32)
    assert config.data.mean == (0.485, 0.456, 0.406)
    assert config.data.std == (0.229, 0.224, 0.225)
    assert config.model.kwargs == {"width": 4}
    assert [m.label for m in config.methods] == ["gradcam", "rise"]
    assert config.methods[0].layers == ["layer2", "layer3"]
    assert config.methods[1].params == {"n_masks": 64, "grid_size": 4, "batch_size": 5}
    assert [m.name for m in config.metrics] == ["insertion", "deletion", "pcc"]
    assert (config.sharding.images_per_shard, config.sharding.samples_per_shard) == (5, 32)
    assert (config.target, config.device, config.seed) == ("predicted", "cpu", 0)


def test_default_metrics_are_insertion_and_deletion(make_config: ConfigFactory) -> None:
    raw = make_config()
    del raw["metrics"]
    assert [m.name for m in parse_config(raw).metrics] == ["insertion", "deletion"]


def test_image_size_int_means_square(make_config: ConfigFactory) -> None:
    raw = make_config()
    raw["data"]["image_size"] = [24, 40]
    assert parse_config(raw).data.image_size == (24, 40)
    raw["data"]["image_size"] = 48
    assert parse_config(raw).data.image_size == (48, 48)


def test_relative_paths_resolve_against_the_yaml_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "configs" / "nested"
    folder.mkdir(parents=True)
    raw = {
        "data": {"root": "../images", "gt_dir": "gaze", "subset": {"split_file": "splits/val.txt"}},
        "model": {"arch": "resnet18", "checkpoint": "../../models/m.pt"},
        "methods": [{"name": "rise"}],
    }
    path = folder / "experiment.yaml"
    path.write_text(yaml.safe_dump(raw))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the current folder must not matter
    config = load_config(Path("..") / "configs" / "nested" / "experiment.yaml")
    assert config.data.root == tmp_path / "configs" / "images"
    assert config.data.gt_dir == folder / "gaze"
    assert config.data.subset.split_file == folder / "splits" / "val.txt"
    assert config.model.checkpoint == tmp_path / "models" / "m.pt"
    absolute = tmp_path / "abs" / "images"
    raw["data"]["root"] = str(absolute)
    path.write_text(yaml.safe_dump(raw))
    assert load_config(path).data.root == absolute


def test_home_relative_paths_are_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    raw = {"data": {"root": "~/images"}, "model": {"arch": "resnet18"}, "methods": [{"name": "rise"}]}
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert load_config(path).data.root == tmp_path / "home" / "images"


@pytest.mark.parametrize(
    ("section", "typo", "path", "valid"),
    [
        (None, "nmae", "nmae", "name, data, model, methods, metrics, target, sharding, results, device, compute, seed, plugins"),
        ("data", "imagesize", "data.imagesize",
         "root, manifest, gt_dir, image_size, resize, resize_size, crop_size, mean, std, class_names, subset"),
        ("model", "chekpoint", "model.chekpoint", "arch, factory, kwargs, num_classes, checkpoint, weights"),
        ("methods", "layer", "methods[0].layer", "name, id, layers, params"),
        ("metrics", "parms", "metrics[2].parms", "name, params"),
        ("sharding", "image_per_shard", "sharding.image_per_shard", "images_per_shard, samples_per_shard"),
        ("subset", "frist_n", "data.subset.frist_n", "split_file, classes, first_n"),
    ],
)
def test_a_misspelled_key_lists_the_valid_keys_with_its_path(
    make_config: ConfigFactory, section: str | None, typo: str, path: str, valid: str
) -> None:
    raw = make_config()
    target = {
        None: raw,
        "data": raw["data"],
        "model": raw["model"],
        "methods": raw["methods"][0],
        "metrics": raw["metrics"][2],
        "sharding": raw["sharding"],
        "subset": raw["data"].setdefault("subset", {}),
    }[section]
    target[typo] = 1
    assert _reject(raw) == [f"{path}: unknown key {typo!r}; valid keys: {valid}"]


@pytest.mark.parametrize(
    ("change", "path", "reason"),
    [
        (lambda r: r["sharding"].update(images_per_shard=0), "sharding.images_per_shard",
         "greater than or equal to 1 (got 0)"),
        (lambda r: r["sharding"].update(samples_per_shard="many"), "sharding.samples_per_shard",
         "valid integer"),
        (lambda r: r["data"].update(image_size=4), "data.image_size", "at least 8x8"),
        (lambda r: r["data"].update(std=[0.2, 0.0, 0.2]), "data.std", "every std must be > 0"),
        (lambda r: r["data"].update(subset={"first_n": 0}), "data.subset.first_n", "greater than or equal to 1"),
        (lambda r: r["data"].update(manifest="x.csv"), "data", "exactly one of `root`"),
        (lambda r: r["model"].update(arch="resnet18"), "model", "exactly one of `arch`"),
        (lambda r: r["model"].update(factory="no_colon"), "model", "package.module:callable"),
        (lambda r: r["model"].update(num_classes=0), "model.num_classes", "greater than or equal to 1"),
        (lambda r: r.update(device="gpu"), "device", "auto, cpu, cuda or cuda:N, got 'gpu'"),
        (lambda r: r.update(target="label_or_so"), "target", "'predicted' or 'label'"),
        (lambda r: r.update(methods=[]), "methods", "at least 1 item"),
        (lambda r: r.pop("model"), "model", "missing (required)"),
        (lambda r: r["methods"][1].update(id="a/b"), "methods[1]", "must be non-empty and contain no '/'"),
        (lambda r: r["metrics"].append({"name": "ssim2"}), "metrics[3]", "unknown metric 'ssim2'; known metrics"),
        (lambda r: r["metrics"][0]["params"].update(stpe=3), "metrics[0]",
         "metric 'insertion' has no parameter stpe; valid parameters: step, substrate, blur, batch_size"),
        (lambda r: r["metrics"].append({"name": "pcc"}), "(top level)", "metric(s) listed twice: pcc"),
    ],
)
def test_a_wrong_value_names_its_field_and_the_reason(
    make_config: ConfigFactory, change: Callable[[dict[str, Any]], object], path: str, reason: str
) -> None:
    raw = make_config()
    change(raw)
    problems = _reject(raw)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{path}: "), problems
    assert reason in problems[0], problems


def test_every_problem_is_reported_at_once(make_config: ConfigFactory) -> None:
    raw = make_config()
    raw["sharding"]["images_per_shard"] = -3
    raw["data"]["colour"] = "rgb"
    raw["methods"][1]["params"]["n_maks"] = 10
    problems = _reject(raw)
    assert len(problems) == 3
    assert sorted(p.split(":")[0] for p in problems) == ["data.colour", "methods[1]", "sharding.images_per_shard"]


def test_an_unknown_method_lists_the_known_methods(make_config: ConfigFactory) -> None:
    raw = make_config()
    raw["methods"].append({"name": "gradcam++", "layers": ["layer3"]})
    (problem,) = _reject(raw)
    assert problem.startswith("methods[2]: unknown method 'gradcam++'; known methods: ")
    listed = problem.split("known methods: ")[1].split(", ")
    assert listed[: len(METHODS)] == list(METHODS)  # the built-ins first, then plug-ins found so far
    assert {"rise", "gradcam", "lime", "scorecam"} <= set(listed)


def test_an_unknown_method_parameter_lists_the_valid_ones(make_config: ConfigFactory) -> None:
    raw = make_config()
    raw["methods"][1]["params"] = {"n_masks": 10, "masks": 3, "p": 0.5}
    (problem,) = _reject(raw)
    assert problem == (
        "methods[1]: method 'rise' has no parameter masks, p; "
        "valid parameters: n_masks, grid_size, p1, seed, batch_size"
    )


def test_the_layer_parameter_belongs_in_layers(make_config: ConfigFactory) -> None:
    raw = make_config()
    raw["methods"][0]["params"] = {"layer": "layer3"}
    (problem,) = _reject(raw)
    assert problem.startswith("methods[0]: method 'gradcam' has no parameter layer")


def test_cam_layers_may_be_omitted_but_not_empty_and_others_take_none(make_config: ConfigFactory) -> None:
    raw = make_config()
    del raw["methods"][0]["layers"]
    assert parse_config(raw).methods[0].layers is None
    raw["methods"][0]["layers"] = []
    raw["methods"][1]["layers"] = ["layer3"]
    assert _reject(raw) == [
        "methods[0]: method 'gradcam': give at least one layer, or omit `layers` for the default",
        "methods[1]: method 'rise' takes no `layers`: it is not a CAM method",
    ]


def test_duplicate_method_labels_are_rejected(make_config: ConfigFactory) -> None:
    raw = make_config()
    raw["methods"].append({"name": "rise", "params": {"n_masks": 32}})
    (problem,) = _reject(raw)
    assert "methods share the label(s) rise" in problem
    raw["methods"][1]["id"] = "gradcam"  # an id may also clash with another entry's name
    raw["methods"][2]["id"] = "rise-32"
    (problem,) = _reject(raw)
    assert "methods share the label(s) gradcam" in problem
    raw["methods"][1]["id"] = "rise-64"
    config = parse_config(raw)
    assert [m.label for m in config.methods] == ["gradcam", "rise-64", "rise-32"]
    assert config.method("rise-32").params == {"n_masks": 32}
    with pytest.raises(KeyError, match="entries: gradcam, rise-64, rise-32"):
        config.method("rise")


def test_unreadable_or_invalid_files_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError, match="absent.yaml: cannot be read"):
        load_config(missing)
    broken = tmp_path / "broken.yaml"
    broken.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        load_config(broken)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="list.yaml: expected a mapping at the top level, got list"):
        load_config(listing)


def test_problems_in_a_file_name_the_file(make_config: ConfigFactory, write_yaml: YamlWriter) -> None:
    raw = make_config()
    raw["seed"] = "zero"
    path = write_yaml(raw, "bad.yaml")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(error.value).startswith(f"{path}: 1 problem\n")
    assert _problems(error)[0].startswith("seed: ")


def test_save_and_load_round_trip(make_config: ConfigFactory, tmp_path: Path) -> None:
    raw = make_config()
    raw["data"]["subset"] = {"classes": ["alpha", "gamma"], "first_n": 7}
    raw["methods"][1]["id"] = "rise-64"
    raw["seed"] = 5
    raw["target"] = "label"
    config = parse_config(raw)
    saved = tmp_path / "elsewhere" / "config.yaml"
    saved.parent.mkdir()
    save_config(config, saved)
    loaded = load_config(saved)
    assert loaded == config
    assert config_hash(loaded) == config_hash(config)
    raw["seed"] = 6  # the hash sees every field
    assert config_hash(parse_config(raw)) != config_hash(config)


def test_a_default_config_hashes_as_before_the_resize_keys_existed() -> None:
    raw = {"data": {"root": "/data/images", "gt_dir": "/data/gt", "image_size": 64, "subset": {"first_n": 3}},
           "model": {"arch": "resnet18", "num_classes": 3},
           "methods": [{"name": "gradcam", "layers": ["layer4"]}, {"name": "rise", "params": {"n_masks": 64}}]}
    config = parse_config(raw)
    assert "resize" not in config_dict(config)["data"]
    assert config_hash(config) == "92db8a9be552bf7f"  # the hash this config had before `data.resize`


def test_the_centre_crop_takes_image_size_or_crop_size_as_the_input_size(
    make_config: ConfigFactory, tmp_path: Path
) -> None:
    raw = make_config()
    raw["data"].update(resize="shorter_side_then_centre_crop", resize_size=40)
    data = parse_config(raw).data
    assert (data.resize_size, data.crop_size, data.image_size) == (40, (32, 32), (32, 32))
    del raw["data"]["image_size"]
    raw["data"]["crop_size"] = [24, 36]
    config = parse_config(raw)
    assert (config.data.crop_size, config.data.image_size) == ((24, 36), (24, 36))
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config
    assert config_hash(config) != config_hash(parse_config(make_config()))


@pytest.mark.parametrize(("data", "problem"), [
    ({"resize": "shorter_side_then_centre_crop"}, "needs resize_size"),
    ({"resize_size": 40}, "resize_size and crop_size apply only to `resize: shorter_side_then_centre_crop`"),
    ({"crop_size": 24}, "resize_size and crop_size apply only"),
    ({"resize": "shorter_side_then_centre_crop", "resize_size": 40, "crop_size": 24},
     r"crop_size \[24, 24\] is the model's input size: it must equal image_size \[32, 32\]"),
    ({"resize": "shorter_side_then_centre_crop", "resize_size": 30},
     r"crop_size \[32, 32\] does not fit in every image resized to a shorter side of resize_size 30"),
])
def test_resize_settings_that_cannot_work_are_refused(
    make_config: ConfigFactory, data: dict[str, object], problem: str
) -> None:
    raw = make_config()
    raw["data"].update(data)
    with pytest.raises(ConfigError, match=problem):
        parse_config(raw)


def test_class_names_must_list_every_output_of_the_model(make_config: ConfigFactory) -> None:
    raw = make_config()
    raw["data"]["class_names"] = ["alpha", "beta"]
    with pytest.raises(ConfigError, match="data.class_names has 2 names but model.num_classes is 3"):
        parse_config(raw)
