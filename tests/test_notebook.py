"""The example notebook runs top to bottom on a fresh kernel and shows what it promises."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "probing.ipynb"


def outputs_of(cell: nbformat.NotebookNode) -> tuple[str, list[str]]:
    """(printed text, mime types of displayed results) of one executed code cell."""
    text = "".join(out.get("text", "") for out in cell.outputs if out.output_type == "stream" and out.name == "stdout")
    shown = [mime for out in cell.outputs if out.output_type in ("execute_result", "display_data") for mime in out.data]
    return text, shown


def test_the_probing_notebook_runs_top_to_bottom(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("VPMOE_CHECKPOINT", raising=False)  # the notebook trains its own tiny checkpoint,
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # into a temporary folder that pytest cleans up
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), "commit it cleared"
    # "python3" is the running interpreter's own ipykernel: jupyter_client swaps the kernelspec's `python` for
    # sys.executable, so no kernel needs installing.
    NotebookClient(notebook, kernel_name="python3", timeout=240,
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    code = [outputs_of(cell) for cell in notebook.cells if cell.cell_type == "code"]
    printed = "\n".join(text for text, _ in code)
    figures = sum("application/vnd.plotly.v1+json" in shown for _, shown in code)
    assert "MoE layers (2, 3, 4, 5, 6, 7, 8), 16 experts, top-4" in printed
    assert "'kind': 'local', 'window': 32" in printed
    assert "MaxVio (floor)" in printed and "overall: " in printed
    assert "scaling it by 1 changes nothing: 0.0" in printed
    assert figures == 4
