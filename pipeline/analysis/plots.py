"""Figures of a finished run, as matplotlib :class:`~matplotlib.figure.Figure` objects.

Figures are made without pyplot (an Agg canvas, nothing is displayed or kept in
pyplot's state); a notebook shows a returned figure, :func:`save_figure` writes it as
PNG (and PDF on request). Every helper takes a :class:`~pipeline.analysis.run.Run` and
draws exactly the views it is given: ``methods`` is a list of method labels (all their
layers) and/or ``(method, layer)`` pairs, default every view of the run.

Saliency maps are min-max normalized per map for display (``normalize=True``) and drawn
with a perceptually ordered rainbow (``turbo``) over the image; metric heatmaps use
``viridis``, reversed for metrics where lower is better, so brighter always reads better.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
from matplotlib import colors
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.figure import Figure
from scipy import stats

from ..data import DataError
from ..metrics import METRICS
from ..planning import NO_LAYER
from ..tables import metric_title
from .run import Run, View, view_label

__all__ = [
    "overlay_grid",
    "curve_plot",
    "randomization_cascade",
    "metric_distributions",
    "metric_heatmap",
    "critical_difference_diagram",
    "ground_truth_comparison",
    "save_figure",
    "normalize_map",
    "curve_area",
    "palette",
    "MAX_BANDS",
    "DPI",
    "SALIENCY_CMAP",
]

#: resolution of saved figures (dots per inch)
DPI = 200
#: colormap of saliency and ground-truth maps
SALIENCY_CMAP = "turbo"
_PANEL = 1.9
_CURVE_X_LABELS = {"insertion": "fraction of pixels inserted", "deletion": "fraction of pixels deleted"}


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def normalize_map(saliency: np.ndarray) -> np.ndarray:
    """``saliency`` scaled to [0, 1] (min-max); a constant map gives zeros, NaNs stay NaN."""
    low, high = np.nanmin(saliency), np.nanmax(saliency)
    if not np.isfinite(high - low) or high - low <= 0:
        return np.where(np.isnan(saliency), np.nan, 0.0)
    return (saliency - low) / (high - low)


def _image_or_none(run: Run, key: str) -> np.ndarray | None:
    try:
        return run.image(key)
    except DataError:
        return None


def _blank(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=8, color="0.4", transform=ax.transAxes)


def _clean(ax: Axes) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def _image_title(run: Run, key: str) -> str:
    row = run.images.iloc[int(run.rows(keys=[key])[0])]
    if row["failed"] or row["target_name"] is None:
        return "failed"
    title = f"{row['target_name']} ({row['target_prob']:.2f})"
    return title if row["target"] == row["label"] else f"{title}\ntrue: {row['class_name']}"


def overlay_grid(
    run: Run,
    keys: Sequence[str],
    methods: Sequence[str | View] | None = None,
    *,
    show_image: bool = True,
    normalize: bool = True,
    cmap: str = SALIENCY_CMAP,
    alpha: float = 0.5,
    row_labels: Sequence[str] | None = None,
    panel_size: float = _PANEL,
) -> Figure:
    """Images as rows, views as columns: each map over its image, with a colorbar.

    The first column (``show_image``) shows the image, titled with the explained class
    and its probability (and the true class when it differs); each map column is titled
    with its view in the first row. Beside each row: the key (and, without the image
    column, the class and probability), then the row's entry of ``row_labels``.
    With ``normalize`` every map is scaled to [0, 1] and one colorbar serves them all;
    otherwise each map has its own colorbar in its own units.
    """
    keys = list(keys)
    if not keys:
        raise ValueError("keys: give at least one image key")
    if row_labels is not None and len(row_labels) != len(keys):
        raise ValueError(f"row_labels: expected {len(keys)} labels (one per key), got {len(row_labels)}")
    views = run.views(methods)
    maps = {view: run.maps(*view, keys=keys) for view in views}
    columns = len(views) + int(show_image)
    figure = _figure(panel_size * columns + (0.9 if normalize else 0.0), panel_size * len(keys) + 0.4)
    axes = figure.subplots(len(keys), columns, squeeze=False)
    norm = colors.Normalize(0.0, 1.0)
    for row, key in enumerate(keys):
        image = _image_or_none(run, key)
        for ax in axes[row]:
            _clean(ax)
        if show_image:
            if image is None:
                _blank(axes[row, 0], "unreadable")
            else:
                axes[row, 0].imshow(image)
            axes[row, 0].set_title(_image_title(run, key), fontsize=8)
        label = [key] + ([] if show_image else [_image_title(run, key)])
        axes[row, 0].set_ylabel("\n".join(label + ([row_labels[row]] if row_labels else [])), fontsize=7)
        for column, view in enumerate(views, start=int(show_image)):
            ax = axes[row, column]
            if row == 0:
                ax.set_title(view_label(*view), fontsize=8)
            saliency = maps[view][row]
            if np.isnan(saliency).all():
                _blank(ax, "failed")
                continue
            if image is not None:
                ax.imshow(image)
            shown = normalize_map(saliency) if normalize else saliency
            drawn = ax.imshow(shown, cmap=cmap, alpha=alpha if image is not None else 1.0,
                              norm=norm if normalize else None)
            if not normalize:
                figure.colorbar(drawn, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=6)
    if normalize:
        bar = figure.colorbar(ScalarMappable(norm, cmap), ax=axes, fraction=0.03, pad=0.01, aspect=30)
        bar.set_label("saliency (min-max per map)", fontsize=8)
        bar.ax.tick_params(labelsize=7)
    return figure


def _mean_and_band(curves: np.ndarray, band: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mean = curves.mean(axis=0)
    if len(curves) < 2:
        return mean, mean, mean
    std = curves.std(axis=0, ddof=1)
    half = std if band == "std" else stats.t.ppf(0.975, len(curves) - 1) * std / math.sqrt(len(curves))
    return mean, mean - half, mean + half


def curve_area(curve: np.ndarray) -> float:
    """Trapezoid area under a curve sampled at equal steps over [0, 1]."""
    steps = len(curve) - 1
    return float((curve.sum() - (curve[0] + curve[-1]) / 2) / steps) if steps else float(curve[0])


def curve_plot(
    run: Run,
    metrics: Sequence[str] = ("insertion", "deletion"),
    methods: Sequence[str | View] | None = None,
    *,
    band: Literal["ci", "std"] = "ci",
    facets: bool = False,
    panel_size: tuple[float, float] = (4.6, 3.6),
) -> Figure:
    """Mean Insertion / Deletion curves, one line per view, with a band and the AUC in the legend.

    The band is the 95% confidence interval of the mean (``"ci"``, Student t) or one
    standard deviation (``"std"``), clipped like the curves to [0, 1] (they are
    probabilities); images that failed are left out. The AUC of the mean curve equals
    the mean of the per-image AUCs; a view without curves (every map unusable) has no line. Each view keeps its colour and line style
    (:func:`palette`). With more than :data:`MAX_BANDS` views the shared panel has no
    bands; ``facets`` instead draws one panel per view and metric (rows: metrics), the
    view with its band in colour over the other views' means in grey.
    """
    if band not in ("ci", "std"):
        raise ValueError(f"band must be 'ci' or 'std', got {band!r}")
    metrics = [m for m in metrics if m in run.curve_metrics]
    if not metrics:
        raise ValueError(f"metrics: none has curves in this run; curves: {', '.join(run.curve_metrics) or '(none)'}")
    views = run.views(methods)
    styles = palette(len(views))
    means: dict[tuple[str, View], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for metric in metrics:
        for view in (v for v in views if run.has_curves(metric, *v)):
            curves = run.curves(metric, *view)
            curves = curves[~np.isnan(curves).any(axis=1)]
            if len(curves):
                means[metric, view] = tuple(np.clip(c, 0.0, 1.0) for c in _mean_and_band(curves, band))
    band_title = f"band: {'95% CI' if band == 'ci' else '± 1 std'}"
    if facets:
        columns = min(len(views), 6)
        rows = math.ceil(len(views) / columns)
        figure = _figure(panel_size[0] * 0.6 * columns, panel_size[1] * 0.6 * rows * len(metrics) + 0.4)
        grid = figure.subplots(rows * len(metrics), columns, squeeze=False, sharex=True, sharey=True)
        for m, metric in enumerate(metrics):
            panels = grid[m * rows:(m + 1) * rows].ravel()
            for ax, (index, view) in zip(panels, enumerate(views)):
                for other in views:
                    if other != view and (metric, other) in means:
                        mean = means[metric, other][0]
                        ax.plot(np.linspace(0.0, 1.0, len(mean)), mean, color="0.8", lw=0.8)
                _draw_curve(ax, means.get((metric, view)), view, styles[index], 0.25)
                ax.set_title(f"{metric_title(metric)}: {view_label(*view)}", fontsize=8)
                ax.legend(fontsize=6, frameon=False, title=band_title, title_fontsize=6)
                _curve_axes(ax, metric, labels=False)
            for ax in panels[len(views):]:
                figure.delaxes(ax)
        figure.supxlabel("fraction of pixels inserted or deleted", fontsize=9)
        figure.supylabel("probability of the target class", fontsize=9)
        return figure
    with_bands = len(views) <= MAX_BANDS
    legend_below = len(views) > 4
    height = panel_size[1] + (0.17 * math.ceil(len(views) / 2) + 0.4 if legend_below else 0.0)
    figure = _figure(panel_size[0] * len(metrics), height)
    axes = figure.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics):
        for style, view in zip(styles, views):
            _draw_curve(ax, means.get((metric, view)), view, style, (0.2 if len(views) <= 3 else 0.12) * with_bands)
        ax.set_title(metric_title(metric), fontsize=10)
        _curve_axes(ax, metric, labels=True)
        placement = {"loc": "upper center", "bbox_to_anchor": (0.5, -0.16), "ncols": 2} if legend_below else {}
        ax.legend(fontsize=7, frameon=False, title=band_title if with_bands else "no bands: see facets=True",
                  title_fontsize=7, **placement)
    return figure


def randomization_cascade(run: Run, keys: Sequence[str], methods: Sequence[str | View] | None = None, *,
                          panel_size: tuple[float, float] = (3.4, 2.8)) -> Figure:
    """The randomization test's cascade: Spearman correlation between the original and the randomized
    map after each step (the top 1, 2, ... blocks re-initialized), one line per view; the first panel
    is the mean over the images with a value, then one panel per image of ``keys``."""
    if "randomization" not in run.curve_metrics:
        raise ValueError(f"no randomization curves in {run.results_path}")
    views = [v for v in run.views(methods) if run.has_curves("randomization", *v)]
    rows = run.rows(keys=list(keys))
    figure = _figure(panel_size[0] * (len(keys) + 1), panel_size[1])
    axes = figure.subplots(1, len(keys) + 1, squeeze=False, sharey=True)[0]
    for style, view in zip(palette(len(views)), views):
        curves = run.curves("randomization", *view)
        colour, line = style
        kept = curves[~np.isnan(curves).any(axis=1)]
        steps = np.arange(1, curves.shape[1] + 1)
        if len(kept):
            axes[0].plot(steps, kept.mean(axis=0), color=colour, ls=line, lw=1.6, marker="o", ms=3,
                         label=view_label(*view))
        for ax, row in zip(axes[1:], rows):
            ax.plot(steps, curves[row], color=colour, ls=line, lw=1.2, marker="o", ms=2.5)
    for ax, title in zip(axes, ["mean over images", *(_image_title(run, key) for key in keys)]):
        ax.set_title(title, fontsize=8)
        ax.axhline(0.0, color="0.6", lw=0.8)
        ax.set_ylim(-1.02, 1.02)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0].set_ylabel("Spearman correlation with the original map", fontsize=8)
    figure.supxlabel("blocks re-initialized from the top", fontsize=9)
    axes[0].legend(fontsize=7, frameon=False, loc="best")
    return figure


#: the most views :func:`curve_plot` draws bands for in one panel
MAX_BANDS = 4
#: twelve colours told apart also by most colour-blind readers (Okabe and Ito's eight, then Tol's)
_COLOURS = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9",
            "#000000", "#882255", "#117733", "#999933", "#332288", "#AA4499"]
_LINE_STYLES = ["-", "--", "-.", ":"]


def palette(count: int) -> list[tuple[str, str]]:
    """(colour, line style) of ``count`` views: twelve colours with solid lines, then again dashed, ..."""
    return [(_COLOURS[i % len(_COLOURS)], _LINE_STYLES[(i // len(_COLOURS)) % len(_LINE_STYLES)])
            for i in range(count)]


def _draw_curve(ax: Axes, curve: tuple[np.ndarray, np.ndarray, np.ndarray] | None, view: View,
                style: tuple[str, str], band_alpha: float) -> None:
    if curve is None:
        return
    mean, low, high = curve
    x = np.linspace(0.0, 1.0, len(mean))
    colour, line = style
    ax.plot(x, mean, color=colour, ls=line, lw=1.6, label=f"{view_label(*view)} (AUC {curve_area(mean):.3f})")
    if band_alpha:
        ax.fill_between(x, low, high, color=colour, alpha=band_alpha, lw=0)


def _curve_axes(ax: Axes, metric: str, labels: bool) -> None:
    if labels:
        ax.set_xlabel(_CURVE_X_LABELS.get(metric, "fraction of pixels"), fontsize=9)
        ax.set_ylabel("probability of the target class", fontsize=9)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.tick_params(labelsize=8)


def metric_distributions(
    run: Run,
    metrics: Sequence[str] | None = None,
    methods: Sequence[str | View] | None = None,
    *,
    kind: Literal["box", "violin"] = "box",
    panel_size: tuple[float, float] = (4.2, 3.4),
    columns: int = 3,
) -> Figure:
    """Per-image values of each metric (one panel each) per view, as box or violin plots with the points."""
    if kind not in ("box", "violin"):
        raise ValueError(f"kind must be 'box' or 'violin', got {kind!r}")
    metrics = list(run.metric_names if metrics is None else metrics)
    unknown = [m for m in metrics if m not in run.metric_names]
    if unknown or not metrics:
        known = ", ".join(run.metric_names)
        raise ValueError(f"metrics: unknown {', '.join(unknown) or '(none given)'}; run has {known}")
    views = run.views(methods)
    columns = min(columns, len(metrics))
    rows = math.ceil(len(metrics) / columns)
    width = max(panel_size[0], 0.55 * len(views) + 1.2)
    figure = _figure(width * columns, panel_size[1] * rows)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    colours = [colour for colour, _ in palette(len(views))]
    rng = np.random.default_rng(0)
    table = run.metrics
    for ax, metric in zip(axes, metrics):
        part = table[table["metric"] == metric]
        positions, data, shown_colors = [], [], []
        for position, (color, (method, layer)) in enumerate(zip(colours, views)):
            values = part[(part["method"] == method) & (part["layer"] == layer)]["value"].dropna().to_numpy()
            if len(values):
                positions.append(position)
                data.append(values)
                shown_colors.append(color)
        if kind == "box" and data:
            boxes = ax.boxplot(data, positions=positions, widths=0.6, patch_artist=True, showfliers=False)
            for patch, color in zip(boxes["boxes"], shown_colors):
                patch.set(facecolor=colors.to_rgba(color, 0.35), edgecolor=color)
            for median in boxes["medians"]:
                median.set(color="black")
        elif data:
            violins = ax.violinplot(data, positions=positions, widths=0.8, showmedians=True)
            for body, color in zip(violins["bodies"], shown_colors):
                body.set(facecolor=color, edgecolor=color, alpha=0.35)
        for position, values, color in zip(positions, data, shown_colors):
            jitter = rng.uniform(-0.12, 0.12, len(values))
            ax.scatter(position + jitter, values, s=6, color=color, alpha=0.8, lw=0, zorder=3)
        ax.set_xticks(range(len(views)))
        ax.set_xticklabels([view_label(*v) for v in views], rotation=35, ha="right", fontsize=7)
        ax.set_xlim(-0.6, len(views) - 0.4)
        ax.set_title(metric_title(metric), fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.tick_params(axis="y", labelsize=8)
    for ax in axes[len(metrics):]:
        figure.delaxes(ax)
    return figure


def critical_difference_diagram(run: Run, metric: str, *, n_resamples: int = 999) -> Figure:
    """Mean ranks of the methods on ``metric``, one panel per layer (Demšar 2006's diagram, with
    the Wilcoxon-Holm groups of :meth:`Run.compare` instead of Nemenyi's critical difference):
    rank 1, the best, on the left; a bar joins methods whose every pair is not significantly
    different (Holm-adjusted p >= 0.05). ``n_resamples`` goes to :meth:`Run.compare` (the
    diagram does not use the intervals, so fewer is faster)."""
    table = run.compare(metric, n_resamples=n_resamples)
    if table.empty:
        raise ValueError(f"metric: {metric!r} has no two methods with values on the same images")
    layers = list(dict.fromkeys(table["layer"]))
    figure = _figure(6.4, 0.3 + 1.2 * len(layers) + 0.25 * table["method_a"].nunique())
    axes = np.atleast_1d(figure.subplots(len(layers), 1, squeeze=False)[:, 0])
    for ax, layer in zip(axes, layers):
        group = table[table["layer"] == layer]
        ranks = dict(zip(group["method_a"], group["mean_rank_a"])) | dict(zip(group["method_b"], group["mean_rank_b"]))
        methods = sorted(ranks, key=ranks.__getitem__)
        different = {frozenset((r.method_a, r.method_b)) for r in group.itertuples() if r.significant}
        ax.set_xlim(0.8, len(methods) + 0.2)
        ax.set_ylim(-len(methods) - 1, 1)
        ax.axhline(0, color="black", linewidth=0.8)
        for position, method in enumerate(methods):
            y = -1 - position
            ax.plot([ranks[method]] * 2, [0, y], color="grey", linewidth=0.6)
            ax.text(ranks[method], y, f" {method} ({ranks[method]:.2f})", fontsize=7, va="center")
        bars = []
        for start in range(len(methods)):
            stop = start
            while stop + 1 < len(methods) and all(
                frozenset((methods[i], methods[stop + 1])) not in different for i in range(start, stop + 1)
            ):
                stop += 1
            if stop > start and not any(a <= start and stop <= b for a, b in bars):
                bars.append((start, stop))
        for level, (start, stop) in enumerate(bars):
            y = 0.3 + 0.2 * level
            ax.plot([ranks[methods[start]], ranks[methods[stop]]], [y, y], color="black", linewidth=2.5)
        ax.set_ylim(-len(methods) - 1, 0.5 + 0.2 * len(bars))
        ax.set_yticks([])
        ax.set_xlabel("mean rank (1 = best)", fontsize=8)
        ax.set_title(f"{metric_title(metric)}" + ("" if layer == NO_LAYER else f", layer {layer}"), fontsize=9)
        for side in ("left", "right", "top"):
            ax.spines[side].set_visible(False)
    return figure


def metric_heatmap(
    run: Run,
    metric: str,
    methods: Sequence[str] | None = None,
    *,
    statistic: Literal["mean", "std", "var", "count"] = "mean",
    cmap: str | None = None,
) -> Figure:
    """Methods as rows, layers as columns, each cell the ``statistic`` of ``metric`` (annotated)."""
    if metric not in run.metric_names:
        raise ValueError(f"metric: unknown {metric!r}; run has {', '.join(run.metric_names)}")
    if statistic not in ("mean", "std", "var", "count"):
        raise ValueError(f"statistic must be mean, std, var or count, got {statistic!r}")
    methods = list(run.methods if methods is None else methods)
    summary = run.summary()
    summary = summary[summary["metric"] == metric].set_index(["method", "layer"])[statistic]
    layers = list(dict.fromkeys(layer for method in methods for layer in run.layers(method)))
    grid = np.full((len(methods), len(layers)), np.nan)
    for i, method in enumerate(methods):
        for j, layer in enumerate(layers):
            if (method, layer) in summary.index:
                grid[i, j] = summary[(method, layer)]
    spec = METRICS.get(metric)
    higher_better = spec is None or spec.higher_is_better or statistic != "mean"
    colormap = cmap or ("viridis" if higher_better else "viridis_r")
    figure = _figure(1.2 * len(layers) + 2.6, 0.5 * len(methods) + 1.4)
    ax = figure.subplots()
    drawn = ax.imshow(np.ma.masked_invalid(grid), cmap=colormap, aspect="auto")
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels(["(no layer)" if layer == NO_LAYER else layer for layer in layers], fontsize=8)
    ax.set_yticks(range(len(methods)))
    ax.set_yticklabels(methods, fontsize=8)
    ax.set_facecolor("0.92")
    for (i, j), value in np.ndenumerate(grid):
        if np.isfinite(value):
            red, green, blue, _ = drawn.cmap(drawn.norm(value))
            bright = 0.299 * red + 0.587 * green + 0.114 * blue > 0.5
            text = f"{value:.0f}" if statistic == "count" else f"{value:.3f}"
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color="black" if bright else "white")
    ax.set_title(f"{metric_title(metric)} ({statistic})", fontsize=10)
    bar = figure.colorbar(drawn, ax=ax, fraction=0.08, pad=0.03)
    bar.ax.tick_params(labelsize=7)
    return figure


def ground_truth_comparison(
    run: Run,
    keys: Sequence[str],
    methods: Sequence[str | View] | None = None,
    *,
    cmap: str = SALIENCY_CMAP,
    panel_size: float = _PANEL,
) -> Figure:
    """Image, ground-truth map and each view's map side by side, for the ``keys`` that have a ground truth.

    Maps and ground truths are min-max normalized and share one colorbar; a map's title
    gives its PCC with the ground truth when the run scored PCC.
    """
    has_gt = run.images.set_index("key")["has_gt"]
    unknown = [k for k in keys if k not in has_gt.index]
    if unknown:
        raise ValueError(f"keys: unknown image key(s) {', '.join(map(repr, unknown[:5]))}")
    keys = [k for k in keys if has_gt[k]]
    if not keys:
        raise ValueError("keys: none of the given images has a ground-truth map")
    views = run.views(methods)
    maps = {view: run.maps(*view, keys=keys) for view in views}
    pcc = {view: run.values("pcc", *view) for view in views} if "pcc" in run.metric_names else {}
    columns = len(views) + 2
    figure = _figure(panel_size * columns + 0.9, panel_size * len(keys) + 0.4)
    axes = figure.subplots(len(keys), columns, squeeze=False)
    norm = colors.Normalize(0.0, 1.0)
    for row, key in enumerate(keys):
        for ax in axes[row]:
            _clean(ax)
        image = _image_or_none(run, key)
        if image is None:
            _blank(axes[row, 0], "unreadable")
        else:
            axes[row, 0].imshow(image)
        axes[row, 0].set_title(_image_title(run, key), fontsize=8)
        axes[row, 0].set_ylabel(key, fontsize=7)
        axes[row, 1].imshow(normalize_map(run.ground_truth(key)), cmap=cmap, norm=norm)
        if row == 0:
            axes[row, 1].set_title("ground truth", fontsize=8)
        for column, view in enumerate(views, start=2):
            ax = axes[row, column]
            saliency = maps[view][row]
            title = [view_label(*view)] if row == 0 else []
            if view in pcc and np.isfinite(pcc[view][key]):
                title.append(f"PCC {pcc[view][key]:.2f}")
            ax.set_title("\n".join(title), fontsize=8)
            if np.isnan(saliency).all():
                _blank(ax, "failed")
                continue
            ax.imshow(normalize_map(saliency), cmap=cmap, norm=norm)
    bar = figure.colorbar(ScalarMappable(norm, cmap), ax=axes, fraction=0.03, pad=0.01, aspect=30)
    bar.set_label("min-max per map", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    return figure


def save_figure(figure: Figure, path: str | Path, *, pdf: bool = False, dpi: int = DPI) -> list[Path]:
    """Write ``figure`` as ``path`` + ``.png`` (and + ``.pdf`` with ``pdf``); returns the files.

    A ``.png`` or ``.pdf`` ending of ``path`` is dropped first; other dots stay (``features.29``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stem = path.name.removesuffix(".png").removesuffix(".pdf")
    written = [path.with_name(f"{stem}.png")] + ([path.with_name(f"{stem}.pdf")] if pdf else [])
    for target in written:
        figure.savefig(target, dpi=dpi, facecolor="white")
    return written
