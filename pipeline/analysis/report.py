"""The report of a finished run: ``RUN_DIR/report/index.html`` and ``report.md``, and a second
page ``selection.html`` / ``selection.md``.

The first page holds the run's overview and config, the summary tables (mean ± 95%
confidence interval and mean ± variance with the best mean per column in bold, image
counts; the means per class and the failures collapsed), the figures of
:mod:`pipeline.analysis.plots`; it stays a few screens long whatever the number of methods
(curves get one panel per view above :data:`~pipeline.analysis.plots.MAX_BANDS` views; the
randomization test's cascade is drawn for its mean and a few images).
The second page holds each view's best, typical and worst images. Figures are PNG
files in ``report/figures/`` (PDF beside them on request), referenced by relative
paths, so the page opens from disk in any browser, with no server and no script.

Images are chosen by one metric (``metric``, default insertion when the run has it):
the overview and ground-truth figures show a sample spread over the classes, and each
view (method and layer) gets its best, typical (nearest the median) and worst images.
"""
from __future__ import annotations

import dataclasses
import datetime
import html
import re
import shutil
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import yaml
from matplotlib.figure import Figure
from PIL import Image

from ..config import config_dict
from ..errors import PipelineError
from ..metrics import METRICS
from ..planning import NO_LAYER
from ..tables import combined_table, format_number, metric_title, summarize, wide_summary
from .plots import (
    DPI,
    MAX_BANDS,
    critical_difference_diagram,
    curve_plot,
    ground_truth_comparison,
    metric_distributions,
    metric_heatmap,
    overlay_grid,
    randomization_cascade,
    save_figure,
)
from .run import Run, View, load_run, view_label

__all__ = ["ReportError", "write_report", "select_images", "sample_images", "default_metric", "REPORT_DIR"]

REPORT_DIR = "report"
_FIGURES = "figures"
#: above this many classes the per-class table is left out of the report
_MAX_CLASS_ROWS = 20
_MAX_FAILURE_ROWS = 200
#: images whose randomization cascade the report draws beside the mean
_CASCADE_IMAGES = 3
#: figures are shown at this many CSS pixels per inch (the PNG keeps its full resolution for zooming)
_SCREEN_DPI = 100


class ReportError(PipelineError, ValueError):
    """The report cannot be made as asked (e.g. an unknown metric)."""


def default_metric(run: Run) -> str | None:
    """The metric images are chosen by when none is given: insertion, else the run's first metric."""
    names = run.metric_names
    return "insertion" if "insertion" in names else (names[0] if names else None)


def sample_images(run: Run, count: int, *, with_ground_truth: bool = False) -> list[str]:
    """Up to ``count`` keys of images that did not fail and whose maps the run kept, taken in turn
    from each class (key order).

    ``with_ground_truth`` keeps only images that have a ground-truth map.
    """
    images = run.images
    usable = images[~images["failed"] & run.has_maps & (images["has_gt"] | (not with_ground_truth))]
    by_class = [list(group["key"]) for _, group in usable.groupby("label", sort=True)]
    chosen: list[str] = []
    for position in range(max((len(keys) for keys in by_class), default=0)):
        chosen.extend(keys[position] for keys in by_class if position < len(keys))
    return chosen[:count]


