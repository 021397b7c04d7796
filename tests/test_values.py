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


def test_each_instance_of_a_grid_publishes_its_own_value_and_a_consumer_reads_them_as_one_frame(tmp_path,
                                                                                                monkeypatch):
    monkeypatch.setenv("NBFLOW_VALUES_DIR", str(tmp_path))
    grid = [{"model": "ridge", "seed": 1}, {"model": "ridge", "seed": 2}]
    for values in grid:
        monkeypatch.setenv("NBFLOW_GRID_PARTITION", f"model=ridge/seed={values['seed']}")
        glue("mae", 1.5 * values["seed"])
        glue("errors", pd.DataFrame({"day": [1, 2], "error": [0.5, -0.5 * values["seed"]]}))
    assert (tmp_path / "mae.grid" / "model=ridge" / "seed=2" / "mae").read_text() == "3.0"
    mae = load_value(tmp_path / "mae.grid", grid=grid)
    assert mae.to_dict("records") == [{"model": "ridge", "seed": 1, "mae": 1.5},
                                      {"model": "ridge", "seed": 2, "mae": 3.0}]
    errors = load_value(tmp_path / "errors.grid", grid=grid)  # as a partitioned Parquet read: keys as columns
    assert list(errors.columns) == ["day", "error", "model", "seed"] and len(errors) == 4
    assert errors[errors["seed"] == 2]["error"].tolist() == [0.5, -1.0]
