"""What a run costs before it is spent: images through the model, per method and per metric.

A *forward* is one image through the model (one row of a forward batch), a *backward*
one row of a backward pass. Each method declares its work per image
(:meth:`~pipeline.methods.Explainer.cost`: RISE ``n_masks`` forwards, Extremal
``iterations x areas`` forwards and backwards, Score-CAM one forward per channel of
each layer, ...) and each metric too (:meth:`~pipeline.metrics.MetricSpec.work`:
Insertion ``ceil(H*W / step) + 1`` forwards, Average Drop 2); :func:`unit_costs` collects
them for a config. Counting them over the plan needs no model and no torch:

- an explain shard of images ``[a, b)`` makes ``b - a`` forwards to find the targets
  (none for a CAM method under ``target: predicted``: its own forward gives them, see
  :func:`~pipeline.methods.classifies_in_pass`), plus the method's work for its images;
  a sampled method (RISE, LIME) the share ``(stop - start) / n_samples`` of it for its
  sample range;
- a score shard makes its metrics' work for its images; metrics of the same function
  and parameters (Average Drop and Increase) share one computation, counted once; the
  randomization test explains each image once per cascade step with the shard's method
  and layer (its work per image on that one layer).

The time is an estimate: forwards and backwards times the seconds per row of one timed
forward (and backward) batch of the real model on the configured device, measured by
the pre-flight (:class:`Throughput`, :mod:`pipeline.throughput`). Planning writes the
estimate to ``RUN_DIR/cost.json``::

    config_hash: the config it was estimated for
    per_image: {methods: {label: [forwards, backwards] or null}, metrics: {name: ... or null},
                shares: {metric: the metric whose computation it reuses}}
    throughput: {device, rows, forward_s, backward_s} or null   (seconds per row)
    lines: [{stage, name, detail, forwards, backwards, declared, pending_forwards,
             pending_backwards}, ...]

A method or metric that declares no cost (a plug-in, a captum attribution) counts only
what the pipeline itself runs (the target forwards) and is marked ``declared: false``.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import math
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from .run_dir import atomic_write

if TYPE_CHECKING:
    from torch import nn

    from .config import ExperimentConfig
    from .planning import Plan, Shard

__all__ = ["Work", "UnitCosts", "Throughput", "CostLine", "CostEstimate", "unit_costs", "shard_work",
           "estimate_cost", "read_estimate", "format_duration"]


@dataclasses.dataclass(frozen=True)
class Work:
    """Rows through the model: ``forwards`` and ``backwards``."""

    forwards: int = 0
    backwards: int = 0

    def __add__(self, other: "Work") -> "Work":
        return Work(self.forwards + other.forwards, self.backwards + other.backwards)

    def times(self, factor: int | Fraction) -> "Work":
        """This work ``factor`` times (a fraction is rounded up)."""
        return Work(math.ceil(self.forwards * factor), math.ceil(self.backwards * factor))


def _pair(work: Work | None) -> list[int] | None:
    return None if work is None else [work.forwards, work.backwards]


def _work(pair: list[int] | None) -> Work | None:
    return None if pair is None else Work(*pair)


@dataclasses.dataclass(frozen=True)
class UnitCosts:
    """The declared work per image of each method entry (by label) and metric (by name), ``None``
    where none is declared; ``shares`` maps a metric to the one whose computation it reuses."""

    methods: Mapping[str, Work | None]
    metrics: Mapping[str, Work | None]
    shares: Mapping[str, str] = dataclasses.field(default_factory=dict)
    #: a metric that explains each image again (the randomization test): how many times
    reruns: Mapping[str, int] = dataclasses.field(default_factory=dict)
    #: a CAM entry's work per image when one of its layers is explained alone (as those metrics do)
    layers: Mapping[str, Mapping[str, Work | None]] = dataclasses.field(default_factory=dict)
    #: the method entries whose own forward finds the targets: their explain shards make no forward for them
    own_targets: frozenset[str] = frozenset()

    def explanation(self, label: str, layer: str) -> Work | None:
        """The work per image of explaining method entry ``label`` on ``layer`` alone."""
        return self.layers.get(label, {}).get(layer, self.methods.get(label))

    def needs_backwards(self) -> bool:
        return any(w is not None and w.backwards for w in [*self.methods.values(), *self.metrics.values()])

    def to_json(self) -> dict[str, Any]:
        return {"methods": {k: _pair(w) for k, w in self.methods.items()},
                "metrics": {k: _pair(w) for k, w in self.metrics.items()}, "shares": dict(self.shares),
                "reruns": dict(self.reruns),
                "layers": {k: {layer: _pair(w) for layer, w in v.items()} for k, v in self.layers.items()},
                "own_targets": sorted(self.own_targets)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "UnitCosts":
        return cls({k: _work(p) for k, p in data["methods"].items()},
                   {k: _work(p) for k, p in data["metrics"].items()}, dict(data.get("shares", {})),
                   dict(data.get("reruns", {})),
                   {k: {layer: _work(p) for layer, p in v.items()} for k, v in data.get("layers", {}).items()},
                   frozenset(data.get("own_targets", ())))


def _declared_defaults(parameters: Mapping[str, inspect.Parameter]) -> dict[str, Any]:
    return {name: p.default for name, p in parameters.items() if p.default is not inspect.Parameter.empty}


def unit_costs(config: "ExperimentConfig", channels: Mapping[str, Mapping[str, int]],
               model: "nn.Module | None" = None) -> UnitCosts:
    """Every method entry's and metric's declared work per image for ``config``; ``channels`` gives
    the channel count of each layer of each CAM entry (by label), as the pre-flight forward found it.
    A metric that explains each image again (the randomization test) counts that method's work per
    explanation on ``model`` (undeclared without it)."""
    from .methods import classifies_in_pass, method_class, method_parameters
    from .metrics import metric_spec
    from .planning import method_params

    size = config.data.image_size
    methods: dict[str, Work | None] = {}
    layers: dict[str, dict[str, Work | None]] = {}
    for entry in config.methods:
        params = {**_declared_defaults(method_parameters(entry.name)), **method_params(config, entry)}
        method, found = method_class(entry.name), channels.get(entry.label, {})
        if entry.layers:
            params["layer"] = list(entry.layers)
            layers[entry.label] = {
                layer: method.cost({**params, "layer": [layer]}, size, {k: v for k, v in found.items() if k == layer})
                for layer in entry.layers}
        methods[entry.label] = method.cost(params, size, found)
    metrics: dict[str, Work | None] = {}
    shares: dict[str, str] = {}
    reruns: dict[str, int] = {}
    computed: dict[tuple[object, str], str] = {}
    for metric in config.metrics:
        spec = metric_spec(metric.name)
        key = (spec.function, repr(sorted(metric.params.items())))
        if key in computed:  # scored in the same call (see pipeline.stages.score.score_maps)
            shares[metric.name] = computed[key]
            metrics[metric.name] = Work()
        elif spec.needs_method:
            count = None if model is None else spec.reruns(metric.params, model)
            declared = count is not None and all(work is not None for work in methods.values())
            metrics[metric.name] = Work() if declared else None
            if count is not None:
                reruns[metric.name] = count
        else:
            computed[key] = metric.name
            metrics[metric.name] = spec.work(metric.params, size)
    own_targets = frozenset(entry.label for entry in config.methods
                            if config.target == "predicted" and classifies_in_pass(entry.name))
    return UnitCosts(methods, metrics, shares, reruns, layers, own_targets)


def _sample_counts(plan: Plan) -> dict[tuple[str, tuple[int, int]], int]:
    """The number of samples of each sampled method entry and image chunk (the end of its last range)."""
    counts: dict[tuple[str, tuple[int, int]], int] = {}
    for shard in plan.stage("explain"):
        if shard.samples is not None:
            key = (shard.method, shard.images)
            counts[key] = max(counts.get(key, 0), shard.samples[1])
    return counts


def shard_work(plan: Plan, units: UnitCosts) -> dict[str, dict[tuple[str, str], Work]]:
    """For every shard id of ``plan``: its work on each cost line ``(stage, method label or metric name)``."""
    samples = _sample_counts(plan)
    work: dict[str, dict[tuple[str, str], Work]] = {}
    for shard in plan.shards:
        images = shard.images[1] - shard.images[0]
        if shard.stage == "explain":
            declared = units.methods.get(shard.method) or Work()
            share: int | Fraction = 1
            if shard.samples is not None:
                share = Fraction(shard.samples[1] - shard.samples[0], samples[(shard.method, shard.images)])
            targets = Work(0 if shard.method in units.own_targets else images)
            work[shard.id] = {("explain", shard.method): targets + declared.times(images * share)}
        else:
            work[shard.id] = {("score", name): _score_work(units, name, shard).times(images)
                              for name in shard.metrics}
    return work


def _score_work(units: UnitCosts, metric: str, shard: "Shard") -> Work:
    """Metric ``metric``'s work per image in score shard ``shard``: its declared work, or for a metric
    that explains the images again, that many explanations with the shard's method and layer."""
    if metric in units.reruns:
        return (units.explanation(shard.method, shard.layers[0]) or Work()).times(units.reruns[metric])
    return units.metrics.get(metric) or Work()


