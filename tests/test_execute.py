"""Running pipelines end to end: outputs, incremental reruns and their reasons, failures, values."""

from __future__ import annotations

import json

import pytest

import nbflow
from nbflow.events import CellFinished, RunFinished, StepStarted, StepStatus, StepSucceeded


def statuses(result):
    return {name: s.status.value for name, s in result.steps.items()}


def test_diamond_runs_then_skips_then_reruns_only_what_changed(fixture_pipeline, notebook_factory):
    root = fixture_pipeline("diamond")
    events = []
    first = nbflow.run(root, listeners=[events.append], display=False)
    assert first.ok, first.to_json()
    assert (root / "data" / "d.txt").read_text() == "43|c42"
    assert (root / "data" / "e.txt").read_text() == "sub"  # cwd is the notebook's own folder
    assert statuses(first) == dict.fromkeys(["a", "b", "c", "d", "sub/e"], "succeeded")
    assert [type(e).__name__ for e in events][0] == "RunStarted" and isinstance(events[-1], RunFinished)
    assert any(isinstance(e, CellFinished) and e.step == "a" for e in events)
    for name in first.steps:
        assert (root / first.steps[name].notebook).exists()
        assert (root / "_nbflow" / "latest" / f"{name}.ipynb").exists()

    second = nbflow.run(root, display=False)
    assert set(statuses(second).values()) == {"skipped"}

    # edit c: c and d rerun, nothing else
    notebook_factory(root / "c.ipynb", 'inputs = {"a": "data/a.txt"}\noutputs = {"c": "data/c.txt"}\nlabel = "c"',
                     'open(outputs["c"], "w").write(label.upper() + open(inputs["a"]).read())')
    states = {s.name: s for s in nbflow.Pipeline(root).status()}
    assert states["c"].state == "stale" and "cell 2 changed" in states["c"].reasons
    assert states["d"].state == "stale" and "upstream c reruns" in states["d"].reasons
    assert states["a"].state == states["b"].state == "fresh"
    third = nbflow.run(root, display=False)
    assert {n for n, s in statuses(third).items() if s == "succeeded"} == {"c", "d"}
    assert (root / "data" / "d.txt").read_text() == "43|C42"


def test_parameter_override_reruns_the_right_steps_and_changes_the_result(fixture_pipeline):
    root = fixture_pipeline("diamond")
    assert nbflow.run(root, display=False).ok
    result = nbflow.run(root, parameters={"b.offset": 100}, display=False)
    assert {n for n, s in statuses(result).items() if s == "succeeded"} == {"b", "d"}
    assert (root / "data" / "d.txt").read_text() == "142|c42"
    reasons = {s.name: s.reasons for s in nbflow.Pipeline(root).status()}
    assert "parameter offset 100 -> 1" in reasons["b"]  # without the override it is stale again


def test_running_a_step_runs_what_it_needs(fixture_pipeline):
    root = fixture_pipeline("diamond")
    result = nbflow.run(root, ["b"], display=False)
    assert statuses(result) == {"a": "succeeded", "b": "succeeded"}


def test_upstream_rerun_with_identical_output_skips_downstream(fixture_pipeline, notebook_factory):
    root = fixture_pipeline("diamond")
    assert nbflow.run(root, display=False).ok
    # a comment-only change: a reruns but writes the same bytes
    notebook_factory(root / "a.ipynb", 'inputs = {"seed": "data/seed.txt"}\noutputs = {"a": "data/a.txt"}\nscale = 2',
                     '# same result\nn = int(open(inputs["seed"]).read())\nopen(outputs["a"], "w").write(str(n * scale))')
    result = nbflow.run(root, display=False)
    assert result.steps["a"].status == StepStatus.SUCCEEDED
    assert result.steps["b"].status == StepStatus.SKIPPED
    assert "inputs unchanged" in result.steps["b"].reasons[0]


