"""Planning: the work of a run as shards with deterministic ids.

Two stages of shards, both planned up front:

- ``explain``: one method entry on one image chunk (``sharding.images_per_shard``
  images, in key order); all layers of a CAM entry come from the same pass. A sampled
  method (RISE, LIME) is further split by sample range (``sharding.samples_per_shard``).
- ``score``: one method entry and layer on one image chunk for one metric group
  (``perturbation``: the metrics that run the model; ``groundtruth``: those that
  compare with a ground-truth map). It reads the explain shards of its chunk, listed
  in ``after``.

A shard's id is a digest of everything that determines its output: the method's
resolved parameters, the image keys, the sample range, the preprocessing, the
target rule and the model's digest (for score shards: the metric parameters and
the ids it reads). Planning twice gives the same ids; any change gives new ones.

``plan.json`` (written by :meth:`Plan.write`) holds the config digest, the model
digest, the images (key, path, label, ground truth) and the shards.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

from .config import ExperimentConfig, MethodConfig, config_hash
from .data import ImageRecord, ImageSet

__all__ = [
    "Shard",
    "Plan",
    "make_plan",
    "method_params",
    "sample_count",
    "NO_LAYER",
    "PLAN_FILE",
]

#: the layer name used for methods that have no layer (RISE, LIME, ...)
NO_LAYER = "-"
PLAN_FILE = "plan.json"

Stage = Literal["explain", "score"]


@dataclasses.dataclass(frozen=True)
class Shard:
    id: str
    stage: Stage
    method: str
    layers: tuple[str, ...]
    images: tuple[int, int]
    samples: tuple[int, int] | None = None
    metrics: tuple[str, ...] = ()
    after: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Shard":
        return cls(
            id=data["id"],
            stage=data["stage"],
            method=data["method"],
            layers=tuple(data["layers"]),
            images=tuple(data["images"]),  # type: ignore[arg-type]
            samples=tuple(data["samples"]) if data.get("samples") else None,  # type: ignore[arg-type]
            metrics=tuple(data.get("metrics", ())),
            after=tuple(data.get("after", ())),
        )

    def describe(self) -> str:
        """A short human description, for logs and status."""
        what = f"{self.stage} {self.method}"
        if self.layers and self.layers != (NO_LAYER,):
            what += f" [{', '.join(self.layers)}]"
        what += f" images {self.images[0]}-{self.images[1] - 1}"
        if self.samples:
            what += f" samples {self.samples[0]}-{self.samples[1] - 1}"
        if self.metrics:
            what += f" metrics {', '.join(self.metrics)}"
        return f"{self.id} ({what})"


@dataclasses.dataclass(frozen=True)
class Plan:
    config_hash: str
    model_digest: str
    records: tuple[ImageRecord, ...]
    class_names: tuple[str, ...]
    shards: tuple[Shard, ...]

    @property
    def keys(self) -> list[str]:
        return [r.key for r in self.records]

    @functools.cached_property
    def _by_id(self) -> dict[str, Shard]:
        return {s.id: s for s in self.shards}

    def shard(self, shard_id: str) -> Shard:
        try:
            return self._by_id[shard_id]
        except KeyError:
            raise KeyError(f"shard {shard_id} is not in this plan") from None

    def stage(self, stage: Stage) -> list[Shard]:
        return [s for s in self.shards if s.stage == stage]

    def chunks(self) -> list[tuple[int, int]]:
        """The image chunks of the plan, in order."""
        return sorted({s.images for s in self.shards})

    def write(self, path: Path) -> None:
        """Write ``plan.json`` atomically."""
        data = {
            "config_hash": self.config_hash,
            "model_digest": self.model_digest,
            "class_names": list(self.class_names),
            "images": [
                {"key": r.key, "path": str(r.path), "label": r.label, "gt": str(r.gt_path) if r.gt_path else None}
                for r in self.records
            ],
            "shards": [s.to_json() for s in self.shards],
        }
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)

    @classmethod
    def read(cls, path: Path) -> "Plan":
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path} does not exist: plan the run first (xai-pipeline plan)") from None
        records = tuple(
            ImageRecord(i["key"], Path(i["path"]), int(i["label"]), Path(i["gt"]) if i.get("gt") else None)
            for i in data["images"]
        )
        return cls(
            config_hash=data["config_hash"],
            model_digest=data["model_digest"],
            records=records,
            class_names=tuple(data["class_names"]),
            shards=tuple(Shard.from_json(s) for s in data["shards"]),
        )


def _digest(payload: Any) -> str:
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def method_params(config: ExperimentConfig, entry: MethodConfig) -> dict[str, Any]:
    """The entry's parameters, with the experiment's seed for stochastic methods that take one."""
    from .methods import method_parameters

    params = dict(entry.params)
    if "seed" in method_parameters(entry.name):
        params.setdefault("seed", config.seed)
    return params


def sample_count(entry: MethodConfig) -> int | None:
    """How many random samples a sampled method draws (None for other methods)."""
    from .methods import SampledExplainer, method_class, method_parameters

    if not issubclass(method_class(entry.name), SampledExplainer):
        return None
    parameters = method_parameters(entry.name)
    name = next(n for n in ("n_masks", "n_samples") if n in parameters)
    return int(entry.params.get(name, parameters[name].default))


def _ranges(total: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, total, size):
        yield start, min(start + size, total)


def _metric_groups(config: ExperimentConfig) -> dict[str, list[str]]:
    from .metrics import METRICS

    groups: dict[str, list[str]] = {}
    for metric in config.metrics:
        groups.setdefault(METRICS[metric.name].group, []).append(metric.name)
    return groups


def make_plan(config: ExperimentConfig, images: ImageSet, model_digest: str) -> Plan:
    """Every shard of the run, in a deterministic order."""
    records = images.records
    keys = [r.key for r in records]
    chunks = list(_ranges(len(records), config.sharding.images_per_shard))
    common = {
        "model": model_digest,
        "image_size": config.data.image_size,
        "mean": config.data.mean,
        "std": config.data.std,
        "target": config.target,
    }
    metric_params = {m.name: m.params for m in config.metrics}
    shards: list[Shard] = []
    for entry in config.methods:
        layers = tuple(entry.layers) if entry.layers else (NO_LAYER,)
        method = {"label": entry.label, "name": entry.name, "params": method_params(config, entry), "layers": layers}
        count = sample_count(entry)
        sample_ranges: Sequence[tuple[int, int] | None] = (
            list(_ranges(count, config.sharding.samples_per_shard)) if count else [None]
        )
        for chunk in chunks:
            chunk_keys = keys[chunk[0] : chunk[1]]
            explain_ids = []
            for samples in sample_ranges:
                shard_id = _digest({**common, "method": method, "keys": chunk_keys, "samples": samples})
                explain_ids.append(shard_id)
                shards.append(Shard(shard_id, "explain", entry.label, layers, chunk, samples))
            for layer in layers:
                for group, names in _metric_groups(config).items():
                    params = {n: metric_params[n] for n in names}
                    shard_id = _digest({"metrics": params, "layer": layer, "after": explain_ids})
                    shards.append(
                        Shard(shard_id, "score", entry.label, (layer,), chunk, None, tuple(names), tuple(explain_ids))
                    )
    return Plan(config_hash(config), model_digest, records, images.class_names, tuple(shards))
