"""Experiment configuration: one YAML file describes a run.

Schema (every key optional unless marked *; relative paths are relative to the YAML file)::

    name: experiment                 # a label for tables and reports
    data:                            # *
      root: images/                  # an ImageFolder tree (class per sub-folder) ...
      manifest: images.csv           # ... or a CSV with columns path,label[,gt]
      gt_dir: gaze/                  # ground-truth maps matched by relative path and stem
      image_size: [224, 224]         # the model's input size (or one int)
      resize: squash                 # squash: every image resized to image_size (aspect ratio lost);
                                     # shorter_side_then_centre_crop: torchvision's Resize(resize_size)
                                     # then CenterCrop(crop_size); ground-truth maps likewise
      resize_size: 256               # centre crop only: the shorter side's length after resizing
      crop_size: 224                 # centre crop only: [h, w] or one int (default image_size; it
                                     # is the model's input size, so image_size follows it)
      mean: [0.485, 0.456, 0.406]    # normalization (ImageNet by default)
      std: [0.229, 0.224, 0.225]
      class_names: [...]             # the model's classes in output order: names for integer labels
                                     # of a manifest; for an ImageFolder tree, each folder's label is
                                     # its name's index here (needed when num_classes differs from the
                                     # number of class folders)
      subset:                        # applied in this order
        split_file: val.txt          # keys or relative paths listed one per line
        classes: [a, b]              # only these classes
        first_n: 100                 # the first N images (in key order) of each class
    model:                           # *
      arch: resnet50                 # a torchvision architecture ...
      factory: my_pkg.models:build   # ... or a `module:callable`
      kwargs: {}                     # extra arguments of the factory / architecture
      num_classes: 10
      checkpoint: model.pt           # a state_dict, loaded with weights_only=True
      weights: IMAGENET1K_V2         # torchvision weights (needs a download)
    methods:                         # * a list of
      - name: gradcam                # a registered method, `package.module:Class` or an entry point
        id: gradcam                  # its label in tables (default: the name; unique)
        layers: [layer3, layer4]     # CAM methods only: dotted module names (`xai-pipeline layers
                                     # CONFIG` lists them); default: the family's last spatial block
        params: {}                   # the method's parameters (`xai-pipeline methods`; CAM: reshape;
                                     # batch_size: auto chooses it on the device, see pipeline/batch_size.py)
    metrics:                         # default: insertion and deletion
      - name: insertion              # a registered metric, `package.module:function` or an entry point
        params: {step: 224}          # (batch_size: auto, as for methods)
      - name: randomization          # re-explains with the top `steps` blocks re-initialized (default:
        params: {steps: 2, seed: 0}  # all; blocks: [module names] instead of the top-level children)
    target: predicted                # or `label`: the class that is explained and scored
    sharding: {images_per_shard: 16, samples_per_shard: 1000}
    results: {maps: all}             # maps kept in results.h5: all, none (metrics only) or
                                     # sample (`sample_size` images drawn with `seed`)
    device: auto                     # auto (CUDA when there is one), cpu, cuda, cuda:1
    compute:                         # how the model runs (omitted from the saved config when default)
      precision: float32             # or bfloat16 / float16: autocast of the model's forwards;
                                     # sums, maps and metrics stay float32/float64 (float16: CUDA)
      channels_last: false           # the model and its inputs in channels-last memory layout
      loader_workers: auto           # image decoding processes; auto: SLURM_CPUS_PER_TASK - 1,
                                     # else min(4, CPUs); 0 decodes in the main process
    seed: 0                          # default seed of stochastic methods (>= 0)
    plugins: [my_pkg.xai]            # modules imported first: methods and metrics their decorators
                                     # register are then known here and on every worker

:func:`load_config` validates everything at once and raises :class:`ConfigError`
listing every problem with its field path; a misspelled key lists the valid keys.
"""
from __future__ import annotations

import importlib
import json
from collections import Counter
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .digests import json_digest
from .errors import PipelineError

