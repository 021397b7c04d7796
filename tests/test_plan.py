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
    forced = plan_for(root, "c", force=True)
    assert [(p.name, p.reasons) for p in forced.steps] == [("a", ("forced (--force)",)), ("c", ("forced (--force)",))]


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
