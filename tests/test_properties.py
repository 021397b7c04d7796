"""Properties of the declaration parser, the graph builder, freshness and the Runner (hypothesis).

No kernel starts here: steps are "run" by a tiny executor that writes each
declared output, so the Runner and the ledger (`LedgerRecorder`) record real
successes and failures in milliseconds.
"""

from __future__ import annotations

import concurrent.futures
import json
import keyword
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from conftest import write_notebook
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nbflow
from nbflow.errors import PipelineError
from nbflow.events import StepError, StepStarted, StepStatus
from nbflow.execute import Runner
from nbflow.executors import StepOutcome
from nbflow.graph import build_graph
from nbflow.notebook import DECLARATIONS, Step, load_notebook_json, read_step
from nbflow.plan import make_plan
from nbflow.settings import RunSettings
from nbflow.state import Ledger, LedgerRecorder

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- the declaration parser -----------------------------------------------------------------------------

identifiers = st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True).filter(
    lambda s: not keyword.iskeyword(s) and s not in DECLARATIONS)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**9, 10**9),
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                         st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                      max_leaves=6)
rel_paths = st.lists(st.from_regex(r"[a-zA-Z0-9_. -]{1,8}", fullmatch=True).filter(lambda s: s.strip(" .")),
                     min_size=1, max_size=3).map("/".join)
path_maps = st.dictionaries(identifiers, st.one_of(rel_paths, st.lists(rel_paths, min_size=1, max_size=2)),
                            max_size=3)


@contextmanager
def folder():
    with tempfile.TemporaryDirectory() as tmp:
        yield Path(tmp)


@SETTINGS
@given(parameters=st.dictionaries(identifiers, values, max_size=5), inputs=path_maps, outputs=path_maps)
def test_declarations_and_parameters_are_read_back_as_written(parameters, inputs, outputs):
    lines = [f"inputs = {inputs!r}", f"outputs = {outputs!r}"] + [f"{k} = {v!r}" for k, v in parameters.items()]
    with folder() as root:
        path = write_notebook(root / "step.ipynb", "\n".join(lines), "x = 1")
        step = read_step(path, root)
    assert isinstance(step, Step)
    as_tuples = {k: tuple([v] if isinstance(v, str) else v) for k, v in inputs.items()}
    assert step.inputs == as_tuples
    assert step.outputs == {k: tuple([v] if isinstance(v, str) else v) for k, v in outputs.items()}
    assert list(step.parameters) == list(parameters)
    for line, (name, value) in enumerate(parameters.items(), start=3):
        param = step.parameters[name]
        assert param.default == value and param.line == line and param.type_name == type(value).__name__


@SETTINGS
@given(source=st.text(max_size=200))
def test_any_parameters_cell_is_a_step_or_a_pipeline_error(source):
    with folder() as root:
        path = write_notebook(root / "any.ipynb", source, "x = 1")
        try:
            step = read_step(path, root)
        except PipelineError as e:
            assert e.problems and all(p.file == "any.ipynb" for p in e.problems)
            assert e.exit_code == 2
        else:
            assert isinstance(step, Step) and step.name == "any"


notebook_like = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=10)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(
        st.sampled_from(["cells", "nbformat", "metadata", "cell_type", "source", "id", "tags", "x"]), inner,
        max_size=5)),
    max_leaves=12)


@SETTINGS
@given(content=st.one_of(st.binary(max_size=300), notebook_like.map(lambda v: json.dumps(v).encode())))
def test_any_file_content_is_a_notebook_or_a_clear_error(content):
    with folder() as root:
        path = root / "junk.ipynb"
        path.write_bytes(content)
        try:
            nb = load_notebook_json(path, "junk.ipynb")
        except PipelineError as e:
            assert [p.file for p in e.problems] == ["junk.ipynb"] and e.problems[0].message
        else:
            assert isinstance(nb, dict) and isinstance(nb["cells"], list)


# -- random pipelines ----------------------------------------------------------------------------------------

NAMES = ["ingest", "clean", "join", "model", "plot", "zeta", "alpha", "report"]


@st.composite
def dags(draw):
    """Random DAG: step i may read the output of any earlier step, and source files; names shuffled."""
    n = draw(st.integers(1, 7))
    names = draw(st.permutations(NAMES))[:n]
    parents = {names[i]: sorted(draw(st.sets(st.sampled_from(names[:i]))) if i else []) for i in range(n)}
    sources = {name: draw(st.sets(st.sampled_from(["a.csv", "b.csv"]), max_size=1)) for name in names}
    return names, parents, sources


def write_pipeline(root: Path, parents: dict[str, list[str]], sources: dict[str, set[str]],
                   cell: dict[str, str] | None = None, default: dict[str, int] | None = None) -> None:
    (root / "data").mkdir(parents=True, exist_ok=True)
    for src in ("a.csv", "b.csv"):
        if not (root / "data" / src).exists():
            (root / "data" / src).write_text(src)
    for name, ups in parents.items():
        inputs = {f"from_{u}": f"out/{u}.txt" for u in ups} | {s.split(".")[0]: f"data/{s}" for s in sources[name]}
        params = f"inputs = {inputs!r}\noutputs = {{'o': 'out/{name}.txt'}}\nk = {(default or {}).get(name, 1)}"
        write_notebook(root / f"{name}.ipynb", params, (cell or {}).get(name, "x = 1"))