def test_failure_keeps_notebook_marks_dependents_and_resumes(fixture_pipeline, notebook_factory):
    root = fixture_pipeline("step_raises")
    result = nbflow.run(root, display=False)
    assert statuses(result) == {"after_boom": "not_run", "boom": "failed", "ok": "succeeded"}
    error = result.steps["boom"].error
    assert (error.ename, error.cell, error.source_line) == ("ZeroDivisionError", 3, "y = 10 / value")
    executed = json.loads((root / result.steps["boom"].notebook).read_text())
    assert "An Exception was encountered" in executed["cells"][0]["source"]
    assert executed["metadata"]["papermill"]["exception"] is True
    # resume: fix the parameter; only boom and its dependent run
    again = nbflow.run(root, parameters={"value": 5}, display=False)
    assert statuses(again) == {"after_boom": "succeeded", "boom": "succeeded", "ok": "skipped"}


def test_missing_declared_output_is_a_failure_naming_the_file(tmp_path, notebook_factory):
    notebook_factory(tmp_path / "lazy.ipynb", 'outputs = {"report": "report.md"}', "x = 1")
    result = nbflow.run(tmp_path, display=False)
    error = result.steps["lazy"].error
    assert error.kind == "missing_output" and "report.md was not written" in error.evalue


def test_values_travel_between_steps_as_parquet(fixture_pipeline):
    root = fixture_pipeline("values")
    result = nbflow.run(root, display=False)
    assert result.ok, result.to_json()
    assert (root / "out.txt").read_text() == "5,4"
    assert (root / "_nbflow" / "values" / "table").read_bytes()[:4] == b"PAR1"
    injected = json.loads((root / result.steps["consume"].notebook).read_text())["cells"][1]
    assert "injected-parameters" in injected["metadata"]["tags"]
    assert "load_value('_nbflow/values/table')" in injected["source"]  # relative, never absolute
    # the producer changes: the consumer reruns because its input value changed
    again = nbflow.run(root, parameters={"n": 7}, display=False)
    assert statuses(again) == {"consume": "succeeded", "produce": "succeeded"}
    assert (root / "out.txt").read_text() == "7,6"


def test_source_notebooks_are_never_modified(fixture_pipeline):
    root = fixture_pipeline("diamond")
    before = {p: p.read_bytes() for p in root.rglob("*.ipynb")}
    nbflow.run(root, parameters={"scale": 3}, display=False)
    assert all(p.read_bytes() == data for p, data in before.items())


def test_events_carry_progress_and_fingerprint(fixture_pipeline):
    root = fixture_pipeline("diamond")
    events = []
    nbflow.run(root, ["a"], listeners=[events.append], display=False)
    started = next(e for e in events if isinstance(e, StepStarted))
    assert started.total_cells == 2 and started.reasons == ("never run",)
    done = next(e for e in events if isinstance(e, StepSucceeded))
    assert len(done.fingerprint) == 64 and done.outputs[0].path == "data/a.txt"


def test_invalid_pipeline_raises_before_any_kernel(fixture_pipeline):
    with pytest.raises(nbflow.PipelineError) as err:
        nbflow.run(fixture_pipeline("many_problems"), display=False)
    text = str(err.value)
    assert "no/such/file.csv, which does not exist" in text
    assert "kernel 'no-such-kernel' is not installed" in text
    assert "both write same.txt" in text and "not valid notebook JSON" in text


def test_an_output_left_from_an_earlier_run_does_not_count_as_written(tmp_path, notebook_factory):
    notebook_factory(tmp_path / "w.ipynb", 'outputs = {"o": "o.txt"}\nwrite = True',
                     'if write:\n    open(outputs["o"], "w").write("x")')
    assert nbflow.run(tmp_path, display=False).ok
    result = nbflow.run(tmp_path, parameters={"write": False}, display=False)
    error = result.steps["w"].error
    assert error.kind == "missing_output" and "o.txt was not written by this run" in error.evalue


