"""Offline analysis of a finished run: loading, figures and the report.

:func:`load_run` opens a reduced run folder; the plot helpers draw its maps, curves
and metric tables as matplotlib figures; :func:`overlay` blends any map over any image; :func:`write_report` assembles everything
into ``RUN_DIR/report/index.html`` and ``report.md`` (``xai-pipeline report``).
"""
from .overlay import as_rgb, overlay
from .plots import (
    DPI,
    MAX_BANDS,
    SALIENCY_CMAP,
    curve_area,
    curve_plot,
    randomization_cascade,
    ground_truth_comparison,
    metric_distributions,
    metric_heatmap,
    normalize_map,
    overlay_grid,
    palette,
    save_figure,
)
from .report import REPORT_DIR, ReportError, default_metric, sample_images, select_images, write_report
from .run import Run, View, load_run, view_label

__all__ = [
    "Run",
    "View",
    "load_run",
    "view_label",
    "overlay",
    "as_rgb",
    "overlay_grid",
    "curve_plot",
    "randomization_cascade",
    "palette",
    "MAX_BANDS",
    "curve_area",
    "metric_distributions",
    "metric_heatmap",
    "ground_truth_comparison",
    "normalize_map",
    "save_figure",
    "DPI",
    "SALIENCY_CMAP",
    "write_report",
    "select_images",
    "sample_images",
    "default_metric",
    "ReportError",
    "REPORT_DIR",
]
