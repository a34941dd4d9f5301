"""docs/tour.ipynb and docs/recall.ipynb run against the current code (so they cannot rot), and
the committed copies carry their outputs and pictures."""

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
RECALL = ROOT / "docs" / "recall.ipynb"
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


def _execute(path, monkeypatch):
    """Run the notebook at ``path`` from a clean copy (outputs dropped) against this checkout;
    returns it executed and the seconds it took."""
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    # the kernel is a subprocess: let it import the checkout, and draw headless
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError on the first failing cell
    return nb, time.perf_counter() - start


def _text(nb):
    return "".join(out.get("text", "") for c in nb.cells if c.cell_type == "code" for out in c.outputs)


def test_tour_executes(monkeypatch):
    nb, elapsed = _execute(TOUR, monkeypatch)
    assert len(_images(nb)) >= 4
    text = _text(nb)
    assert "relative error vs dense attention" in text
    assert "PROVED" in "".join(str(out.get("data", {}).get("text/plain", "")) for c in nb.cells
                               if c.cell_type == "code" for out in c.outputs)
    assert elapsed < 120, f"the tour took {elapsed:.0f} s; keep it under a minute"


def test_committed_recall_has_outputs_pictures_and_its_run_record():
    nb = nbformat.read(RECALL, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.execution_count is not None for c in code), "commit the notebook executed"
    assert not any(out.output_type == "error" for c in code for out in c.outputs)
    assert len(_images(nb)) >= 2 and all(img.startswith(PNG) for img in _images(nb))
    text = _text(nb)
    for key in ("size", "device", "date", "commit", "wall time"):
        assert f"run record  {key}" in text, key


def test_recall_executes_at_the_tiny_size(monkeypatch):
    """The MQAR notebook end to end at its tiny CPU size: data, the four models at matched
    parameter counts, training with a progress counter, the accuracy grid, the plots, cached
    decoding equal to the one pass, the run record."""
    monkeypatch.setenv("HODLR_RECALL_SIZE", "tiny")
    nb, elapsed = _execute(RECALL, monkeypatch)
    assert len(_images(nb)) >= 2
    text = _text(nb)
    assert "mamba2 log-linear: 16/16" in text and "gated_deltanet linear: 16/16" in text
    assert "run record  size       tiny" in text
    gap = float(text.split("token by token vs one pass:")[1].split()[0])
    assert gap < 1e-4
    counts = {line.split()[0] + " " + line.split()[1]: int(line.split()[2]) for line in text.splitlines()
              if line.endswith(tuple("0123456789")) and line.split()[1:2] in (["log-linear"], ["linear"])}
    for family in ("mamba2", "gated_deltanet"):
        log, lin = counts[f"{family} log-linear"], counts[f"{family} linear"]
        assert abs(log - lin) <= 0.01 * log, (family, log, lin)
    assert elapsed < 90, f"the tiny recall run took {elapsed:.0f} s; keep it under a minute"