@dataclasses.dataclass(frozen=True)
class Throughput:
    """Seconds per row of one timed forward (and backward) batch of ``rows`` images on ``device``."""

    device: str
    rows: int
    forward_s: float
    backward_s: float | None = None

    def seconds(self, work: Work) -> float:
        return work.forwards * self.forward_s + work.backwards * (self.backward_s or 0.0)


@dataclasses.dataclass(frozen=True)
class CostLine:
    """The work of one method entry (explain) or metric (score) over the plan, and what is still to do."""

    stage: str
    name: str
    detail: str
    total: Work
    pending: Work
    declared: bool = True


def format_duration(seconds: float) -> str:
    """``42 s``, ``3.5 min``, ``2.1 h`` or ``1.5 days``."""
    for unit, size, from_ in (("days", 86400.0, 2 * 86400.0), ("h", 3600.0, 2 * 3600.0), ("min", 60.0, 90.0)):
        if seconds >= from_:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.2g} s" if seconds < 10 else f"{seconds:.0f} s"


@dataclasses.dataclass(frozen=True)
class CostEstimate:
    """The run's cost lines (explain lines in method order, then score lines in metric order)."""

    units: UnitCosts
    lines: tuple[CostLine, ...]
    throughput: Throughput | None = None
    #: the hash of the config it was estimated for
    config_hash: str = ""

    @property
    def total(self) -> Work:
        return sum((line.total for line in self.lines), Work())

    @property
    def pending(self) -> Work:
        return sum((line.pending for line in self.lines), Work())

    def seconds(self, work: Work) -> float | None:
        """The estimated time of ``work`` (None without a timing)."""
        return None if self.throughput is None else self.throughput.seconds(work)

    def describe(self) -> str:
        """The lines as a table for the command line, the time labelled as an estimate."""
        rows = [(f"{line.stage} {line.name}", line.total, line.detail if line.declared else
                 f"{line.detail + '; ' if line.detail else ''}at least: declares no cost") for line in self.lines]
        complete = all(line.declared for line in self.lines)
        rows.append(("total", self.total, "" if complete else "at least"))
        if self.pending != self.total:
            rows.append(("still to compute", self.pending, "the shards not committed yet"))
        throughput = self.throughput
        if throughput is None:
            head = ("cost (a forward is one image through the model; time not estimated: the configured device "
                    "is not available here)")
        else:
            head = (f"cost (a forward is one image through the model; time: an ESTIMATE from one timed batch of "
                    f"{throughput.rows} images on {throughput.device})")
        cells = [(title, f"{work.forwards:,d}", f"{work.backwards:,d}",
                  "" if (seconds := self.seconds(work)) is None else f"~{format_duration(seconds)}", detail)
                 for title, work, detail in rows]
        widths = [max(len(cell[i]) for cell in cells) for i in range(4)]
        lines = [head]
        for title, forwards, backwards, time, detail in cells:
            lines.append(f"  {title:<{widths[0]}}  {forwards:>{widths[1]}} forwards  {backwards:>{widths[2]}} "
                         f"backwards  {time:<{widths[3]}}  {detail}".rstrip())
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "config_hash": self.config_hash,
            "per_image": self.units.to_json(),
            "throughput": None if self.throughput is None else dataclasses.asdict(self.throughput),
            "lines": [{"stage": line.stage, "name": line.name, "detail": line.detail,
                       "forwards": line.total.forwards, "backwards": line.total.backwards,
                       "pending_forwards": line.pending.forwards, "pending_backwards": line.pending.backwards,
                       "declared": line.declared} for line in self.lines],
        }

    def write(self, path: Path) -> None:
        atomic_write(path, json.dumps(self.to_json(), indent=1))

    @classmethod
    def read(cls, path: Path) -> "CostEstimate":
        data = json.loads(Path(path).read_text())
        throughput = data.get("throughput")
        lines = tuple(
            CostLine(line["stage"], line["name"], line["detail"], Work(line["forwards"], line["backwards"]),
                     Work(line["pending_forwards"], line["pending_backwards"]), line["declared"])
            for line in data["lines"]
        )
        return cls(UnitCosts.from_json(data["per_image"]), lines,
                   None if throughput is None else Throughput(**throughput), data.get("config_hash", ""))


