"""The labs in notebooks/ run top to bottom in quick mode (MINILD_QUICK=1), and are stored
without outputs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
KERNEL_NAME = "minild-tests"


@pytest.fixture(scope="session")
def classifier_cache(tmp_path_factory) -> Path:
    """One MINILD_CACHE for every notebook: the quick digit classifier trains once, not per lab."""
    return tmp_path_factory.mktemp("minild-cache")


@pytest.fixture
def quick_kernel(tmp_path, monkeypatch, classifier_cache) -> str:
    """A kernelspec running this interpreter, and the quick-mode environment the kernel inherits."""
    kernel_dir = tmp_path / "jupyter" / "kernels" / KERNEL_NAME
    kernel_dir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "minild tests", "language": "python"}
    (kernel_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("MINILD_QUICK", "1")
    monkeypatch.setenv("MINILD_CACHE", str(classifier_cache))  # the digit classifier trains here
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("MINILD_SDXL_MODEL", raising=False)  # the prompt lab builds its tiny offline SDXL
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny models; threads only fight over busy cores
    return KERNEL_NAME


def execute(notebook: nbformat.NotebookNode, kernel_name: str) -> None:
    client = NotebookClient(
        notebook, timeout=300, kernel_name=kernel_name, resources={"metadata": {"path": str(NOTEBOOK_DIR)}}
    )
    client.execute()  # raises CellExecutionError, naming the cell, when one fails


def test_the_labs_are_present():
    assert [path.name for path in NOTEBOOKS] == [
        "01_diffusion_theory.ipynb", "02_ddpm_digits.ipynb", "03_cfg_digits.ipynb", "04_latent_digits.ipynb",
        "05_sdxl_prompt_lab.ipynb", "06_text_latent_digits.ipynb",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_is_stored_valid_and_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name} cell {index} has outputs: clear them before committing"
            assert cell.execution_count is None, f"{path.name} cell {index} has an execution count"
    assert notebook.cells[0].cell_type == "markdown", "a lab opens with a markdown cell saying what it teaches"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_runs_top_to_bottom_in_quick_mode(path, quick_kernel):
    notebook = nbformat.read(path, as_version=4)
    execute(notebook, quick_kernel)
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert any("image/png" in output.get("data", {}) for output in outputs), f"{path.name} drew no figure"


def test_a_failing_cell_fails_the_run(quick_kernel):
    notebook = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("import os\nassert os.environ['MINILD_QUICK'] == '1'"),
        nbformat.v4.new_code_cell("raise ValueError('this cell fails')"),
    ])
    with pytest.raises(CellExecutionError, match="this cell fails"):
        execute(notebook, quick_kernel)
