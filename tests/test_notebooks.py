"""Every notebook in notebooks/ runs top to bottom (quick mode, ATTUNET_QUICK=1)."""

import glob
import os

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK_DIR = os.path.join(os.path.dirname(__file__), os.pardir, "notebooks")
NOTEBOOKS = sorted(glob.glob(os.path.join(NOTEBOOK_DIR, "*.ipynb")))


def test_the_three_notebooks_are_there():
    names = [os.path.basename(path) for path in NOTEBOOKS]
    assert names == ["01_quickstart.ipynb", "02_train_nuclei.ipynb",
                     "03_scale_and_deploy.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, tmp_path, monkeypatch):
    monkeypatch.setenv("ATTUNET_QUICK", "1")
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code"
               for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    assert any(output.output_type in ("display_data", "execute_result", "stream")
               for output in outputs)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_committed_notebooks_carry_the_full_run_outputs(path):
    """The committed outputs come from a full (not quick) run, so readers see real plots."""
    notebook = nbformat.read(path, as_version=4)
    switch = next(cell for cell in notebook.cells
                  if cell.cell_type == "code" and "QUICK = os.environ" in cell.source)
    results = [output.data["text/plain"] for output in switch.outputs
               if output.output_type == "execute_result"]
    assert results == ["False"]
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert sum(bool(cell.outputs) for cell in code) >= len(code) - 2