class TinyExecutor:
    """Runs a step by writing its declared outputs; steps in `failing` fail instead."""

    def __init__(self, failing=()):
        self.failing = set(failing)

    def submit(self, task, emit):
        future: concurrent.futures.Future = concurrent.futures.Future()
        now = time.time()
        emit(StepStarted(task.step, task.attempt, "", 1, now))
        if task.step in self.failing:
            outcome = StepOutcome(task.step, task.attempt, StepStatus.FAILED, now, 0.0, None,
                                  StepError("exception", "ValueError", "boom", 2))
        else:
            for _, path in task.outputs:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                Path(path).write_text(f"{task.step}:{json.dumps(task.parameters, default=repr)}")
            outcome = StepOutcome(task.step, task.attempt, StepStatus.SUCCEEDED, now, 0.0, None)
        future.set_result(outcome)
        return future

    def prestart(self, task):
        pass

    def cancel(self):
        pass

    def close(self):
        pass


def tiny_run(root: Path, failing=(), jobs: int = 1):
    graph = build_graph(root)
    ledger = Ledger(graph.state_dir)
    try:
        plan = make_plan(graph, ledger)
        events = []
        runner = Runner(plan, ledger, TinyExecutor(failing), listeners=[events.append],
                        recorder=LedgerRecorder(ledger), settings=RunSettings(jobs=jobs, executor="local"))
        return plan, runner.run(), events
    finally:
        ledger.close()


def descendants(parents: dict[str, list[str]], names) -> set[str]:
    found = set(names)
    changed = True
    while changed:
        changed = False
        for child, ups in parents.items():
            if child not in found and found.intersection(ups):
                found.add(child)
                changed = True
    return found


@SETTINGS
@given(dag=dags())
def test_the_graph_has_exactly_the_declared_edges_and_a_topological_order(dag):
    names, parents, sources = dag
    with folder() as root:
        write_pipeline(root, parents, sources)
        graph = build_graph(root)
        plan, result, events = tiny_run(root)
    assert {n: sorted(graph.upstream[n]) for n in names} == parents
    for order in (graph.order, [p.name for p in plan.steps],
                  [e.step for e in events if isinstance(e, StepStarted)]):
        assert sorted(order) == sorted(names)
        position = {n: i for i, n in enumerate(order)}
        assert all(position[u] < position[n] for n in names for u in parents[n])
    assert result.ok and all(s.status == StepStatus.SUCCEEDED for s in result.steps.values())


@SETTINGS
@given(dag=dags(), data=st.data())
def test_the_stale_set_after_edits_is_the_edited_steps_and_their_descendants(dag, data):
    names, parents, sources = dag
    edits = data.draw(st.dictionaries(st.sampled_from(names),
                                      st.sampled_from(["cell", "parameter", "delete output"]), max_size=3))
    touched_sources = data.draw(st.sets(st.sampled_from(["a.csv", "b.csv"]), max_size=1))
    with folder() as root:
        write_pipeline(root, parents, sources)
        _, first, _ = tiny_run(root)
        assert first.ok
        assert {s.state for s in nbflow.Pipeline(root).status()} == {"fresh"}

        cell = {n: "x = 2" for n, e in edits.items() if e == "cell"}
        default = {n: 2 for n, e in edits.items() if e == "parameter"}
        write_pipeline(root, parents, sources, cell, default)
        for n, e in edits.items():
            if e == "delete output":
                (root / "out" / f"{n}.txt").unlink()
        for src in touched_sources:
            (root / "data" / src).write_text("changed")
        readers = {n for n in names if sources[n] & touched_sources}
        expected = descendants(parents, set(edits) | readers)

        states = {s.name: s for s in nbflow.Pipeline(root).status()}
        assert {n for n, s in states.items() if s.state == "stale"} == expected
        for n, e in edits.items():
            word = {"cell": "cell 2 changed", "parameter": "parameter k 1 -> 2", "delete output": "output out/"}[e]
            assert any(r.startswith(word) for r in states[n].reasons), (n, states[n].reasons)
        plan, second, _ = tiny_run(root)
        assert set(plan.to_run) == expected
        ran = {n for n, s in second.steps.items() if s.status == StepStatus.SUCCEEDED}
        # a descendant whose inputs came out identical is skipped at run time; nothing outside the set runs
        assert set(edits) | readers <= ran <= expected


@SETTINGS
@given(dag=dags(), data=st.data(), jobs=st.integers(1, 3))
def test_a_failure_stops_exactly_its_descendants(dag, data, jobs):
    names, parents, sources = dag
    failing = data.draw(st.sets(st.sampled_from(names), max_size=2))
    with folder() as root:
        write_pipeline(root, parents, sources)
        _, result, _ = tiny_run(root, failing, jobs)
        ledger = Ledger(root / "_nbflow", create=False)
        recorded = {r["step"]: r["status"] for r in ledger.step_runs(result.run_id)}
        succeeded_outputs = {r["step"] for r in ledger.step_runs(result.run_id) if r["files"]}
        ledger.close()
    def below_a_failure(name: str) -> bool:
        return any(name in descendants(parents, {f}) - {f} for f in failing)

    expected = {n: "not_run" if below_a_failure(n) else "failed" if n in failing else "succeeded" for n in names}
    assert {n: s.status.value for n, s in result.steps.items()} == expected
    assert recorded == expected
    assert succeeded_outputs == {n for n, s in expected.items() if s == "succeeded"}
    assert result.ok == (not failing)
