"""Reading a notebook statically into a Step."""

from __future__ import annotations

import json

import pytest

from nbflow.errors import PipelineError
from nbflow.graph import build_graph
from nbflow.notebook import NotAStep, Step, read_step


def test_reads_declarations_parameters_and_kernel(tmp_path, notebook_factory):
    path = notebook_factory(
        tmp_path / "etl" / "clean.ipynb",
        'inputs = {"raw": "../data/raw.csv", "more": ["a.csv", "b.csv"]}\n'
        'outputs = {"clean": "../data/clean.parquet"}\nmin_year = 2012\nrate: float = 0.5\nname = "x"\n'
        'flag = True\nitems = [1, 2]\nstart = date.today()',
        "print(min_year)", markdown="# Clean")
    step = read_step(path, tmp_path)
    assert isinstance(step, Step)
    assert step.name == "etl/clean"
    assert step.rel_path == "etl/clean.ipynb"
    assert step.inputs == {"raw": ("../data/raw.csv",), "more": ("a.csv", "b.csv")}
    assert step.outputs == {"clean": ("../data/clean.parquet",)}
    types = {n: p.type_name for n, p in step.parameters.items()}
    assert types == {"min_year": "int", "rate": "float", "name": "str", "flag": "bool", "items": "list",
                     "start": "expression"}
    assert step.parameters["min_year"].default == 2012
    assert step.parameters["start"].source == "date.today()"
    assert step.kernel == "python3"
    assert step.parameters_cell == 1  # after the markdown cell
    assert [n for n, _ in step.cell_hashes] == [2, 3]  # every code cell, the parameters cell too, numbered as in Jupyter
    assert step.resolve("../data/raw.csv") == tmp_path / "data" / "raw.csv"


def test_notebook_without_parameters_cell_is_not_a_step(tmp_path, notebook_factory):
    path = notebook_factory(tmp_path / "driver.ipynb", None, "import nbflow")
    item = read_step(path, tmp_path)
    assert isinstance(item, NotAStep)
    assert "parameters" in item.reason


def test_non_literal_declaration_names_file_and_line(tmp_path, notebook_factory):
    path = notebook_factory(tmp_path / "bad.ipynb", 'import os\noutputs = {"x": os.path.join("a", "b")}')
    with pytest.raises(PipelineError) as err:
        read_step(path, tmp_path)
    problem = err.value.problems[0]
    assert problem.file == "bad.ipynb" and problem.line == 2
    assert "`outputs` must be a literal" in str(err.value)
    assert "os.path.join" in str(err.value)


def test_syntax_error_in_parameters_cell(tmp_path, notebook_factory):
    path = notebook_factory(tmp_path / "syn.ipynb", "x = 1\ny = (")
    with pytest.raises(PipelineError, match=r"syn.ipynb:\d: parameters cell \(cell 1\), line \d: syntax error"):
        read_step(path, tmp_path)


def test_wrong_declaration_shapes(tmp_path, notebook_factory):
    path = notebook_factory(tmp_path / "shape.ipynb", 'inputs = ["a.csv"]\noutputs = {"o": 3}\npublishes = ["not ok"]')
    with pytest.raises(PipelineError) as err:
        read_step(path, tmp_path)
    text = str(err.value)
    assert "3 problems" in text
    assert "`inputs` must be a dict" in text and "`outputs['o']`" in text and "`publishes`" in text


def test_consumed_value_needs_a_default(tmp_path, notebook_factory):
    path = notebook_factory(tmp_path / "c.ipynb", 'consumes = ["best"]')
    with pytest.raises(PipelineError, match="add `best = <default>`"):
        read_step(path, tmp_path)


def test_two_parameters_cells_is_an_error(tmp_path):
    cell = {"cell_type": "code", "metadata": {"tags": ["parameters"]}, "source": "a = 1", "outputs": [],
            "execution_count": None}
    (tmp_path / "two.ipynb").write_text(json.dumps({"cells": [cell, cell], "metadata": {}, "nbformat": 4,
                                                    "nbformat_minor": 4}))
    with pytest.raises(PipelineError, match="cells 1 and 2 are both tagged 'parameters'"):
        read_step(tmp_path / "two.ipynb", tmp_path)


def test_previously_injected_cell_is_ignored_in_cell_hashes(tmp_path, notebook_factory):
    path = notebook_factory(tmp_path / "s.ipynb", "a = 1", "print(a)")
    nb = json.loads(path.read_text())
    before = read_step(path, tmp_path).cell_hashes
    nb["cells"].insert(1, {"cell_type": "code", "metadata": {"tags": ["injected-parameters"]}, "source": "a = 2",
                           "outputs": [], "execution_count": None})
    path.write_text(json.dumps(nb))
    assert [h for _, h in read_step(path, tmp_path).cell_hashes] == [h for _, h in before]


def test_jupytext_percent_script_is_a_step(tmp_path):
    pytest.importorskip("jupytext")
    script = tmp_path / "step.py"
    script.write_text('# %% tags=["parameters"]\noutputs = {"o": "o.txt"}\nn = 3\n\n# %%\nprint(n)\n')
    step = read_step(script, tmp_path)
    assert isinstance(step, Step)
    assert step.name == "step" and step.outputs == {"o": ("o.txt",)} and step.parameters["n"].default == 3


def test_nul_characters_are_pipeline_errors_not_crashes(tmp_path, notebook_factory):
    notebook_factory(tmp_path / "a.ipynb", "x = 1\x00")
    notebook_factory(tmp_path / "b.ipynb", 'outputs = {"o": "a\\x00b"}')
    with pytest.raises(PipelineError) as err:
        build_graph(tmp_path)
    text = str(err.value)
    assert "a.ipynb: parameters cell (cell 1)" in text and "null bytes" in text
    assert "b.ipynb:1: parameters cell (cell 1), line 1: `outputs['o']` contains a NUL character" in text