__all__ = [
    "ConfigError",
    "DataConfig",
    "SubsetConfig",
    "ModelConfig",
    "MethodConfig",
    "MetricConfig",
    "ShardingConfig",
    "ResultsConfig",
    "ExperimentConfig",
    "ComputeConfig",
    "CENTRE_CROP",
    "load_config",
    "parse_config",
    "config_hash",
    "save_config",
    "config_dict",
    "format_validation_error",
    "validate_mapping",
    "read_yaml",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ConfigError(PipelineError, ValueError):
    """A configuration that cannot be used; the message lists every problem."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SubsetConfig(_Strict):
    split_file: Path | None = None
    classes: list[str] | None = None
    first_n: int | None = Field(default=None, ge=1)


#: the ``data.resize`` mode of torchvision's ``Resize(resize_size)`` followed by ``CenterCrop(crop_size)``
CENTRE_CROP = "shorter_side_then_centre_crop"


class DataConfig(_Strict):
    root: Path | None = None
    manifest: Path | None = None
    gt_dir: Path | None = None
    image_size: tuple[int, int] = (224, 224)
    resize: Literal["squash", "shorter_side_then_centre_crop"] = "squash"
    resize_size: int | None = Field(default=None, ge=8)
    crop_size: tuple[int, int] | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    class_names: list[str] | None = None
    subset: SubsetConfig = SubsetConfig()

    @model_validator(mode="before")
    @classmethod
    def _crop_is_the_input_size(cls, data: Any) -> Any:
        """Under the centre crop, ``crop_size`` defaults to ``image_size`` and ``image_size`` follows a given ``crop_size``."""
        if not (isinstance(data, dict) and data.get("resize") == CENTRE_CROP):
            return data
        if data.get("crop_size") is None:
            return {**data, "crop_size": data.get("image_size", cls.model_fields["image_size"].default)}
        if data.get("image_size") is None:
            return {**data, "image_size": data["crop_size"]}
        return data

    @field_validator("image_size", "crop_size", mode="before")
    @classmethod
    def _square(cls, value: Any) -> Any:
        return (value, value) if isinstance(value, int) else value

    @field_validator("image_size")
    @classmethod
    def _positive(cls, value: tuple[int, int]) -> tuple[int, int]:
        if min(value) < 8:
            raise ValueError(f"image size must be at least 8x8, got {list(value)}")
        return value

    @field_validator("std")
    @classmethod
    def _nonzero(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(value) <= 0:
            raise ValueError("every std must be > 0")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> "DataConfig":
        if (self.root is None) == (self.manifest is None):
            raise ValueError("give exactly one of `root` (an ImageFolder tree) or `manifest` (a CSV file)")
        return self

    @model_validator(mode="after")
    def _resize_sizes(self) -> "DataConfig":
        if self.resize == "squash":
            if self.resize_size is not None or self.crop_size is not None:
                raise ValueError(f"resize_size and crop_size apply only to `resize: {CENTRE_CROP}`")
            return self
        if self.resize_size is None:
            raise ValueError(f"`resize: {CENTRE_CROP}` needs resize_size (the shorter side's length)")
        assert self.crop_size is not None  # defaulted by _crop_is_the_input_size
        if self.crop_size != self.image_size:
            raise ValueError(f"crop_size {list(self.crop_size)} is the model's input size: it must equal "
                             f"image_size {list(self.image_size)} (give one of them)")
        if max(self.crop_size) > self.resize_size:
            raise ValueError(f"crop_size {list(self.crop_size)} does not fit in every image resized to a "
                             f"shorter side of resize_size {self.resize_size}")
        return self


class ModelConfig(_Strict):
    arch: str | None = None
    factory: str | None = None
    kwargs: dict[str, Any] = {}
    num_classes: int | None = Field(default=None, ge=1)
    checkpoint: Path | None = None
    weights: str | None = None

    @model_validator(mode="after")
    def _one_builder(self) -> "ModelConfig":
        if (self.arch is None) == (self.factory is None):
            raise ValueError("give exactly one of `arch` (a torchvision architecture) or `factory` (module:callable)")
        if self.factory is not None and self.factory.count(":") != 1:
            raise ValueError(f"factory must look like 'package.module:callable', got {self.factory!r}")
        return self


class MethodConfig(_Strict):
    name: str
    id: str | None = None
    layers: list[str] | None = None
    params: dict[str, Any] = {}

    @property
    def label(self) -> str:
        """The method entry's name in tables and in the results file."""
        return self.id or self.name

    @model_validator(mode="after")
    def _known(self) -> "MethodConfig":
        from .methods import CamExplainer, method_class, method_parameters

        method_class(self.name)
        valid = method_parameters(self.name)
        reserved = {"layer"}
        unknown = sorted(set(self.params) - (set(valid) - reserved))
        if unknown:
            choices = ", ".join(k for k in valid if k not in reserved)
            raise ValueError(f"method {self.name!r} has no parameter {', '.join(unknown)}; valid parameters: {choices}")
        is_cam = issubclass(method_class(self.name), CamExplainer)
        if is_cam and self.layers == []:
            raise ValueError(f"method {self.name!r}: give at least one layer, or omit `layers` for the default")
        if not is_cam and self.layers:
            raise ValueError(f"method {self.name!r} takes no `layers`: it is not a CAM method")
        if self.id is not None and ("/" in self.id or not self.id.strip()):
            raise ValueError(f"id {self.id!r} must be non-empty and contain no '/'")
        return self


class MetricConfig(_Strict):
    name: str
    params: dict[str, Any] = {}

    @model_validator(mode="after")
    def _known(self) -> "MetricConfig":
        from .metrics import metric_spec

        valid = metric_spec(self.name).parameters
        unknown = sorted(set(self.params) - set(valid))
        if unknown:
            raise ValueError(
                f"metric {self.name!r} has no parameter {', '.join(unknown)}; valid parameters: {', '.join(valid)}"
            )
        return self


class ShardingConfig(_Strict):
    images_per_shard: int = Field(default=16, ge=1)
    samples_per_shard: int = Field(default=1000, ge=1)


class ResultsConfig(_Strict):
    maps: Literal["all", "none", "sample"] = "all"
    sample_size: int = Field(default=64, ge=1)


def _default_metrics() -> list[MetricConfig]:
    return [MetricConfig(name="insertion"), MetricConfig(name="deletion")]


class ComputeConfig(_Strict):
    precision: Literal["float32", "bfloat16", "float16"] = "float32"
    channels_last: bool = False
    loader_workers: Literal["auto"] | int = Field(default="auto", union_mode="left_to_right")

    @field_validator("loader_workers")
    @classmethod
    def _workers(cls, value: Literal["auto"] | int) -> Literal["auto"] | int:
        if value != "auto" and (isinstance(value, bool) or value < 0):
            raise ValueError(f"loader_workers must be auto or an integer >= 0, got {value!r}")
        return value


class ExperimentConfig(_Strict):
    name: str = "experiment"
    data: DataConfig
    model: ModelConfig
    methods: list[MethodConfig] = Field(min_length=1)
    metrics: list[MetricConfig] = Field(default_factory=_default_metrics)
    target: Literal["predicted", "label"] = "predicted"
    sharding: ShardingConfig = ShardingConfig()
    results: ResultsConfig = ResultsConfig()
    device: str = "auto"
    compute: ComputeConfig = ComputeConfig()
    seed: int = Field(default=0, ge=0)
    plugins: list[str] = []

    @model_validator(mode="before")
    @classmethod
    def _import_plugins(cls, data: Any) -> Any:
        """Import the ``plugins`` modules first, so the methods and metrics they register with the
        decorators are known to this validation, in every process that loads the config."""
        plugins = data.get("plugins") if isinstance(data, dict) else None
        for index, module in enumerate(plugins if isinstance(plugins, list) else []):
            try:
                importlib.import_module(str(module))
            except ImportError as error:
                raise ValueError(f"plugins[{index}]: cannot import {module!r}: {error}") from None
        return data

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value not in ("auto", "cpu", "cuda") and not value.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {value!r}")
        return value

    @model_validator(mode="after")
    def _unique_labels(self) -> "ExperimentConfig":
        duplicated = sorted(k for k, n in Counter(m.label for m in self.methods).items() if n > 1)
        if duplicated:
            raise ValueError(f"methods share the label(s) {', '.join(duplicated)}: give each entry a distinct `id`")
        repeated = sorted(k for k, n in Counter(m.name for m in self.metrics).items() if n > 1)
        if repeated:
            raise ValueError(f"metric(s) listed twice: {', '.join(repeated)}")
        return self

    @model_validator(mode="after")
    def _class_count(self) -> "ExperimentConfig":
        names, outputs = self.data.class_names, self.model.num_classes
        if names is not None and outputs is not None and len(names) != outputs:
            raise ValueError(f"data.class_names has {len(names)} names but model.num_classes is {outputs}: "
                             "give the model's full class list, in output order")
        return self

    def method(self, label: str) -> MethodConfig:
        """The method entry whose label is ``label``."""
        for entry in self.methods:
            if entry.label == label:
                return entry
        raise KeyError(f"no method entry {label!r}; entries: {', '.join(m.label for m in self.methods)}")


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model class that owns the field at ``loc`` (for listing valid keys)."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(part)
        if field is None:
            return current
        annotation = field.annotation
        args = getattr(annotation, "__args__", ())
        candidates = [annotation, *args]
        current = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if current is None:
            nested = [a for c in args for a in getattr(c, "__args__", ())]
            current = next((c for c in nested if isinstance(c, type) and issubclass(c, BaseModel)), None)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _path(loc: tuple[Any, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def format_validation_error(error: ValidationError, model: type[BaseModel], source: str) -> str:
    """Every problem of ``error`` on its own line, with its field path."""
    lines = []
    for item in error.errors():
        loc = tuple(item["loc"])
        if item["type"] == "extra_forbidden":
            owner = _model_at(model, loc[:-1])
            valid = ", ".join(owner.model_fields) if owner else "?"
            lines.append(f"{_path(loc)}: unknown key {loc[-1]!r}; valid keys: {valid}")
        elif item["type"] == "missing":
            lines.append(f"{_path(loc)}: missing (required)")
        else:
            message = item["msg"].removeprefix("Value error, ")
            given = item.get("input")
            shown = "" if isinstance(given, dict) or given is None else f" (got {given!r})"
            lines.append(f"{_path(loc)}: {message}{shown}")
    count = len(lines)
    return f"{source}: {count} problem{'s' if count > 1 else ''}\n  " + "\n  ".join(lines)


def _resolve_paths(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    """A copy of the raw mapping with relative data/model paths made absolute against ``base``."""
    resolved = json.loads(json.dumps(raw, default=str))
    for section, keys in (("data", ("root", "manifest", "gt_dir")), ("model", ("checkpoint",))):
        block = resolved.get(section)
        if isinstance(block, dict):
            for key in keys:
                if isinstance(block.get(key), str):
                    block[key] = str((base / Path(block[key]).expanduser()).resolve())
    subset = (resolved.get("data") or {}).get("subset") if isinstance(resolved.get("data"), dict) else None
    if isinstance(subset, dict) and isinstance(subset.get("split_file"), str):
        subset["split_file"] = str((base / Path(subset["split_file"]).expanduser()).resolve())
    return resolved


Model = TypeVar("Model", bound=BaseModel)


def validate_mapping(model: type[Model], raw: Any, source: str, error: type[ConfigError] = ConfigError) -> Model:
    """Validate ``raw`` as ``model``; every problem is listed in one ``error`` naming ``source``."""
    if not isinstance(raw, dict):
        raise error(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        return model.model_validate(raw)
    except ValidationError as problems:
        raise error(format_validation_error(problems, model, source)) from None


def read_yaml(path: Path, error: type[ConfigError] = ConfigError) -> Any:
    """The parsed YAML file; an unreadable file or bad YAML raises ``error`` naming the file."""
    try:
        return yaml.safe_load(Path(path).read_text())
    except OSError as problem:
        raise error(f"{path}: cannot be read: {problem.strerror}") from None
    except yaml.YAMLError as problem:
        raise error(f"{path}: not valid YAML: {problem}") from None


def parse_config(raw: Any, *, source: str = "config", base: Path | None = None) -> ExperimentConfig:
    """Validate a mapping; relative paths are taken relative to ``base`` (default: the current folder)."""
    if isinstance(raw, dict):
        raw = _resolve_paths(raw, base or Path.cwd())
    return validate_mapping(ExperimentConfig, raw, source)


def load_config(path: str | Path) -> ExperimentConfig:
    """Read and validate an experiment YAML file."""
    path = Path(path)
    return parse_config(read_yaml(path), source=str(path), base=path.resolve().parent)


def config_dict(config: ExperimentConfig) -> dict[str, Any]:
    """The config as plain JSON-compatible data (paths as strings); a default ``compute`` section, the
    ``data.resize`` keys of the default ``squash`` and an empty ``plugins`` list are left out, so configs
    written before they existed keep their hash."""
    data = config.model_dump(mode="json")
    if config.compute == ComputeConfig():
        del data["compute"]
    if config.data.resize == "squash":
        for key in ("resize", "resize_size", "crop_size"):
            del data["data"][key]
    if not config.plugins:
        del data["plugins"]
    return data


def config_hash(config: ExperimentConfig) -> str:
    """A digest of the whole resolved config."""
    return json_digest(config_dict(config))


def save_config(config: ExperimentConfig, path: Path) -> None:
    """Write the resolved config as YAML (it loads back to an equal config)."""
    from .run_dir import atomic_write

    atomic_write(path, yaml.safe_dump(config_dict(config), sort_keys=False))