def select_images(run: Run, metric: str, method: str, layer: str | None = None,
                  count: int = 3) -> dict[str, list[tuple[str, float]]]:
    """The ``count`` best, typical and worst images of one view by ``metric``, as (key, value) pairs.

    Best and worst follow the metric's direction (higher is better for insertion, lower
    for deletion); typical images are those nearest the median. The three groups do not
    overlap; with few images the later groups (worst, then typical) get fewer. Ties are
    broken by key order. Only images whose maps the run kept are chosen.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    values = run.values(metric, method, layer)[run.has_maps].dropna()
    spec = METRICS.get(metric)
    higher_is_better = spec is None or spec.higher_is_better
    ranked = values.sort_values(ascending=not higher_is_better, kind="stable")
    best = list(ranked.index[:count])
    rest = ranked.drop(best)
    worst = list(rest.index[::-1][:count])
    rest = rest.drop(worst)
    distance = (rest - values.median()).abs().sort_values(kind="stable")
    rank = {key: position for position, key in enumerate(ranked.index)}
    typical = sorted(distance.index[:count], key=rank.__getitem__)
    return {group: [(key, float(values[key])) for key in keys]
            for group, keys in (("best", best), ("typical", typical), ("worst", worst))}


# -- content blocks, rendered to HTML and Markdown -------------------------------------------

@dataclasses.dataclass
class _Table:
    frame: pd.DataFrame
    caption: str = ""
    header: bool = True
    collapsed: bool = False


@dataclasses.dataclass
class _Figure:
    name: str
    caption: str
    make: Callable[[], Figure]
    small: bool = False
    files: list[Path] = dataclasses.field(default_factory=list)
    width: int = 0


@dataclasses.dataclass
class _Section:
    title: str
    anchor: str
    blocks: list[object] = dataclasses.field(default_factory=list)
    page: str = "index"


@dataclasses.dataclass
class _Text:
    text: str
    preformatted: bool = False


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


def _ordered(run: Run, summary: pd.DataFrame) -> pd.DataFrame:
    """``summary`` with its rows in the run's view order, then its metric order (the config's)."""
    view_rank = {view: rank for rank, view in enumerate(run.views())}
    metric_rank = {metric: rank for rank, metric in enumerate(run.metric_names)}
    ranks = [(view_rank.get((m, l), len(view_rank)), metric_rank.get(x, len(metric_rank)))
             for m, l, x in zip(summary["method"], summary["layer"], summary["metric"])]
    order = sorted(range(len(summary)), key=ranks.__getitem__)
    return summary.iloc[order].reset_index(drop=True)


def _count_table(summary: pd.DataFrame, by: Sequence[str]) -> pd.DataFrame:
    table = wide_summary(summary, statistic="count", by=by)
    for column in table.columns[len(by):]:
        table[column] = table[column].astype("Int64")
    return table


def _overview(run: Run) -> pd.DataFrame:
    images = run.images
    usable = images[~images["failed"]]
    accuracy = float((usable["predicted"] == usable["label"]).mean()) if len(usable) else float("nan")
    rows = [
        ("run folder", str(run.path.resolve())),
        ("experiment", run.config.name),
        ("images", f"{len(images)} ({int(images['failed'].sum())} failed, {int(images['has_gt'].sum())} "
                   f"with a ground-truth map)"),
        ("classes", ", ".join(run.class_names)),
        ("explained class", run.config.target),
        ("model accuracy on these images", f"{accuracy:.3f}"),
        ("methods (layers)", "; ".join(f"{m} ({', '.join(run.layers(m))})" for m in run.methods)),
        ("metrics", ", ".join(metric_title(m) for m in run.metric_names) or "(none)"),
    ]
    return pd.DataFrame(rows, columns=["", "value"])


def _significance(run: Run, metric: str | None) -> _Section:
    """Mean rank of every method per metric and layer, ★ marking the best group (``comparison.csv``
    of the run folder when there is one, else :func:`pipeline.comparison.compare`)."""
    from ..comparison import best_group, compare

    saved = run.path / "comparison.csv"
    table = pd.read_csv(saved, keep_default_na=False) if saved.is_file() else compare(run.metrics)
    section = _Section("Which differences are significant", "significance")
    if table.empty:
        section.blocks.append(_Text("No metric has two methods with values on the same images."))
        return section
    cells: dict[str, dict[str, str]] = {}
    for (name, layer), group in table.groupby(["metric", "layer"], sort=True):
        best = set(best_group(group))
        column = metric_title(str(name)) + ("" if layer == NO_LAYER else f" ({layer})")
        ranks = dict(zip(group["method_a"], group["mean_rank_a"])) | dict(zip(group["method_b"], group["mean_rank_b"]))
        cells[column] = {m: f"{r:.2f}{' ★' if m in best else ''}" for m, r in ranks.items()}
    frame = pd.DataFrame(cells).fillna("")
    frame.index.name = "method"
    section.blocks.append(_Table(frame.reset_index(), "Mean rank over the images each group shares (1 = best); ★: "
                                 "the best-ranked method and those not significantly different from it (Wilcoxon "
                                 "signed-rank, Holm-adjusted p >= 0.05). Methods without layers are ranked in every "
                                 "layer's group. Tests, intervals and effect sizes: comparison.csv / comparison.md."))
    if metric is not None and metric in set(table["metric"]):
        section.blocks.append(_Figure(
            f"critical_difference_{_safe(metric)}",
            f"{metric_title(metric)}: mean ranks; bars join methods not significantly different.",
            lambda: critical_difference_diagram(run, metric)))
    return section


def _sections(run: Run, metric: str | None, count: int) -> list[_Section]:
    sample = sample_images(run, count)
    views = run.views()
    sections = [
        _Section("Run", "run", [_Table(_overview(run), header=False)]),
        _warnings(run),
        _Section("Configuration (config.yaml)", "config", [
            _Text(yaml.safe_dump(config_dict(run.config), sort_keys=False, allow_unicode=True), preformatted=True)
        ]),
    ]
    if run.metric_names:
        summary = _ordered(run, run.summary())
        tables: list[object] = [
            _Table(combined_table(summary, "ci95"), "Mean ± half-width of the 95% confidence interval (Student t); "
                   "bold: the best mean of each column"),
            _Table(combined_table(summary, "var"), "Mean ± variance (ddof = 1), as in summary.md and summary.tex"),
            _Table(_count_table(summary, ["method", "layer"]), "Images with a value"),
        ]
        if len(run.class_names) <= _MAX_CLASS_ROWS:
            by_class = _ordered(run, summarize(run.metrics, group_by_class=True))
            tables.append(_Table(wide_summary(by_class, statistic="mean", by=["method", "layer", "class_name"]),
                                 "Mean per class", collapsed=True))
        else:
            tables.append(_Text(f"{len(run.class_names)} classes: the means per class are left out here; "
                                "see `load_run(RUN_DIR).summary(group_by_class=True)`."))
        sections.append(_Section("Summary", "summary", tables))
        sections.append(_significance(run, metric))
    figures = _Section("Figures", "figures")
    if sample:
        figures.blocks.append(_Figure(
            "overview", f"Saliency maps of {len(sample)} images (one per class in turn) for every method and layer; "
                        "titles give the explained class and its probability.",
            lambda: overlay_grid(run, sample)))
    curve_metrics = [m for m in ("insertion", "deletion") if m in run.curve_metrics]
    if curve_metrics:
        figures.blocks.append(_Figure(
            "curves", "Mean " + " and ".join(metric_title(m) for m in curve_metrics)
                      + " curves with their 95% confidence band; the legend gives the area under the mean curve.",
            lambda: curve_plot(run, curve_metrics, facets=len(views) > MAX_BANDS)))
    if "randomization" in run.curve_metrics:
        figures.blocks.append(_Figure(
            "randomization", "Randomization test (Adebayo et al. 2018): Spearman correlation between each "
                             "image's map and the map of the model whose top blocks are re-initialized, step by "
                             "step; a method near 1 ignores the model.",
            lambda: randomization_cascade(run, sample[:_CASCADE_IMAGES])))
    if run.metric_names:
        figures.blocks.append(_Figure(
            "distributions", "Per-image metric values (box: quartiles and median; points: images).",
            lambda: metric_distributions(run)))
        for name in run.metric_names:
            figures.blocks.append(_Figure(
                f"heatmap_{_safe(name)}", f"{metric_title(name)}: mean per method (rows) and layer (columns).",
                lambda name=name: metric_heatmap(run, name), small=True))
    with_gt = sample_images(run, count, with_ground_truth=True)
    if with_gt:
        figures.blocks.append(_Figure(
            "ground_truth", "Images, their ground-truth maps and every method's map (PCC in the titles when scored).",
            lambda: ground_truth_comparison(run, with_gt)))
    sections.append(figures)
    if metric is not None:
        selection = _Section(f"Best, typical and worst images by {metric_title(metric)}", "selection",
                             page="selection")
        for index, view in enumerate(views):
            _add_selection(selection, run, metric, view, index, count)
        sections.append(selection)
    sections.append(_failures(run))
    return sections


def _add_selection(section: _Section, run: Run, metric: str, view: View, index: int, count: int) -> None:
    groups = select_images(run, metric, *view, count=count)
    chosen = [(group, position, key, value) for group, items in groups.items()
              for position, (key, value) in enumerate(items, start=1)]
    label = view_label(*view)
    if not chosen:
        section.blocks.append(_Text(f"{label}: no image has a {metric_title(metric)} value."))
        return
    keys = [key for _, _, key, _ in chosen]
    row_labels = [f"{group} {position}: {value:.3f}" for group, position, _, value in chosen]
    section.blocks.append(_Figure(
        f"selection_{index:02d}_{_safe(label)}",
        f"{label}: the best, typical and worst images by {metric_title(metric)} (value beside each row).",
        lambda: overlay_grid(run, keys, [view], row_labels=row_labels)))


def _warnings(run: Run) -> _Section:
    """The warnings reduce wrote (warnings.md), one paragraph each."""
    section = _Section("Warnings", "warnings")
    path = run.path / "warnings.md"
    lines = [line[2:] for line in path.read_text().splitlines() if line.startswith("- ")] if path.is_file() else []
    section.blocks += [_Text(line) for line in lines] or [_Text("No warnings." if path.is_file() else
                                                               "This run was reduced before warnings were written.")]
    return section


def _failures(run: Run) -> _Section:
    section = _Section("Failures", "failures")
    failures = run.failures
    if failures.empty:
        section.blocks.append(_Text("The run recorded no failures."))
        return section
    shown = f"; the first {_MAX_FAILURE_ROWS} are listed" if len(failures) > _MAX_FAILURE_ROWS else ""
    section.blocks.append(_Table(failures.head(_MAX_FAILURE_ROWS),
                                 f"{len(failures)} image(s) could not be explained or scored{shown} "
                                 f"(all of them are in {run.path / 'failures.csv'}).", collapsed=True))
    return section


# -- rendering -------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2rem auto;
       max-width: 1400px; padding: 0 1.5rem; color: #222; line-height: 1.45; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; } h2 { margin-top: 2.4rem; border-bottom: 1px solid #ddd; }
nav a { margin-right: 1rem; } .meta { color: #666; font-size: .9rem; }
table { border-collapse: collapse; margin: .6rem 0 1.4rem; font-size: .85rem; }
th, td { border: 1px solid #ddd; padding: .25rem .6rem; text-align: left; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
caption { caption-side: top; text-align: left; font-weight: 600; padding: .3rem 0; }
pre { background: #f7f7f7; padding: 1rem; overflow-x: auto; font-size: .8rem; }
figure { margin: 1.2rem 0 2rem; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figure.small { display: inline-block; vertical-align: top; max-width: 48%; margin-right: 1.5rem; }
figcaption { font-size: .85rem; color: #444; } summary { cursor: pointer; color: #0645ad; }
"""


