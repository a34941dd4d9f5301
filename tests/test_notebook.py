"""docs/tour.ipynb runs against the current code (so it cannot rot), and the committed copy
carries its outputs and pictures."""

import base64
import os
import pathlib
import time

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOUR = ROOT / "docs" / "tour.ipynb"
PNG = b"\x89PNG\r\n\x1a\n"


def _images(nb):
    return [
        base64.b64decode(out["data"]["image/png"])
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if "image/png" in out.get("data", {})
    ]


def test_committed_tour_has_outputs_and_pictures():
    nb = nbformat.read(TOUR, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.execution_count is not None for c in code), "commit the notebook executed"
    assert not any(out.output_type == "error" for c in code for out in c.outputs)
    images = _images(nb)
    assert len(images) >= 4 and all(img.startswith(PNG) for img in images)


def test_tour_executes(monkeypatch):
    nb = nbformat.read(TOUR, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    # the kernel is a subprocess: let it import the checkout, and draw headless
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": str(TOUR.parent)}})
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError on the first failing cell
    elapsed = time.perf_counter() - start
    assert len(_images(nb)) >= 4
    text = "".join(out.get("text", "") for c in nb.cells if c.cell_type == "code" for out in c.outputs)
    assert "relative error vs dense attention" in text
    assert "PROVED" in "".join(str(out.get("data", {}).get("text/plain", "")) for c in nb.cells
                               if c.cell_type == "code" for out in c.outputs)
    assert elapsed < 120, f"the tour took {elapsed:.0f} s; keep it under a minute"