def test_non_finite_floats_are_injected_as_valid_code(tmp_path, notebook_factory):
    notebook_factory(tmp_path / "f.ipynb", 'outputs = {"o": "o.txt"}\nratio = 0.5',
                     'open(outputs["o"], "w").write(repr(ratio))')
    from nbflow.params import CliValue

    assert nbflow.run(tmp_path, parameters={"ratio": CliValue("nan")}, display=False).ok
    assert (tmp_path / "o.txt").read_text() == "nan"


def test_a_step_named_like_a_kept_attempt_never_overwrites_it(tmp_path, notebook_factory):
    """Earlier attempts live outside runs/<run_id>/, so a notebook called `a.attempt-1` cannot collide."""
    notebook_factory(tmp_path / "a.ipynb", 'outputs = {"o": "a.txt"}', "raise RuntimeError('always')")
    notebook_factory(tmp_path / "a.attempt-1.ipynb", 'outputs = {"o": "other.txt"}',
                     "print('I am the other step')\nopen(outputs['o'], 'w').write('x')")
    (tmp_path / "nbflow.yaml").write_text("steps:\n  a: {retries: 1, retry_delay: 0}\n")
    result = nbflow.run(tmp_path, display=False, jobs=1)
    assert result.steps["a"].status == "failed" and result.steps["a"].attempts == 2
    assert result.steps["a.attempt-1"].status == "succeeded"
    kept = tmp_path / "_nbflow" / "attempts" / result.run_id / "attempt-1" / "a.ipynb"
    other = tmp_path / result.steps["a.attempt-1"].notebook
    assert other == tmp_path / "_nbflow" / "runs" / result.run_id / "a.attempt-1.ipynb"
    assert "RuntimeError" in kept.read_text() and "I am the other step" not in kept.read_text()
    assert "I am the other step" in other.read_text()


def test_a_step_submitted_just_before_a_cancel_is_cancelled_too(tmp_path, notebook_factory):
    """The race behind lost interrupts: a cancel that reaches the executor's loop before the step's task starts."""
    import time

    from nbflow.events import StepResult
    from nbflow.executors.local import LocalExecutor
    from nbflow.graph import build_graph
    from nbflow.plan import make_plan
    from nbflow.execute import Runner
    from nbflow.settings import RunSettings
    from nbflow.state import Ledger

    notebook_factory(tmp_path / "slow.ipynb", 'outputs = {"o": "o.txt"}', "import time\ntime.sleep(120)")
    graph = build_graph(tmp_path)
    ledger = Ledger(graph.state_dir)
    settings = RunSettings(jobs=1, executor="local")
    executor = LocalExecutor(settings)
    try:
        runner = Runner(make_plan(graph, ledger), ledger, executor, settings=settings)
        runner.results = {"slow": StepResult("slow", StepStatus.PENDING)}
        task = runner._task("slow", attempt=1)
        executor.loop.call_soon_threadsafe(time.sleep, 0.5)  # the loop is busy: nothing submitted starts yet
        future = executor.submit(task, lambda event: None)
        executor.cancel()  # reaches the loop before the step's task has run at all
        outcome = future.result(timeout=60)  # without the fix the step sleeps its 120 s
        assert outcome.status == StepStatus.CANCELLED
        assert (tmp_path / outcome.notebook).exists()  # its notebook is still saved
    finally:
        executor.close()
        ledger.close()


def test_more_ctrl_c_while_the_run_winds_down_still_records_it_cancelled(fixture_pipeline):
    """A second and third SIGINT while notebooks are saved and the ledger written must not leave it half recorded."""
    import os
    import signal
    import threading
    import time

    from nbflow.events import RunFinished, StepCancelled
    from nbflow.state import Ledger

    root = fixture_pipeline("slow")

    def interrupt_once_running():
        while not (root / "started.marker").exists():
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)

    def interrupt_again(event):  # listeners run on the Runner's (here the main) thread, during the wind-down
        if isinstance(event, (StepCancelled, RunFinished)):
            os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt_once_running, daemon=True).start()
    result = nbflow.run(root, jobs=1, display=False, listeners=[interrupt_again])
    assert result.status.value == "cancelled"
    ledger = Ledger(root / "_nbflow", create=False)
    try:
        assert [r["status"] for r in ledger.runs()] == ["cancelled"]
        assert {r["status"] for r in ledger.step_runs(result.run_id)} == {"cancelled"}
    finally:
        ledger.close()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


