"""Planning: which steps run and why, before any kernel starts."""

from __future__ import annotations

import pytest

import nbflow
from nbflow.errors import PipelineError
from nbflow.graph import build_graph
from nbflow.plan import make_plan
from nbflow.state import Ledger


def plan_for(root, *names, **kwargs):
    graph = build_graph(root)
    ledger = Ledger(graph.state_dir, create=False)
    try:
        return make_plan(graph, ledger, names, **kwargs)
    finally:
        ledger.close()


def test_first_plan_runs_everything_in_order(fixture_pipeline):
    plan = plan_for(fixture_pipeline("diamond"))
    assert plan.to_run == list(build_graph(plan.graph.root).order)
    assert dict((p.name, p.reasons) for p in plan.steps)["d"] == ("never run", "upstream b reruns", "upstream c reruns")


def test_force_and_selection(fixture_pipeline):
    root = fixture_pipeline("diamond")
    assert nbflow.run(root, display=False).ok
    assert plan_for(root).to_run == []
    forced = plan_for(root, "c", force=True)  # a named step is forced; what it needs runs only if stale
    assert [(p.name, p.action, p.reasons) for p in forced.steps] == [("a", "skip", ("fresh",)),
                                                                       ("c", "run", ("forced (--force)",))]
    everything = plan_for(root, "c", force=True, force_upstream=True)
    assert [(p.name, p.reasons) for p in everything.steps] == [("a", ("forced (--force)",)),
                                                                ("c", ("forced (--force)",))]
    assert sorted(plan_for(root, force=True).to_run) == ["a", "b", "c", "d", "sub/e"]  # no names: all


def test_only_runs_the_named_steps_without_their_upstream(fixture_pipeline):
    root = fixture_pipeline("diamond")
    with pytest.raises(PipelineError, match=r"step 'd' reads .*, which step 'b' writes, but it does not exist yet "
                                            r"and --only does not run 'b'"):
        plan_for(root, "d", only=True)
    assert nbflow.run(root, display=False).ok
    plan = plan_for(root, "d", only=True, force=True)
    assert [p.name for p in plan.steps] == ["d"] and plan.to_run == ["d"]
    result = nbflow.run(root, "d", only=True, force=True, display=False)
    assert list(result.steps) == ["d"] and result.steps["d"].status == "succeeded"


def test_missing_source_input_names_the_notebook_and_line(fixture_pipeline):
    root = fixture_pipeline("diamond")
    (root / "data" / "seed.txt").unlink()
    with pytest.raises(PipelineError) as err:
        plan_for(root)
    problem = err.value.problems[0]
    assert problem.file == "a.ipynb" and problem.line == 1
    assert "reads data/seed.txt, which does not exist and no step writes it" in problem.message
    assert len(err.value.problems) == 2  # sub/e reads it too


def test_missing_input_of_a_fresh_step_is_not_an_error(fixture_pipeline):
    root = fixture_pipeline("diamond")
    assert nbflow.run(root, ["b"], display=False).ok
    plan = plan_for(root, "b")
    assert plan.to_run == []


def _untag(notebook):
    import json

    nb = json.loads(notebook.read_text())
    for cell in nb["cells"]:
        cell["metadata"].pop("tags", None)
    notebook.write_text(json.dumps(nb))


def test_a_notebook_whose_outputs_a_step_reads_must_stay_a_step(tmp_path, notebook_factory):
    """A lost `parameters` tag must not turn a step's output into silently stale 'source data'."""
    writer = notebook_factory(tmp_path / "clean.ipynb", 'outputs = {"c": "clean.csv"}',
                              "open(outputs['c'], 'w').write('x')")
    notebook_factory(tmp_path / "report.ipynb", 'inputs = {"c": "clean.csv"}', "pass")
    _untag(writer)
    (tmp_path / "clean.csv").write_text("old")  # would otherwise pass for source data
    with pytest.raises(PipelineError) as err:
        build_graph(tmp_path)
    assert str(err.value) == (
        "clean.ipynb: has no cell tagged 'parameters', so it is not a step, but step 'report' reads clean.csv, "
        "which it writes; restore the tag on cell 1 (in Jupyter: select the cell, open the property inspector "
        "(gear icon), add the tag parameters), or leave it out of the pipeline with `exclude: [\"clean.ipynb\"]` "
        "in nbflow.yaml")
    (tmp_path / "nbflow.yaml").write_text('exclude: ["clean.ipynb"]\n')
    assert list(build_graph(tmp_path).steps) == ["report"]  # excluding it is the other fix


