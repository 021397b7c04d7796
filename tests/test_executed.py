"""The executed copy follows papermill's conventions, so papermill's tools read it."""

from __future__ import annotations

import json

import nbformat

import nbflow


def test_successful_executed_notebook_is_valid_and_papermill_shaped(fixture_pipeline):
    root = fixture_pipeline("diamond")
    result = nbflow.run(root, ["a"], parameters={"scale": 3}, display=False)
    path = root / result.steps["a"].notebook
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    meta = nb.metadata.papermill
    assert meta.parameters == {"scale": 3} and meta.exception is False and meta.input_path == "a.ipynb"
    injected = nb.cells[1]
    assert injected.metadata.tags == ["injected-parameters"] and injected.source == "# Parameters\nscale = 3\n"
    assert all(c.metadata.papermill.status == "completed" for c in nb.cells if c.cell_type == "code")
    assert nb.cells[2].outputs[0].data['text/plain'] == '2' and nb.cells[2].execution_count == 3  # write() -> 2


def test_failed_notebook_has_banner_anchor_and_marked_cell(fixture_pipeline):
    from papermill.execute import remove_error_markers

    root = fixture_pipeline("step_raises")
    result = nbflow.run(root, ["boom"], display=False)
    nb = nbformat.read(root / result.steps["boom"].notebook, as_version=4)
    nbformat.validate(nb)
    banner, anchor = nb.cells[0], next(c for c in nb.cells if 'id="papermill-error-cell"' in c.source)
    assert "papermill-error-cell-tag" in banner.metadata.tags and "ZeroDivisionError" in banner.source
    failed = nb.cells[nb.cells.index(anchor) + 1]
    assert failed.source == "y = 10 / value"
    assert failed.metadata.papermill.status == "failed" and failed.metadata.papermill.exception is True
    assert failed.outputs[-1].output_type == "error" and failed.outputs[-1].ename == "ZeroDivisionError"
    assert nb.metadata.papermill.exception is True
    later = nb.cells[nb.cells.index(failed) + 1]
    assert later.metadata.papermill.status == "pending"  # never ran
    before = len(nb.cells)
    assert len(remove_error_markers(nb).cells) == before - 2  # papermill strips our markers


def test_cancelled_and_failed_copies_keep_outputs_so_far(fixture_pipeline):
    root = fixture_pipeline("step_raises")
    result = nbflow.run(root, ["boom"], display=False)
    data = json.loads((root / result.steps["boom"].notebook).read_text())
    ran = [c for c in data["cells"] if c["cell_type"] == "code" and c.get("execution_count")]
    assert len(ran) == 3  # parameters, x = 1, the failing cell