_NUMBER = r"-?[0-9.]+(?:e[-+][0-9]+)?"


def _html_cell(value: object) -> str:
    if isinstance(value, str) and re.fullmatch(rf"(\*\*)?{_NUMBER}( ± {_NUMBER})?\1", value):
        bold = value.startswith("**")
        return f'<td class="num">{"<strong>" if bold else ""}{value.strip("*")}{"</strong>" if bold else ""}</td>'
    if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)):
        return '<td class="num">–</td>'
    if isinstance(value, (bool, np.bool_)):
        return f"<td>{value}</td>"
    if isinstance(value, (int, np.integer)):
        return f'<td class="num">{value}</td>'
    if isinstance(value, (float, np.floating)):
        return f'<td class="num">{format_number(float(value))}</td>'
    return f"<td>{html.escape(str(value))}</td>"


def _html_table(table: _Table) -> str:
    """A table with numbers right-aligned (class ``num``) and everything escaped (in a closed
    ``<details>`` when ``collapsed``)."""
    parts = [f"<details><summary>{html.escape(table.caption)}</summary>" if table.collapsed else "", "<table>"]
    if table.caption:
        parts.append(f"<caption>{html.escape(table.caption)}</caption>")
    if table.header:
        parts.append("<thead><tr>" + "".join(f"<th>{html.escape(str(c))}</th>" for c in table.frame.columns)
                     + "</tr></thead>")
    parts.append("<tbody>")
    for row in table.frame.itertuples(index=False):
        parts.append("<tr>" + "".join(_html_cell(value) for value in row) + "</tr>")
    parts.append("</tbody></table>" + ("</details>" if table.collapsed else ""))
    return "\n".join(parts)


