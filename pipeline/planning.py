"""Planning: the work of a run as shards with deterministic ids.

Two stages of shards, both planned up front:

- ``explain``: one method entry on one image chunk (``sharding.images_per_shard``
  images, in key order); all layers of a CAM entry come from the same pass. A sampled
  method (RISE, LIME) is further split by sample range (``sharding.samples_per_shard``,
  rounded down to whole forward batches: see :func:`sample_ranges`; with ``batch_size: auto``
  exactly ``samples_per_shard``: see :mod:`pipeline.batch_size`).
- ``score``: one method entry and layer on one image chunk for one metric group
  (``perturbation``: the metrics that run the model; ``groundtruth``: those that
  compare with a ground-truth map). It reads the explain shards of its chunk, listed
  in ``after``.

A shard's id is a digest of everything that determines its output: the method's
resolved parameters, the image keys and their files' stamps (see :mod:`pipeline.data`),
the sample range, the preprocessing, the target rule (and the labels, under ``target: label``)
and the model's digest (for score
shards: the metric parameters and the ids it reads; for ground-truth metrics also the
stamps of the chunk's ground-truth maps). Planning twice gives the same ids; any change
gives new ones, and a method entry that did not change keeps its ids when another one
does. A changed image file gives new ids to the shards of its chunk only, a changed
ground-truth map to its chunk's ground-truth score shards only: planning again and
running computes exactly those (:func:`input_changes` says which inputs changed).

``plan.json`` (written by :meth:`Plan.write`, compact JSON) holds::

    config_hash, model_digest, class_names, fingerprint ("stat" or "sha256")
    images: {keys: [...], paths: [...], labels: [...], gt: [path or null, ...],
             stamps: [...], gt_stamps: [stamp or null, ...]}                  (columns)
    shards: {id: [...], stage: [...], method: [...], layers: [...], images: [...], samples: [...],
             metrics: [...], after: [...]}                                    (columns)

Reading it imports nothing heavy and builds the image records only when asked.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Literal, NamedTuple, Sequence

from .batch_size import with_batch_size
from .config import DataConfig, ExperimentConfig, MethodConfig, config_hash, read_yaml, validate_mapping
from .data import ImageRecord, ImageSet, discover_images
from .digests import json_digest
from .run_dir import RunDir, atomic_write

if TYPE_CHECKING:
    from .methods import SampledExplainer

__all__ = [
    "Shard",
    "Plan",
    "ImageColumns",
    "InputChanges",
    "input_changes",
    "make_plan",
    "method_params",
    "sampled_method",
    "sample_ranges",
    "NO_LAYER",
]

#: the layer name used for methods that have no layer (RISE, LIME, ...)
NO_LAYER = "-"

Stage = Literal["explain", "score"]


class Shard(NamedTuple):
    """One unit of work (an immutable tuple: tens of thousands are read in a fraction of a second)."""

    id: str
    stage: Stage
    method: str
    layers: tuple[str, ...]
    images: tuple[int, int]
    samples: tuple[int, int] | None = None
    metrics: tuple[str, ...] = ()
    after: tuple[str, ...] = ()

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
class ImageColumns:
    """The plan's images as columns (keys, paths, labels, ground-truth paths, the stamps of
    both files), in key order."""

    keys: tuple[str, ...]
    paths: tuple[str, ...]
    labels: tuple[int, ...]
    gt: tuple[str | None, ...]
    stamps: tuple[str, ...]
    gt_stamps: tuple[str | None, ...]

    @classmethod
    def from_records(cls, records: Sequence[ImageRecord]) -> "ImageColumns":
        return cls(
            tuple(r.key for r in records),
            tuple(str(r.path) for r in records),
            tuple(r.label for r in records),
            tuple(str(r.gt_path) if r.gt_path else None for r in records),
            tuple(r.stamp for r in records),
            tuple(r.gt_stamp for r in records),
        )

    def records(self) -> tuple[ImageRecord, ...]:
        return tuple(
            ImageRecord(key, Path(path), label, Path(gt) if gt else None, stamp, gt_stamp)
            for key, path, label, gt, stamp, gt_stamp in zip(
                self.keys, self.paths, self.labels, self.gt, self.stamps, self.gt_stamps)
        )

    def inputs(self) -> dict[str, tuple[str, str | None, str | None]]:
        """``{key: (stamp, ground-truth path, its stamp)}``: what a change of input is judged by."""
        return {key: inputs for key, *inputs in zip(self.keys, self.stamps, self.gt, self.gt_stamps)}


@dataclasses.dataclass(frozen=True)
class Plan:
    config_hash: str
    model_digest: str
    images: ImageColumns
    class_names: tuple[str, ...]
    shards: tuple[Shard, ...]
    #: how the inputs' stamps were taken: ``stat`` or ``sha256``
    fingerprint: str = "stat"

    @property
    def keys(self) -> list[str]:
        return list(self.images.keys)

    @property
    def image_count(self) -> int:
        return len(self.images.keys)

    @functools.cached_property
    def records(self) -> tuple[ImageRecord, ...]:
        """The images as records (built on first use)."""
        return self.images.records()

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
        """Write ``plan.json`` atomically, as compact JSON."""
        data = {
            "config_hash": self.config_hash,
            "model_digest": self.model_digest,
            "class_names": list(self.class_names),
            "fingerprint": self.fingerprint,
            "images": {name: list(column) for name, column in dataclasses.asdict(self.images).items()},
            "shards": {name: [_plain(getattr(s, name)) for s in self.shards] for name in Shard._fields},
        }
        atomic_write(path, json.dumps(data, separators=(",", ":")))

    @classmethod
    def read(cls, path: Path) -> "Plan":
        try:
            data = json.loads(Path(path).read_bytes())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path} does not exist: plan the run first (xai-pipeline plan)") from None
        images = data["images"]
        unknown = [""] * len(images["keys"])  # plans written before stamps: every input counts as changed
        return cls(
            config_hash=data["config_hash"],
            model_digest=data["model_digest"],
            images=ImageColumns(tuple(images["keys"]), tuple(images["paths"]), tuple(images["labels"]),
                                tuple(images["gt"]), tuple(images.get("stamps", unknown)),
                                tuple(images.get("gt_stamps", unknown))),
            class_names=tuple(data["class_names"]),
            shards=_shards(data["shards"]),
            fingerprint=data.get("fingerprint", "stat"),
        )


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _shards(columns: dict[str, list[Any]]) -> tuple[Shard, ...]:
    """The shards of plan.json's shard columns."""
    return tuple(
        Shard(shard_id, stage, method, tuple(layers), (images[0], images[1]),
              (samples[0], samples[1]) if samples else None, tuple(metrics), tuple(after))
        for shard_id, stage, method, layers, images, samples, metrics, after in zip(
            *(columns[name] for name in Shard._fields))
    )


