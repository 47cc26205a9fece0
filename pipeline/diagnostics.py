"""Honest warnings about a reduced run, written by reduce as ``RUN_DIR/warnings.md``.

They say what the tables alone hide: saliency maps that are constant, all zero or not
finite (counted per method and layer, with the image keys, from the score reasons of
``failures.csv``); a metric whose mean is the same for every method and layer; a
ground-truth metric asked for in a run whose images have no ground-truth map; a sampled method
whose shards of one image chunk were computed on different devices or with different forward
batches (their sums then agree with a single run only up to float rounding). A method
all of whose maps are degenerate is named in :attr:`RunWarnings.degenerate_methods`;
the command line then exits with status 1.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Mapping, Sequence

import pandas as pd

from .planning import NO_LAYER
from .run_dir import atomic_write
from .tables import constant_metrics, format_number, metric_title

__all__ = ["RunWarnings", "run_warnings", "write_warnings", "DEGENERATE_PREFIX"]

#: the score reasons of failures.csv that mean the map itself is unusable
DEGENERATE_PREFIX = "saliency map"
#: image keys listed per warning
_KEYS_SHOWN = 10


@dataclasses.dataclass
class RunWarnings:
    """The warnings of a run: one line (Markdown) each, and the methods with no usable map."""

    lines: list[str]
    degenerate_methods: list[str]

    def markdown(self) -> str:
        """The text of warnings.md."""
        body = "\n".join(f"- {line}" for line in self.lines) if self.lines else "No warnings."
        return f"## Warnings\n\n{body}\n"


def _keys(keys: Sequence[str]) -> str:
    shown = ", ".join(f"`{k}`" for k in keys[:_KEYS_SHOWN])
    return shown + (f" and {len(keys) - _KEYS_SHOWN} more (failures.csv)" if len(keys) > _KEYS_SHOWN else "")


def run_warnings(failures: pd.DataFrame, summary: pd.DataFrame, *, ground_truth_metrics: Sequence[str],
                 images_with_gt: int, mixed_computations: Mapping[str, Sequence[Sequence[str]]] | None = None
                 ) -> RunWarnings:
    """The warnings of a run from its failures.csv table, its summary (per method and layer), the
    ground-truth metrics it asked for and, per sampled method, how each of its chunks computed in more
    than one way was computed (:attr:`~pipeline.stages.merge.ChunkMaps.computed_with`)."""
    lines: list[str] = []
    scored = summary.groupby(["method", "layer"], sort=False)[["count", "n_nan"]].max().sum(axis=1)
    degenerate = failures[(failures["stage"] == "score") & failures["error"].str.startswith(DEGENERATE_PREFIX)]
    fully: dict[str, list[bool]] = {}
    for (method, layer), images in scored.items():
        rows = degenerate[(degenerate["method"] == method) & (degenerate["layer"] == layer)]
        keys = list(dict.fromkeys(rows["key"]))
        fully.setdefault(str(method), []).append(bool(images) and len(keys) == images)
        if keys:
            view = method if layer == NO_LAYER else f"{method} / {layer}"
            kinds = ", ".join(sorted({error.split(" (")[0].removeprefix(DEGENERATE_PREFIX + " ")
                                      for error in rows["error"]}))
            lines.append(f"{view}: {len(keys)} of {images} saliency maps are degenerate ({kinds}); their metric "
                         f"values are NaN: {_keys(keys)}")
    for metric in constant_metrics(summary):
        mean = summary.loc[summary["metric"] == metric, "mean"].dropna().iloc[0]
        lines.append(f"{metric_title(metric)} is {format_number(mean)} for every method and layer with a value: "
                     "it does not tell them apart in this run (flagged `same for all` in the tables)")
    if images_with_gt == 0:
        for metric in ground_truth_metrics:
            lines.append(f"{metric_title(metric)} needs ground-truth maps, but no image of this run has one "
                         "(set `data.gt_dir`, or a `gt` column of the manifest): its column is empty")
    for method, chunks in (mixed_computations or {}).items():
        ways = ", ".join(sorted({way for chunk in chunks for way in chunk}))
        lines.append(f"{method}: the sample ranges of {len(chunks)} image chunk(s) were computed on different "
                     f"devices or with different forward batches ({ways}): their maps equal a single run's up to "
                     "float rounding, not bit for bit (give `batch_size` a number and one device kind to keep them "
                     "bitwise)")
    methods = [method for method, views in fully.items() if all(views)]
    lines += [f"every saliency map of {method} is degenerate: check the method and its layers" for method in methods]
    return RunWarnings(lines, methods)


def write_warnings(path: Path, warnings: RunWarnings) -> None:
    """Write ``warnings`` as Markdown to ``path`` (``RUN_DIR/warnings.md``)."""
    atomic_write(path, warnings.markdown())