def _md_cell(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _md_table(table: _Table) -> str:
    """A Markdown table; a ``collapsed`` one inside ``<details>`` (shown closed where HTML is rendered)."""
    frame = table.frame.astype(object)
    frame = frame.where(frame.notna(), None).map(lambda v: v if v is None or isinstance(v, float) else _md_cell(v))
    frame = frame.map(lambda v: format_number(v) if isinstance(v, float) else v)
    text = frame.to_markdown(index=False, missingval="–", disable_numparse=True)
    if table.collapsed:
        return f"<details><summary>{html.escape(table.caption)}</summary>\n\n{text}\n\n</details>\n"
    return (f"**{table.caption}**\n\n" if table.caption else "") + text + "\n"


#: the report's pages: (HTML file, Markdown file)
_PAGES = {"index": ("index.html", "report.md"), "selection": ("selection.html", "selection.md")}


def _nav(sections: list[_Section], page: str, markdown: bool) -> str:
    """Links to every section: anchors on this page, the other page's file for the others."""
    links = []
    for section in sections:
        target = "" if section.page == page else _PAGES[section.page][int(markdown)]
        links.append(f"[{section.title}]({target}#{section.anchor})" if markdown
                     else f'<a href="{target}#{section.anchor}">{html.escape(section.title)}</a>')
    return " · ".join(links) if markdown else "<nav>" + "".join(links) + "</nav>"


def _render_html(run: Run, sections: list[_Section], created: str, page: str) -> str:
    parts = [
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>Report: {html.escape(run.config.name)}</title>", f"<style>{_CSS}</style>", "</head>", "<body>",
        f"<h1>Saliency report: {html.escape(run.config.name)}</h1>",
        f'<p class="meta">{html.escape(str(run.path.resolve()))} · made {created}</p>',
        _nav(sections, page, markdown=False),
    ]
    for section in (s for s in sections if s.page == page):
        parts.append(f'<section id="{section.anchor}"><h2>{html.escape(section.title)}</h2>')
        for block in section.blocks:
            if isinstance(block, _Table):
                parts.append(_html_table(block))
            elif isinstance(block, _Text):
                text = html.escape(block.text)
                parts.append(f"<details><summary>show</summary><pre>{text}</pre></details>" if block.preformatted
                             else f"<p>{text}</p>")
            elif isinstance(block, _Figure) and block.files:
                png = block.files[0].relative_to(block.files[0].parent.parent).as_posix()
                links = "".join(f' · <a href="{f.relative_to(f.parent.parent).as_posix()}">PDF</a>'
                                for f in block.files[1:])
                kind = ' class="small"' if block.small else ""
                parts.append(
                    f'<figure id="{block.name}"{kind}><a href="{png}"><img src="{png}" width="{block.width}" '
                    f'alt="{html.escape(block.caption)}"></a><figcaption>{html.escape(block.caption)}{links}'
                    "</figcaption></figure>"
                )
        parts.append("</section>")
    parts += ["</body>", "</html>"]
    return "\n".join(parts) + "\n"


def _render_markdown(run: Run, sections: list[_Section], created: str, page: str) -> str:
    parts = [f"# Saliency report: {run.config.name}", "", f"`{run.path.resolve()}` · made {created}", "",
             _nav(sections, page, markdown=True), ""]
    for section in (s for s in sections if s.page == page):
        parts += [f"## {section.title}", ""]
        for block in section.blocks:
            if isinstance(block, _Table):
                parts.append(_md_table(block))
            elif isinstance(block, _Text):
                parts += (["```yaml", block.text.rstrip(), "```"] if block.preformatted else [block.text])
                parts.append("")
            elif isinstance(block, _Figure) and block.files:
                png = block.files[0].relative_to(block.files[0].parent.parent).as_posix()
                pdfs = "".join(f" ([PDF]({f.relative_to(f.parent.parent).as_posix()}))" for f in block.files[1:])
                parts += [f"![{block.caption}]({png})", "", f"*{block.caption}*{pdfs}", ""]
    return "\n".join(parts) + "\n"


def write_report(
    run_dir: str | Path,
    *,
    metric: str | None = None,
    images: int = 3,
    pdf: bool = False,
    dpi: int = DPI,
    progress: bool | None = None,
) -> Path:
    """Write ``RUN_DIR/report/index.html``, ``report.md`` and the second page (see the module
    docstring); returns the path of index.html.

    ``metric`` chooses the best/typical/worst images (default :func:`default_metric`),
    ``images`` is how many images per group (and in the overview sample), ``pdf`` also
    saves every figure as PDF. ``progress``: None shows a bar only on a terminal.
    Figures of an earlier report in ``report/figures`` are replaced.
    """
    from tqdm.auto import tqdm

    if images < 1:
        raise ReportError(f"images must be >= 1, got {images}")
    run = load_run(run_dir)
    if metric is None:
        metric = default_metric(run)
    elif metric not in run.metric_names:
        known = ", ".join(run.metric_names) or "(none)"
        raise ReportError(f"metric {metric!r} is not in this run; its metrics: {known}")
    out = run.path / REPORT_DIR
    shutil.rmtree(out / _FIGURES, ignore_errors=True)
    for names in _PAGES.values():
        for name in names:
            (out / name).unlink(missing_ok=True)
    (out / _FIGURES).mkdir(parents=True)
    sections = _sections(run, metric, images)
    figures = [block for section in sections for block in section.blocks if isinstance(block, _Figure)]
    for figure in tqdm(figures, desc="report", unit="figure", disable=None if progress is None else not progress):
        figure.files = save_figure(figure.make(), out / _FIGURES / figure.name, pdf=pdf, dpi=dpi)
        with Image.open(figure.files[0]) as png:
            figure.width = round(png.width * _SCREEN_DPI / dpi)
    created = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    for page, (html_name, markdown_name) in _PAGES.items():
        if any(section.page == page for section in sections):
            (out / markdown_name).write_text(_render_markdown(run, sections, created, page), encoding="utf-8")
            (out / html_name).write_text(_render_html(run, sections, created, page), encoding="utf-8")
    index = out / "index.html"
    return index