def method_params(config: ExperimentConfig, entry: MethodConfig) -> dict[str, Any]:
    """The entry's parameters, with the experiment's seed for stochastic methods that take one."""
    from .methods import method_parameters

    params = dict(entry.params)
    if "seed" in method_parameters(entry.name):
        params.setdefault("seed", config.seed)
    return params


def sampled_method(config: ExperimentConfig, entry: MethodConfig) -> "SampledExplainer | None":
    """The entry's explainer, without a model, when it is a sampled method (RISE, LIME); else None.
    ``batch_size: auto`` stands as one input per forward: its alignment unit is one sample."""
    from .methods import SampledExplainer, build_method, method_class

    if not issubclass(method_class(entry.name), SampledExplainer):
        return None
    explainer = build_method(entry.name, None, **with_batch_size(method_params(config, entry), 1))
    assert isinstance(explainer, SampledExplainer)
    return explainer


def sample_ranges(explainer: "SampledExplainer", n_images: int, per_shard: int) -> list[tuple[int, int]]:
    """The sample ranges of a chunk of ``n_images`` images: ``per_shard`` samples each, rounded down to
    a multiple of the samples of one forward batch (at least one batch), so no forward batch straddles
    two shards and the merged sums are bitwise the same however the samples are split."""
    per_forward = explainer.samples_per_forward(n_images)
    size = max(per_forward, per_shard // per_forward * per_forward)
    return list(_ranges(explainer.n_samples, size))


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
    chunk_digests = {chunk: json_digest(keys[chunk[0] : chunk[1]]) for chunk in chunks}
    input_digests = {chunk: json_digest([r.stamp for r in records[chunk[0] : chunk[1]]]) for chunk in chunks}
    gt_digests = {chunk: json_digest([r.gt_stamp for r in records[chunk[0] : chunk[1]]]) for chunk in chunks}
    # the explained classes under ``target: label`` (left out otherwise: the ids of runs planned before it stay)
    labels = {chunk: {"labels": [r.label for r in records[chunk[0] : chunk[1]]]} if config.target == "label" else {}
              for chunk in chunks}
    common: dict[str, Any] = {
        "model": model_digest,
        "image_size": config.data.image_size,
        "mean": config.data.mean,
        "std": config.data.std,
        "target": config.target,
    }
    if config.data.resize != "squash":  # left out by default: the ids of runs planned before it stay
        common["resize"] = {"mode": config.data.resize, "resize_size": config.data.resize_size}
    metric_params = {m.name: m.params for m in config.metrics}
    groups = _metric_groups(config)
    shards: list[Shard] = []
    for entry in config.methods:
        layers = tuple(entry.layers) if entry.layers else (NO_LAYER,)
        method = {"label": entry.label, "name": entry.name, "params": method_params(config, entry), "layers": layers}
        sampled = sampled_method(config, entry)
        for chunk in chunks:
            ranges: Sequence[tuple[int, int] | None] = [None] if sampled is None else sample_ranges(
                sampled, chunk[1] - chunk[0], config.sharding.samples_per_shard)
            explain_ids = []
            for samples in ranges:
                shard_id = json_digest({**common, "method": method, "keys": chunk_digests[chunk],
                                        "inputs": input_digests[chunk], "samples": samples, **labels[chunk]})
                explain_ids.append(shard_id)
                shards.append(Shard(shard_id, "explain", entry.label, layers, chunk, samples))
            for layer in layers:
                for group, names in groups.items():
                    params = {n: metric_params[n] for n in names}
                    reads = {"gt": gt_digests[chunk]} if group == "groundtruth" else {}
                    shard_id = json_digest({"metrics": params, "layer": layer, "after": explain_ids, **reads})
                    shards.append(
                        Shard(shard_id, "score", entry.label, (layer,), chunk, None, tuple(names), tuple(explain_ids))
                    )
    return Plan(config_hash(config), model_digest, ImageColumns.from_records(records), images.class_names,
                tuple(shards), images.fingerprint)


@dataclasses.dataclass(frozen=True)
class InputChanges:
    """The images whose inputs differ from the plan's: ``changed`` (the image or its ground-truth
    map: its bytes, size, time or path), ``added`` and ``removed`` (keys, sorted)."""

    changed: tuple[str, ...] = ()
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.changed or self.added or self.removed)

    def describe(self) -> str:
        """One line for ``status``: the counts and a few keys of each kind."""
        if not self:
            return "inputs unchanged since planning"
        parts = [f"{len(keys)} {what} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
                 for what, keys in (("changed", self.changed), ("added", self.added), ("removed", self.removed))
                 if keys]
        return f"inputs since planning: {'; '.join(parts)}"


def input_changes(run_dir: str | Path | RunDir) -> InputChanges:
    """How the inputs on disk differ from those ``run_dir``'s plan recorded: one walk over the
    data (hashing the files when the plan's fingerprint is ``sha256``); no model, no torch."""
    folder = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    plan = Plan.read(folder.plan)
    raw = read_yaml(folder.config)  # its data section alone: validating the methods would import torch
    data = validate_mapping(DataConfig, raw.get("data") if isinstance(raw, dict) else None, f"{folder.config}: data")
    before = plan.images.inputs()
    now = ImageColumns.from_records(discover_images(data, hash_inputs=plan.fingerprint == "sha256").records).inputs()
    return InputChanges(
        tuple(sorted(k for k in before.keys() & now.keys() if before[k] != now[k])),
        tuple(sorted(now.keys() - before.keys())),
        tuple(sorted(before.keys() - now.keys())),
    )