@pytest.mark.parametrize("kind, attempts, told", [
    ("exception", 3, "notebook: "),  # an ordinary failure: retried (retries: 2, so three attempts)
    ("scheduler_lost", 1, "(its executed notebook stayed on the worker)"),  # another attempt meets the same
    ("not_here", 1, None),  # no kernel ever ran: nothing to say about a notebook
])
def test_which_failures_are_retried_and_what_the_log_says_of_their_notebook(tmp_path, notebook_factory,
                                                                            kind, attempts, told):
    import concurrent.futures
    import time

    from nbflow.events import StepError, StepFailed
    from nbflow.executors import StepOutcome
    from nbflow.execute import Runner
    from nbflow.graph import build_graph
    from nbflow.plan import make_plan
    from nbflow.settings import RunSettings
    from nbflow.state import Ledger, LedgerRecorder
    from nbflow.ui.log import describe

    from test_properties import TinyExecutor

    class Failing(TinyExecutor):
        def submit(self, task, emit):
            now = time.time()
            emit(StepStarted(task.step, task.attempt, "", 1, now))
            kept = "_nbflow/runs/x/a.ipynb" if kind == "exception" else None
            future: concurrent.futures.Future = concurrent.futures.Future()
            future.set_result(StepOutcome(task.step, task.attempt, StepStatus.FAILED, now, 0.0, kept,
                                          StepError(kind, "Lost", "it went")))
            return future

    notebook_factory(tmp_path / "a.ipynb", 'outputs = {"o": "a.txt"}', "pass")
    (tmp_path / "nbflow.yaml").write_text("steps:\n  a: {retries: 2, retry_delay: 0}\n")
    graph = build_graph(tmp_path)
    ledger = Ledger(graph.state_dir)
    events: list = []
    try:
        plan = make_plan(graph, ledger)
        settings = RunSettings(jobs=1, executor="local")
        result = Runner(plan, ledger, Failing(), listeners=[events.append], recorder=LedgerRecorder(ledger),
                        settings=settings).run()
    finally:
        ledger.close()
    assert result.steps["a"].attempts == attempts
    last = [e for e in events if isinstance(e, StepFailed)][-1]
    line = describe(last)
    assert line is not None and "it went" in line
    assert (told in line) if told else line.endswith("it went")


def test_each_attempt_carries_its_number_and_what_it_started_is_reaped_by_it(tmp_path, notebook_factory):
    """A retry's kernel carries NBFLOW_ATTEMPT=2: the reaping of attempt 1 (by run, step, pipeline and attempt,
    in the background once its outcome is in) can never kill it, even on another dask worker of the machine."""
    import psutil

    notebook_factory(tmp_path / "a.ipynb", 'outputs = {"o": "a.txt"}',
                     "import os, subprocess\nn = os.environ['NBFLOW_ATTEMPT']\n"
                     "p = subprocess.Popen(['sleep', '60'], start_new_session=True)\n"
                     "open(f'sleeper-{n}.pid', 'w').write(str(p.pid))\n"
                     "if n == '1':\n    raise RuntimeError('first attempt fails')\n"
                     "open(outputs['o'], 'w').write(n)")
    (tmp_path / "nbflow.yaml").write_text("steps:\n  a: {retries: 1, retry_delay: 0}\n")
    result = nbflow.run(tmp_path, display=False)
    assert result.ok and result.steps["a"].attempts == 2 and (tmp_path / "a.txt").read_text() == "2"
    for n in ("1", "2"):  # each attempt's detached child went with its attempt
        pid = int((tmp_path / f"sleeper-{n}.pid").read_text())
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
