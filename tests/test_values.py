"""nbflow.glue / load_value: formats and the scrapbook-compatible record."""

from __future__ import annotations

import pandas as pd

from nbflow.values import glue, load_value


def test_values_round_trip_in_their_format(tmp_path, monkeypatch):
    monkeypatch.setenv("NBFLOW_VALUES_DIR", str(tmp_path))
    frame = pd.DataFrame({"x": range(10_000), "y": ["a"] * 10_000})
    glue("frame", frame)
    glue("number", 3.5)
    glue("things", {1, 2})
    assert (tmp_path / "frame").read_bytes()[:4] == b"PAR1"
    assert (tmp_path / "number").read_text() == "3.5"
    pd.testing.assert_frame_equal(load_value(tmp_path / "frame"), frame)
    assert load_value(tmp_path / "number") == 3.5
    assert load_value(tmp_path / "things") == {1, 2}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_glue_by_hand_records_a_scrapbook_scrap(tmp_path, notebook_factory):
    import nbformat
    import scrapbook
    from nbclient import NotebookClient

    path = notebook_factory(tmp_path / "g.ipynb", "n = 2", "import nbflow\nnbflow.glue('answer', n * 21)")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, resources={"metadata": {"path": str(tmp_path)}}).execute()
    nbformat.write(nb, path)
    assert scrapbook.read_notebook(str(path)).scraps["answer"].data == 42
