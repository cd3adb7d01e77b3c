"""The notebooks run top to bottom (their cells assert what they show)."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = os.path.join(os.path.dirname(__file__), "..", "notebooks")


@pytest.mark.parametrize("name", ["quickstart.ipynb", "fewshot_text_classification.ipynb"])
def test_notebook_executes(name):
    nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    client = NotebookClient(  # run where a user opens it: notebooks/ (nothing is written there)
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": NOTEBOOKS}}
    )
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