def read_estimate(path: Path, config_hash: str) -> CostEstimate | None:
    """The estimate saved at ``path`` if it is one of the config ``config_hash``; ``None`` when absent,
    unreadable or of another config."""
    try:
        estimate = CostEstimate.read(path)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return estimate if estimate.config_hash == config_hash else None


def _layer_detail(layers: tuple[str, ...]) -> str:
    from .planning import NO_LAYER

    return f"{len(layers)} layer{'s' if len(layers) > 1 else ''}" if layers != (NO_LAYER,) else ""


def estimate_cost(plan: Plan, units: UnitCosts, throughput: Throughput | None = None,
                  committed: Iterable[str] = ()) -> CostEstimate:
    """The cost lines of ``plan``: every shard's work, and that of the shards not in ``committed``."""
    done = set(committed)
    totals: dict[tuple[str, str], Work] = {}
    pending: dict[tuple[str, str], Work] = {}
    layers: dict[str, tuple[str, ...]] = {}
    scored: dict[str, set[tuple[str, str]]] = {}
    for shard, shard_lines in zip(plan.shards, shard_work(plan, units).values()):
        for key, work in shard_lines.items():
            totals[key] = totals.get(key, Work()) + work
            pending[key] = pending.get(key, Work()) + (Work() if shard.id in done else work)
        if shard.stage == "explain":
            layers[shard.method] = shard.layers
        for name in shard.metrics:
            scored.setdefault(name, set()).add((shard.method, shard.layers[0]))
    lines = []
    for stage, declared in (("explain", units.methods), ("score", units.metrics)):
        for name, per_image in declared.items():
            if (stage, name) not in totals:
                continue
            if stage == "explain":
                detail = _layer_detail(layers[name])
            else:
                count = len(scored[name])
                shared = f", shares {units.shares[name]}'s forwards" if name in units.shares else ""
                detail = f"{count} map{'s' if count > 1 else ''} per image{shared}"
            lines.append(CostLine(stage, name, detail, totals[(stage, name)], pending[(stage, name)],
                                  per_image is not None))
    return CostEstimate(units, tuple(lines), throughput, plan.config_hash)
