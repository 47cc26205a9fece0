"""``analysis/explore_run.ipynb`` runs top to bottom on a small run, in a kernel of this interpreter."""
from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[2] / "analysis" / "explore_run.ipynb"


def test_explore_run_notebook_executes(tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XAI_RUN_DIR", str(tiny_run))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert notebook.metadata.kernelspec.name == "python3"
    # "python3" is started with this interpreter (jupyter_client swaps a bare `python` for sys.executable)
    client = NotebookClient(notebook, kernel_name="python3", timeout=180,
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.execution_count for cell in code)
    errors = [o for cell in code for o in cell.outputs if o.output_type == "error"]
    assert not errors
    figures = [o for cell in code for o in cell.outputs if "image/png" in o.get("data", {})]
    assert len(figures) >= 7
    text = "".join(o.get("text", "") for cell in code for o in cell.outputs)
    assert "9 images, 1 failed" in text
