"""``xai-pipeline report``: the files it writes, their links, image selection, and the page in a browser."""
from __future__ import annotations

import contextlib
import csv
import io
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import h5py
import pandas as pd
import pytest
import yaml
from PIL import Image

from pipeline.analysis import ReportError, load_run, select_images, write_report
from pipeline.cli import main
from tests.tiny_experiment import ConfigFactory, YamlWriter

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class _Links(HTMLParser):
    """Every src/href of a page, every table and the text of the table cells."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.images: list[str] = []
        self.tables = 0
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "img":
            self.images.append(values["src"] or "")
        for name in ("src", "href"):
            if values.get(name):
                self.links.append(values[name] or "")
        self.tables += tag == "table"

    def handle_data(self, data: str) -> None:
        self.text.append(data)


@pytest.fixture(scope="module")
def report(tiny_run: Path) -> Path:
    """The report folder written by the command line (quiet: stderr is not a terminal)."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        assert main(["report", str(tiny_run), "--images", "1", "--pdf", "--metric", "deletion"]) == 0
    assert stderr.getvalue() == ""
    return tiny_run / "report"


def _page(report: Path, name: str = "index.html") -> _Links:
    parser = _Links()
    parser.feed((report / name).read_text(encoding="utf-8"))
    return parser


def test_report_files_and_links_exist(report: Path) -> None:
    pages = {name: _page(report, name) for name in ("index.html", "selection.html")}
    for name, page in pages.items():
        local = [link.split("#")[0] for link in page.links if not link.startswith("#")]
        assert local, f"{name} links no files"
        for link in local:
            assert not re.match(r"^[a-z]+:", link) and not link.startswith("/"), f"not a relative link: {link}"
            assert (report / link).is_file(), f"{name} links a missing file: {link}"
    assert "selection.html#selection" in pages["index.html"].links
    pngs = sorted(p.relative_to(report).as_posix() for p in (report / "figures").glob("*.png"))
    assert sorted(pages["index.html"].images + pages["selection.html"].images) == pngs
    assert all("selection_" in image for image in pages["selection.html"].images)
    assert not any("selection_" in image for image in pages["index.html"].images)
    assert sorted(p.with_suffix(".pdf") for p in (report / "figures").glob("*.png")) == sorted(
        (report / "figures").glob("*.pdf"))
    md_images = [image for name in ("report.md", "selection.md")
                 for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", (report / name).read_text(encoding="utf-8"))]
    assert sorted(md_images) == pngs


def test_report_holds_tables_config_and_failures(report: Path, tiny_run: Path, broken_key: str) -> None:
    page = _page(report)
    text = " ".join(page.text)
    assert page.tables >= 6
    for title in ("Insertion ↑", "Deletion ↓", "PCC ↑", "Pointing game ↑"):
        assert title in text
    assert "tiny-analysis" in text and "pipeline.demo_model:ShapesNet" in text
    assert broken_key in text and "cannot read image" in text
    with open(tiny_run / "metrics.csv", newline="") as handle:
        values = [float(r["value"]) for r in csv.DictReader(handle)
                  if (r["metric"], r["method"], r["layer"]) == ("insertion", "rise", "-")]
    assert f"{sum(values) / len(values):.4f} ±" in text
    assert "<strong>" in (report / "index.html").read_text(encoding="utf-8")  # the best mean per column
    assert "<details><summary>Mean per class</summary>" in (report / "index.html").read_text(encoding="utf-8")
    markdown = (report / "report.md").read_text(encoding="utf-8")
    assert "| gradcam" in markdown and broken_key in markdown and "Deletion ↓" in markdown


def test_selection_follows_the_metric_direction(tiny_run: Path) -> None:
    run = load_run(tiny_run)
    with open(tiny_run / "metrics.csv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if (r["method"], r["layer"]) == ("gradcam", "layer3")]
    for metric, higher_is_better in (("insertion", True), ("deletion", False)):
        values = {r["key"]: float(r["value"]) for r in rows if r["metric"] == metric and r["value"]}
        ordered = sorted(values, key=lambda k: -values[k] if higher_is_better else values[k])
        groups = select_images(run, metric, "gradcam", "layer3", count=2)
        assert [k for k, _ in groups["best"]] == ordered[:2]
        assert [k for k, _ in groups["worst"]] == ordered[::-1][:2]
        median = sorted(values.values())[len(values) // 2 - 1: len(values) // 2 + 1]
        middle = sum(median) / 2
        rest = ordered[2:-2]
        expected = sorted(sorted(rest, key=lambda k: abs(values[k] - middle))[:2], key=ordered.index)
        assert [k for k, _ in groups["typical"]] == expected
        chosen = [k for items in groups.values() for k, _ in items]
        assert len(set(chosen)) == len(chosen) == min(6, len(values))  # unusable maps are not ranked


def test_bad_report_requests(tiny_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ReportError, match="'ssim' is not in this run"):
        write_report(tiny_run, metric="ssim")
    assert main(["report", str(tiny_run), "--images", "0"]) == 2
    assert "images must be >= 1" in capsys.readouterr().err


_PROBE = """<script>
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var broken = images.filter(function (i) { return !(i.complete && i.naturalWidth > 0); });
  document.title = "PROBE images=" + images.length + " broken=" + broken.length +
    " tables=" + document.querySelectorAll("table").length +
    " missing=" + broken.map(function (i) { return i.getAttribute("src"); }).join(",") + " END";
});
</script>"""


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed")
def test_report_opens_in_a_browser_without_a_server(report: Path, tmp_path: Path) -> None:
    """Every <img> of the page loads from disk; a deliberately missing one shows the probe can fail."""
    copy = tmp_path / "report"
    shutil.copytree(report, copy)
    page = (copy / "index.html").read_text(encoding="utf-8")
    expected_images = len(_page(report).images)
    canary = '<img src="figures/__missing__.png" alt="canary">'
    (copy / "probe.html").write_text(page.replace("</body>", f"{canary}{_PROBE}</body>"), encoding="utf-8")
    command = [
        str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000",
        "--dump-dom", (copy / "probe.html").as_uri(),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    found = re.search(r"PROBE images=(\d+) broken=(\d+) tables=(\d+) missing=(.*?) END", result.stdout)
    assert found, f"no probe result in the DOM; chromium said: {result.stderr[-2000:]}"
    images, broken, tables, missing = int(found[1]), int(found[2]), int(found[3]), found[4]
    assert images == expected_images + 1
    assert (broken, missing) == (1, "figures/__missing__.png")
    assert tables >= 6


def _displayed_height(report: Path, page: str) -> int:
    """The CSS pixels the page's open tables (30 per row) and figures take (shown at most 1400 px
    wide; small figures two side by side)."""
    text = re.sub(r"<details>.*?</details>", "", (report / page).read_text(encoding="utf-8"), flags=re.DOTALL)
    height = 30 * text.count("<tr>")
    for small, source, width in re.findall(r'<figure id="[^"]+"( class="small")?><a href="[^"]+"><img src="([^"]+)" '
                                           r'width="(\d+)"', text):
        with Image.open(report / source) as png:
            height += round(png.height * min(int(width), 1400) / png.width / (2 if small else 1))
    return height


def test_report_stays_short_with_many_views(tiny_run: Path, tmp_path: Path) -> None:
    """Twelve views (the run's three, four times): the first page stays under eight 1000-px screens,
    curves get one panel per view, the selection goes to the second page."""
    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy)
    with h5py.File(copy / "results.h5", "r+") as f:
        for group in ("maps", *(f"curves/{m}" for m in ("insertion", "deletion"))):
            for method in ("gradcam", "rise"):
                for copy_index in range(1, 4):
                    f.copy(f[f"{group}/{method}"], f[group], name=f"{method}{copy_index}")
    metrics = pd.read_parquet(copy / "metrics.parquet")
    copies = [metrics.assign(method=metrics["method"] + str(i), value=metrics["value"] + i / 100) for i in range(1, 4)]
    pd.concat([metrics, *copies]).to_parquet(copy / "metrics.parquet")
    config = yaml.safe_load((copy / "config.yaml").read_text())
    config["methods"] += [dict(m, id=f"{m['name']}{i}") for i in range(1, 4) for m in config["methods"]]
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    (copy / "comparison.csv").unlink()
    assert len(load_run(copy).views()) == 12
    write_report(copy, images=3, progress=False)
    report = copy / "report"
    assert _displayed_height(report, "index.html") < 8 * 1000
    assert _displayed_height(report, "selection.html") > 8 * 1000 - _displayed_height(report, "index.html")
    with Image.open(report / "figures" / "curves.png") as curves:
        assert curves.height > curves.width / 2  # facets: panels in rows


def test_report_says_which_differences_are_significant(report: Path) -> None:
    markdown = (report / "report.md").read_text(encoding="utf-8")
    assert "Which differences are significant" in markdown and "★" in markdown
    assert "Insertion ↑ (layer2)" in markdown
    assert (report / "figures" / "critical_difference_deletion.png").is_file()  # the report's --metric


def test_a_report_in_a_fresh_process_shows_a_plugin_method_and_a_plugin_metric(
    make_config: ConfigFactory, write_yaml: YamlWriter, tmp_path: Path
) -> None:
    raw = make_config()
    raw["plugins"] = ["tests.plugin_example"]
    raw["methods"] = [{"name": "gradcam", "layers": ["layer3"]},
                      {"name": "tests.plugin_example:AbsGradCam", "id": "abs-plugin", "layers": ["layer3"]}]
    raw["metrics"] = [{"name": "deletion", "params": {"step": 256}}, {"name": "sparsity", "params": {"quantile": 0.5}}]
    run_dir = tmp_path / "run"
    assert main(["run", str(write_yaml(raw)), "--out", str(run_dir), "--no-progress"]) == 0
    repo = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-m", "pipeline", "report", str(run_dir), "--images", "1", "--metric", "sparsity"],
                   cwd=repo, check=True, capture_output=True)
    page = _page(run_dir / "report")
    cells = [text.strip() for text in page.text]
    assert "abs-plugin" in cells and "gradcam" in cells
    assert "Sparsity ↑" in cells and "Deletion ↓" in cells
    assert "figures/heatmap_sparsity.png" in page.images
    selection = (run_dir / "report" / "selection.html").read_text(encoding="utf-8")
    assert "abs-plugin" in selection and "Sparsity" in selection


def test_report_draws_the_randomization_cascade(randomization_run: Path) -> None:
    index = write_report(randomization_run, images=2)
    page = _page(index.parent)
    assert "figures/randomization.png" in page.images
    assert "Randomization ↓" in " ".join(page.text)
    assert (index.parent / "figures" / "randomization.png").is_file()