def test_a_notebook_that_ran_as_a_step_before_must_stay_one(tmp_path, notebook_factory):
    a = notebook_factory(tmp_path / "a.ipynb", 'outputs = {}\nn = 1', "x = n")
    notebook_factory(tmp_path / "b.ipynb", 'outputs = {}', "pass")
    assert nbflow.run(tmp_path, display=False).ok
    run_id = nbflow.history(tmp_path)["run_id"][0]
    _untag(a)
    with pytest.raises(PipelineError, match=rf"a.ipynb: has no cell tagged 'parameters', so it is not a step, but "
                                            rf"it ran as step 'a' in run {run_id}; restore the tag"):
        nbflow.run(tmp_path, display=False)


def test_a_missing_kernel_names_the_one_line_fix(tmp_path, notebook_factory):
    notebook_factory(tmp_path / "r.ipynb", 'outputs = {}', "x = 1", kernel="no-such-kernel")
    with pytest.raises(PipelineError) as err:
        plan_for(tmp_path)
    message = str(err.value)
    assert "kernel 'no-such-kernel' is not installed (needed by r)" in message
    assert "`defaults: {kernel: python3}` in nbflow.yaml" in message
    (tmp_path / "nbflow.yaml").write_text("defaults: {kernel: python3}\n")
    assert plan_for(tmp_path).to_run == ["r"]


def test_a_missing_input_suggests_the_path_a_step_writes(tmp_path, notebook_factory):
    notebook_factory(tmp_path / "etl" / "clean.ipynb", 'outputs = {"c": "../data/clean.parquet"}', "pass")
    notebook_factory(tmp_path / "model.ipynb", 'inputs = {"c": "data/cleaned.parquet"}', "pass")
    with pytest.raises(PipelineError, match=r"step 'model' reads data/cleaned.parquet, which does not exist and no "
                                            r"step writes it \(did you mean 'data/clean.parquet'\?\)"):
        plan_for(tmp_path)


def test_a_step_that_never_succeeded_says_how_its_last_run_ended(tmp_path, notebook_factory):
    notebook_factory(tmp_path / "boom.ipynb", 'outputs = {}', "1 / 0")
    result = nbflow.run(tmp_path, display=False)
    assert not result.ok
    assert plan_for(tmp_path).steps[0].reasons == (f"last run failed ({result.run_id})",)


def test_status_stops_at_a_lost_step_and_names_a_missing_kernel(tmp_path, notebook_factory):
    a = notebook_factory(tmp_path / "a.ipynb", 'outputs = {}', "x = 1")
    notebook_factory(tmp_path / "b.ipynb", 'outputs = {}', "x = 1", kernel="no-such-kernel")
    (tmp_path / "nbflow.yaml").write_text("steps:\n  b: {kernel: python3}\n")
    assert nbflow.run(tmp_path, display=False).ok
    (tmp_path / "nbflow.yaml").unlink()
    b = {s.name: s for s in nbflow.Pipeline(tmp_path).status()}["b"]
    assert any("kernel 'no-such-kernel' is not installed" in r and "defaults: {kernel: python3}" in r
               for r in b.reasons)
    _untag(a)
    with pytest.raises(PipelineError, match="a.ipynb: has no cell tagged 'parameters'"):
        nbflow.Pipeline(tmp_path).status()
