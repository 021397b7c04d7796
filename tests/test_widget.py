"""nbflow.ui.widget and the RunView it reads, without a browser: scripted events in, the model and its HTML out."""

from __future__ import annotations

import base64
import pickle
import re
import threading
import time
from pathlib import Path

import pytest

import nbflow
from nbflow import api
from nbflow.events import (MAX_OUTPUT_TEXT, CellFinished, CellOutput, CellStarted, PlannedStep, RunFinished, RunResult, RunStarted, RunStatus,
                           StepCancelled, StepError, StepFailed, StepNotRun, StepResult, StepSkipped, StepStarted,
                           StepStatus, StepSucceeded)
from nbflow.graph import build_graph
from nbflow.plan import make_plan
from nbflow.state import Ledger
from nbflow.ui import plot
from nbflow.ui import widget as widget_module
from nbflow.ui.view import RunView, group_of
from nbflow.ui.widget import RunWidget

RUN = "20260101T000000-abcdef"
TRACEBACK = "ValueError                                Traceback (most recent call last)\nCell In[4], line 2\n" \
            "----> 2     raise ValueError(...)\nValueError: the numbers add up to 55, not 54"
ERROR = StepError("exception", "ValueError", "the numbers add up to 55, not 54", cell=5,
                  source_line='raise ValueError(f"the numbers add up to {sum(numbers)}, not 54")', traceback=TRACEBACK,
                  execution_count=5)
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


@pytest.fixture
def pipeline(fixture_pipeline, tmp_path, monkeypatch):
    """widget_step_raises (numbers -> total -> report), run from a notebook in tmp_path."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("JPY_SESSION_NAME", raising=False)
    monkeypatch.setattr(widget_module, "MIN_PUSH_S", 0.0)  # every event reaches the model at once
    return fixture_pipeline("widget_step_raises")


def make_widget(root: Path, parameters: dict | None = None, options: dict | None = None) -> RunWidget:
    graph = build_graph(root)
    ledger = Ledger(graph.state_dir)
    try:
        plan = make_plan(graph, ledger, (), parameters)
    finally:
        ledger.close()
    return RunWidget(graph, plan, options=options)


def notebook(step: str) -> str:
    return f"_nbflow/runs/{RUN}/{step}.ipynb"


def started(w: RunWidget, t0: float) -> None:
    w(RunStarted(RUN, str(w.root), t0, ()))


def run_cells(w: RunWidget, step: str, cells: list[int], ok: bool = True, start: int = 1) -> None:
    """CellStarted/CellFinished for the notebook cells `cells` (as numbered in the notebook, markdown counted),
    the `start`-th code cell to run first (as the executor numbers them: In [index])."""
    total = w.rows[step].cells_total
    for index, cell in enumerate(cells, start=start):
        w(CellStarted(step, cell, index, total, index))
        w(CellFinished(step, cell, index, total, 0.01, ok or index < start + len(cells) - 1))


def succeed(w: RunWidget, step: str, cells: int = 3, t0: float = 0.0) -> None:
    w(StepStarted(step, 1, notebook(step), cells, t0 or time.time()))
    run_cells(w, step, list(range(2, cells + 2)))
    w(StepSucceeded(step, 1, 1.25, notebook(step), "fp", {}, {}, (), (), t0))


def finish(w: RunWidget, status: RunStatus, t0: float, **steps: StepResult) -> RunResult:
    result = RunResult(RUN, str(w.root), status, steps, t0, t0 + 7.5)
    w(RunFinished(result))
    return result


def body(w: RunWidget) -> str:
    return w.model.body


def row_html(w: RunWidget, step: str) -> str:
    """The HTML of one step's row."""
    page = body(w)
    start = page.index(f'data-step="{step}"')
    end = page.find('class="nbflow-step"', start + 1)
    return page[start:end if end > 0 else len(page)]


class FakeRunner:
    def __init__(self):
        self.cancels = 0

    def cancel(self) -> None:
        self.cancels += 1


# -- the view: one picture of the run ------------------------------------------------------

def test_rows_start_pending_in_plan_order_with_parameters_and_outputs(pipeline):
    w = make_widget(pipeline, parameters={"numbers.delay": 0.1})
    assert list(w.rows) == ["numbers", "total", "report"]
    numbers = w.rows["numbers"]
    assert numbers.parameters == {"n": 10, "delay": 0.1}  # effective: the default and the override
    assert numbers.outputs == ("numbers.txt",)
    html = row_html(w, "numbers")
    assert "pending" in html and "nbflow-bar" not in html and "nbflow-link" not in html
    assert "n = 10, delay = 0.1" in html
    assert 'data-nbflow-path="widget_step_raises/numbers.txt"' in html  # a declared output opens from the row
    assert "3</span> pending" in body(w)


def test_secret_parameters_are_masked(pipeline):
    (pipeline / "nbflow.yaml").write_text("steps:\n  numbers:\n    parameters: {n: 3}\nsecrets: [n]\n")
    w = make_widget(pipeline)
    assert w.rows["numbers"].parameters["n"] == "***"
    assert "n = &#x27;***&#x27;" in row_html(w, "numbers")


def test_progress_and_the_running_cell_with_its_line_numbered_as_in_jupyter(pipeline):
    """The running cell is In [n] (its execution count in the executed notebook), with its first line of code."""
    w = make_widget(pipeline)
    t0 = time.time()
    started(w, t0)
    w(StepStarted("numbers", 1, notebook("numbers"), 5, t0))
    assert "running" in row_html(w, "numbers")
    w(CellStarted("numbers", 2, 1, 5, 1, "n = 10"))
    w(CellFinished("numbers", 2, 1, 5, 0.1, True))
    # notebook cell 6, the second code cell to run: In [2] in the executed notebook
    w(CellStarted("numbers", 6, 2, 5, 2, 'with open(outputs["numbers"], "w") as f:'))
    numbers = w.rows["numbers"]
    assert numbers.note == "running In [2]" and numbers.cells == "1/5"
    assert numbers.source_line == 'with open(outputs["numbers"], "w") as f:'
    html = row_html(w, "numbers")
    assert "running In [2]: <code>with open(outputs[&quot;numbers&quot;], &quot;w&quot;) as f:</code>" in html
    assert 'aria-valuenow="1" aria-valuemax="5"' in html and ">1/5<" in html
    assert "nbflow-link" not in html  # no link before the executed copy is written
    w(StepSucceeded("numbers", 1, 2.5, notebook("numbers"), "fp", {}, {}, (), (), t0))
    html = row_html(w, "numbers")
    assert "succeeded" in html and ">5/5<" in html and "2.5 s" in html and "nbflow-live" not in html
    assert f'data-nbflow-path="widget_step_raises/_nbflow/runs/{RUN}/numbers.ipynb"' in html
    assert "1</span> succeeded" in body(w) and "2</span> pending" in body(w)
    finish(w, RunStatus.FAILED, t0)


def test_the_injected_parameters_cell_is_numbered_as_the_executed_notebook_shows_it(pipeline):
    view = RunView([PlannedStep("numbers", "run", ())])
    view(StepStarted("numbers", 1, notebook("numbers"), 3, 0.0))
    view(CellStarted("numbers", 0, 1, 3, 1))
    assert view.steps["numbers"].note == "running In [1]"


def test_failure_error_in_jupyters_numbers_traceback_on_demand_and_rerun(pipeline):
    w = make_widget(pipeline)
    t0 = time.time()
    started(w, t0)
    succeed(w, "numbers", t0=t0)
    w(StepStarted("total", 1, notebook("total"), 5, t0))
    w(CellStarted("total", 0, 1, 5, 1))  # injected parameters: In [1]
    w(CellFinished("total", 0, 1, 5, 0.01, True))
    run_cells(w, "total", [2, 3, 4, 5], ok=False, start=2)  # cell 5 is the fifth cell to run: In [5]
    w(StepFailed("total", 1, 0.75, notebook("total"), ERROR))
    w(StepNotRun("report", "total"))
    html = row_html(w, "total")
    assert "failed" in html and ">4/5<" in html
    assert "ValueError: the numbers add up to 55, not 54" in html
    assert "In [5]: <code>raise ValueError(f&quot;the numbers add up to {sum(numbers)}, not 54&quot;)</code>" in html
    assert "cell 5" not in html  # one numbering: the executed notebook's
    # the traceback is there, folded
    assert '<details class="nbflow-traceback" data-key="traceback:total"><summary>full traceback</summary>' in html
    assert "Cell In[4], line 2" in html
    assert "not run" in row_html(w, "report") and "total did not succeed" in row_html(w, "report")
    result = finish(w, RunStatus.FAILED, t0,
                    numbers=StepResult("numbers", StepStatus.SUCCEEDED, 1, 1.25, notebook("numbers")),
                    total=StepResult("total", StepStatus.FAILED, 1, 0.75, notebook("total"), ERROR),
                    report=StepResult("report", StepStatus.NOT_RUN))
    assert w.result is result
    page = body(w)
    for expected in ("1</span> succeeded", "1</span> failed", "1</span> not run", "7.5 s"):
        assert expected in page
    assert "pending" not in page and "running" not in page
    assert w.view.to_rerun() == ["total", "report"]
    assert "nbflow.run(&#x27;widget_step_raises&#x27;, [&#x27;total&#x27;, &#x27;report&#x27;])" in page
    assert "failed · In [5]" in w.model.graph  # the graph numbers the cell the same way


def test_a_running_step_shows_the_last_lines_it_printed_under_its_row(pipeline):
    w = make_widget(pipeline)
    t0 = time.time()
    started(w, t0)
    w(StepStarted("numbers", 1, notebook("numbers"), 5, t0))
    w(CellStarted("numbers", 2, 1, 5, 1, "for i in range(n):"))
    w(CellOutput("numbers", "stdout", "".join(f"row {i}\n" for i in range(10))))
    w(CellOutput("numbers", "stdout", "progress 10%\rprogress 50%"))  # a progress bar rewrites its line
    w(CellOutput("numbers", "stdout", "\rprogress 100%\n"))
    w(CellOutput("numbers", "stderr", "Warning: <slow>\n"))
    row = w.rows["numbers"]
    assert row.live_output == [("stdout", "row 6"), ("stdout", "row 7"), ("stdout", "row 8"), ("stdout", "row 9"),
                               ("stdout", "progress 100%"), ("stderr", "Warning: <slow>")]
    html = row_html(w, "numbers")
    assert "running In [1]: <code>for i in range(n):</code>" in html
    assert '<div class="nbflow-printed" role="log"' in html and "row 5" not in html
    assert '<div class="nbflow-stderr">Warning: &lt;slow&gt;</div>' in html
    w(CellOutput("numbers", "stdout", "half a line"))
    w(CellOutput("numbers", "stdout", " and the rest\n"))
    w(CellOutput("numbers", "stdout", "half"))
    w(CellOutput("numbers", "stdout", "end of 3 MB\n", cut=True))  # the text between was left out: a new line
    assert row.live_output[-3:] == [("stdout", "half a line and the rest"), ("stdout", "half"),
                                    ("stdout", "end of 3 MB")]
    w(StepSucceeded("numbers", 1, 2.5, notebook("numbers"), "fp", {}, {}, (), (), t0))
    assert row.live_output == [] and "nbflow-printed" not in row_html(w, "numbers")
    w(StepStarted("total", 1, notebook("total"), 5, t0))
    w(CellOutput("total", "stdout", "attempt 1\n"))
    w(StepFailed("total", 1, 0.5, notebook("total"), ERROR, will_retry=True, retry_in_s=1))
    assert w.rows["total"].live_output == []  # retrying: its error shows, not what it printed
    w(StepStarted("total", 2, notebook("total"), 5, t0))
    assert w.rows["total"].output == []  # a new attempt starts afresh
    finish(w, RunStatus.FAILED, t0)


def test_printed_text_is_masked_then_bounded_before_any_listener_sees_it():
    secret = "tok-SECRET-123"
    small = CellOutput("s", "stdout", f"token={secret}\n", secrets=(secret, "SECRET"))  # longer first
    assert (small.text, small.cut) == ("token=***\n", False)
    flood = CellOutput("s", "stdout", f"token={secret}\n" + "z" * 5_000 + f"{secret}!", secrets=(secret,))
    assert flood.cut and len(flood.text) == MAX_OUTPUT_TEXT and flood.text.endswith("z***!")
    assert "SECRET" not in flood.text
    assert pickle.loads(pickle.dumps(flood)) == flood  # it travels back from a dask worker


def test_no_rerun_offered_when_nothing_failed(pipeline):
    w = make_widget(pipeline)
    t0 = time.time()
    started(w, t0)
    w(StepCancelled("numbers", 1, 0.5, notebook("numbers"), t0))
    finish(w, RunStatus.CANCELLED, t0)
    assert w.view.to_rerun() == [] and "nbflow-rerun" not in body(w)


def test_steps_cancelled_before_they_started_are_not_started(pipeline):
    w = make_widget(pipeline)
    t0 = time.time()
    started(w, t0)
    w(StepStarted("numbers", 1, notebook("numbers"), 3, t0))
    w(StepCancelled("numbers", 1, 0.25, notebook("numbers"), t0))
    w(StepCancelled("total", 0, 0.0, None))
    finish(w, RunStatus.CANCELLED, t0,
           numbers=StepResult("numbers", StepStatus.CANCELLED, 1, 0.25, notebook("numbers")),
           total=StepResult("total", StepStatus.CANCELLED),
           report=StepResult("report", StepStatus.CANCELLED))
    assert [(s.word, n) for s, n in w.view.tallies()] == [("cancelled", 1), ("not started", 2)]
    assert w.view.summary() == "1 cancelled · 2 not started"
    assert "cancelled" in row_html(w, "numbers")
    for step in ("total", "report"):
        html = row_html(w, step)
        assert "not started" in html and "cancelled" not in html and 'data-status="not_started"' in html
    assert "not started 2" in w.model.graph and "cancelled 1" in w.model.graph  # the legend
    assert "not started" in w.static_text()


def test_skipped_and_retrying_steps(pipeline):
    (pipeline / "nbflow.yaml").write_text("steps:\n  total:\n    retries: 2\n")
    w = make_widget(pipeline)
    t0 = time.time()
    started(w, t0)
    w(StepSkipped("numbers", ("fresh",)))
    assert "skipped" in row_html(w, "numbers") and "fresh" in row_html(w, "numbers")
    w(StepStarted("total", 1, notebook("total"), 3, t0))
    w(StepFailed("total", 1, 0.5, notebook("total"), ERROR, will_retry=True, retry_in_s=1.0))
    html = row_html(w, "total")
    assert "retrying" in html and "attempt 1 failed; retry in 1 s" in html
    assert "ValueError" in html  # the failed attempt's error shows until the next attempt starts
    w(StepStarted("total", 2, notebook("total"), 3, t0))
    html = row_html(w, "total")
    assert "ValueError" not in html and "attempt 2 of 3" in html and "running" in html
    finish(w, RunStatus.CANCELLED, t0)


def test_an_all_fresh_run_is_one_line_saying_since_when(fixture_pipeline, tmp_path, monkeypatch, shown):
    monkeypatch.chdir(tmp_path)
    root = fixture_pipeline("widget_slow_steps")
    first = nbflow.run(root, parameters={"delay": 0}, display=False)
    assert isinstance(first, RunResult) and first.ok
    again = nbflow.run(root, parameters={"delay": 0}, display=True)
    [w] = shown
    assert isinstance(again, RunResult) and all(s.status == StepStatus.SKIPPED for s in again.steps.values())
    assert w.view.nothing_to_do
    assert w.view.summary() == f"nothing to do: 2 steps up to date since run {first.run_id}"
    page = body(w)
    assert f"nothing to do: 2 steps up to date since run {first.run_id}" in page
    assert page.startswith('<details class="nbflow-run" data-key="run" style=')  # folded: opens onto the steps


def test_grid_instances_are_grouped_by_name_failures_first(tmp_path, monkeypatch, notebook_factory):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(widget_module, "MIN_PUSH_S", 0.0)
    root = tmp_path / "grid"
    names = [f"train[alpha={a},seed={s}]" for a in range(12) for s in range(4)]
    for name in names:
        notebook_factory(root / f"{name}.ipynb", f'inputs = {{}}\noutputs = {{"s": "{name}.txt"}}', "pass")
    notebook_factory(root / "other.ipynb", "inputs = {}\noutputs = {}", "pass")
    assert group_of(names[0]) == "train" and group_of("other") is None and group_of("a[b]c") is None
    w = make_widget(root)
    names = [n for n in w.rows if n != "other"]  # in the plan's order
    assert w.view.groups() == {"train": names} and len(names) == 48
    t0 = time.time()
    started(w, t0)
    for name in names[:40]:
        succeed(w, name, cells=1, t0=t0)
    w(StepStarted(names[40], 1, notebook(names[40]), 1, t0))
    w(StepFailed(names[40], 1, 0.1, notebook(names[40]), ERROR))
    page = body(w)
    group = page[page.index('data-group="train"'):]
    assert ">41/48<" in group and "1</span> failed" in group and "40</span> succeeded" in group
    assert group.index(f'data-step="{names[40]}"') < group.index(f'data-step="{names[0]}"')  # failures first
    assert page.count('class="nbflow-group"') == 1
    graph = w.model.graph
    assert graph.count('class="nbflow-step"') == 2  # train[…] and other
    assert "train[…]" in graph and "41/48 · 1 failed" in graph
    finish(w, RunStatus.FAILED, t0)


def test_a_real_grid_of_48_instances_is_one_group_and_one_node(fixture_pipeline, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(widget_module, "MIN_PUSH_S", 0.0)
    root = fixture_pipeline("grid")
    graph = build_graph(root, grid={"train": {"scale": [0.5, 1.0, 2.0, 4.0], "power": list(range(1, 13))}})
    ledger = Ledger(graph.state_dir)
    try:
        w = RunWidget(graph, make_plan(graph, ledger))
    finally:
        ledger.close()
    names = list(graph.grids["train"].instances)
    assert w.view.groups() == {"train": names} and len(names) == 48
    row = w.rows["train[scale=2.0,power=12]"]
    assert row.parameters == {"scale": 2.0, "power": 12}  # its grid values; `outputs` is not a parameter
    assert row.outputs == ("metrics/scale=2.0/power=12/scores.parquet",)
    t0 = time.time()
    started(w, t0)
    succeed(w, "prep", cells=1, t0=t0)
    for name in names[:47]:
        succeed(w, name, cells=1, t0=t0)
    w(StepStarted(names[47], 1, notebook(names[47]), 1, t0))
    w(StepFailed(names[47], 1, 0.1, notebook(names[47]), ERROR))
    w(StepNotRun("summary", names[47]))
    page = body(w)
    group = page[page.index('data-group="train"'):]
    assert ">48/48<" in group and "1</span> failed" in group and "47</span> succeeded" in group
    assert group.index(f'data-step="{names[47]}"') < group.index(f'data-step="{names[0]}"')  # failures first
    assert page.count('class="nbflow-group"') == 1 and page.count('class="nbflow-step"') == 48 + 3
    assert f"grid/_nbflow/runs/{RUN}/train%5Bscale%3D0.5%2Cpower%3D1%5D.ipynb" in group  # links quoted
    drawn = w.model.graph
    assert drawn.count('class="nbflow-step"') == 4  # prep, train[…], summary, other
    assert "train[…]" in drawn and "48/48 · 1 failed" in drawn
    finish(w, RunStatus.FAILED, t0)


def test_plot_folds_a_grid_into_one_node(tmp_path, notebook_factory):
    root = tmp_path / "p"
    notebook_factory(root / "prep.ipynb", 'inputs = {}\noutputs = {"d": "d.csv"}', "pass")
    for a in (1, 2, 3):
        notebook_factory(root / f"train[alpha={a}].ipynb",
                         f'inputs = {{"d": "d.csv"}}\noutputs = {{"m": "m/alpha={a}.txt"}}', "pass")
    notebook_factory(root / "report.ipynb", 'inputs = {"m": ["m/alpha=1.txt", "m/alpha=2.txt", "m/alpha=3.txt"]}\n'
                     'outputs = {}', "pass")
    graph = build_graph(root)
    svg = plot.svg(graph)
    assert svg.count('class="nbflow-step"') == 3 and svg.count('class="nbflow-edge"') == 2
    assert "3 grid instances" in svg


def test_the_graph_fits_the_width_and_its_legend_takes_the_themes_text_colour(pipeline):
    w = make_widget(pipeline)
    started(w, time.time())
    graph = w.model.graph
    assert 'style="width:100%;max-width:' in graph and "height:auto" in graph
    assert "fill:var(--jp-ui-font-color1, #495057)" in graph


def test_links_are_relative_to_the_calling_notebooks_folder(pipeline, tmp_path, monkeypatch):
    w = make_widget(pipeline)
    succeed(w, "numbers")
    html = row_html(w, "numbers")
    assert f'href="widget_step_raises/_nbflow/runs/{RUN}/numbers.ipynb"' in html
    assert f'data-nbflow-path="widget_step_raises/_nbflow/runs/{RUN}/numbers.ipynb"' in html
    assert 'target="_blank"' in html  # a static copy (nbconvert): a plain file link

    # Jupyter Server tells the kernel its notebook: that folder counts, not the working folder
    elsewhere = tmp_path / "analysis"
    elsewhere.mkdir()
    monkeypatch.setenv("JPY_SESSION_NAME", str(elsewhere / "driver.ipynb"))
    other = make_widget(pipeline)
    assert other.href("_nbflow/runs/x y/total.ipynb") == "../widget_step_raises/_nbflow/runs/x%20y/total.ipynb"
    assert other.model.controls["cancel_path"].startswith("../widget_step_raises/_nbflow/cancel-")


# -- cancel -------------------------------------------------------------------------------

def test_cancel_by_message_calls_cancel_once(pipeline):
    w = make_widget(pipeline)
    assert not w.model.controls["attached"]
    w._on_message(w.model, {"cancel": True}, [])  # before attach: nothing to cancel
    runner = FakeRunner()
    w.attach(runner.cancel, holds_kernel=False, background=True)
    assert w.model.controls["attached"] and not w.model.controls["holds_kernel"]
    started(w, time.time())
    w._on_message(w.model, {"cancel": True}, [])
    assert runner.cancels == 1 and w.model.controls["cancelling"]
    w._on_message(w.model, {"cancel": True}, [])  # a second click is ignored
    assert runner.cancels == 1
    finish(w, RunStatus.CANCELLED, time.time())
    assert w.model.controls["finished"]
    w._on_message(w.model, {"cancel": True}, [])
    assert runner.cancels == 1


def test_cancel_by_the_request_file_while_the_kernel_is_busy(pipeline, monkeypatch):
    """The front end writes the request through the Jupyter server; the timer thread sees it, whatever the
    kernel's main thread does."""
    monkeypatch.setattr(widget_module, "TICK_S", 0.02)
    w = make_widget(pipeline)
    runner = FakeRunner()
    w.attach(runner.cancel, holds_kernel=True)
    assert w.model.controls["holds_kernel"]
    assert w.model.controls["cancel_path"] == f"widget_step_raises/_nbflow/{w.cancel_file.name}"
    started(w, time.time())
    w.cancel_file.write_text("cancel\n")
    deadline = time.time() + 5
    while runner.cancels == 0 and time.time() < deadline:
        time.sleep(0.01)
    assert runner.cancels == 1 and not w.cancel_file.exists()
    finish(w, RunStatus.CANCELLED, time.time())


def test_the_request_file_is_removed_when_the_run_ends(pipeline):
    w = make_widget(pipeline)
    w.attach(FakeRunner().cancel, holds_kernel=True)
    started(w, time.time())
    w.cancel_file.write_text("cancel\n")  # written just as the run ended
    finish(w, RunStatus.SUCCEEDED, time.time())
    assert not w.cancel_file.exists()


class FakeUiEvents:
    """jupyter_ui_poll.ui_events: `with ui_events() as poll`; `act(widget)` runs in one of the polls."""

    def __init__(self, widgets: list[RunWidget], act):
        self.widgets, self.act = widgets, act
        self.polls: list[tuple[int, str]] = []
        self.entered = self.exited = 0
        self.acted = False

    def __call__(self) -> FakeUiEvents:
        return self

    def __enter__(self):
        self.entered += 1
        return self.poll

    def __exit__(self, *exc) -> None:
        self.exited += 1

    def poll(self, n: int) -> None:
        self.polls.append((n, threading.current_thread().name))
        [w] = self.widgets
        numbers = w.rows["numbers"]
        if not self.acted and numbers.cells_done >= 2 and numbers.status == StepStatus.RUNNING:
            self.acted = True
            self.act(w)


def click_cancel(w: RunWidget) -> None:
    assert not w.holds_kernel
    w._on_message(w.model, {"cancel": True}, [])  # what the button's comm message does


def interrupt_the_kernel(w: RunWidget) -> None:
    raise KeyboardInterrupt


@pytest.fixture
def shown(monkeypatch) -> list[RunWidget]:
    """The widgets nbflow.run shows, kept here instead of displayed."""
    widgets: list[RunWidget] = []
    monkeypatch.setattr(RunWidget, "show", lambda self: widgets.append(self))
    return widgets


@pytest.mark.parametrize("act", [click_cancel, interrupt_the_kernel])
def test_a_blocking_run_waits_processing_ui_events_and_cancels_cleanly(fixture_pipeline, monkeypatch, shown, act):
    """With jupyter-ui-poll the run goes on in a thread while the cell polls: Cancel and ■ both stop it cleanly."""
    root = fixture_pipeline("widget_slow_steps")
    ui_events = FakeUiEvents(shown, act)
    monkeypatch.setattr(api, "_ui_poller", lambda: ui_events)
    threads: set[str] = set()
    result = nbflow.run(root, parameters={"delay": 3}, display=True,
                        listeners=[lambda _e: threads.add(threading.current_thread().name)])
    assert isinstance(result, RunResult)  # not a RunHandle: the cell waited
    [w] = shown
    assert ui_events.acted and (ui_events.entered, ui_events.exited) == (1, 1)
    assert {name for _n, name in ui_events.polls} == {threading.main_thread().name}
    assert threads == {"nbflow-run"}
    assert not any(t.name == "nbflow-run" for t in threading.enumerate())
    assert result.status == RunStatus.CANCELLED
    numbers = result.steps["numbers"]
    assert numbers.status == StepStatus.CANCELLED
    assert numbers.notebook and (root / numbers.notebook).exists()  # the running step's executed notebook is kept
    assert result.steps["total"].status in (StepStatus.CANCELLED, StepStatus.NOT_RUN)
    assert w.result is result and "cancelled" in body(w)
    assert result.duration_s < 15  # stopped early, not after the 3 x 3 s of sleeping cells


def test_a_blocking_run_without_ui_polling_holds_the_kernel(fixture_pipeline, monkeypatch, shown):
    """ipykernel 7, or no jupyter-ui-poll: the run uses the cell's thread; the front end goes through the server."""
    root = fixture_pipeline("widget_slow_steps")
    monkeypatch.setattr(api, "_ui_poller", lambda: None)
    seen: list[tuple[str, bool]] = []

    def listener(event) -> None:
        if isinstance(event, RunStarted):
            [w] = shown
            seen.append((threading.current_thread().name, w.model.controls["holds_kernel"]))

    result = nbflow.run(root, ["numbers"], parameters={"delay": 0}, display=True, listeners=[listener])
    assert result.ok
    assert seen == [(threading.main_thread().name, True)]


def test_a_blocking_run_cancelled_through_the_request_file(fixture_pipeline, monkeypatch, shown):
    """ipykernel 7: the cell holds the kernel, the Cancel button's request file still stops the run."""
    root = fixture_pipeline("widget_slow_steps")
    monkeypatch.setattr(api, "_ui_poller", lambda: None)
    monkeypatch.setattr(widget_module, "TICK_S", 0.05)

    def listener(event) -> None:
        if isinstance(event, CellFinished) and event.step == "numbers" and event.index == 2:
            [w] = shown
            w.cancel_file.write_text("cancel\n")

    result = nbflow.run(root, parameters={"delay": 3}, display=True, listeners=[listener])
    assert isinstance(result, RunResult) and result.status == RunStatus.CANCELLED
    assert result.duration_s < 15
    assert result.steps["total"].status in (StepStatus.CANCELLED, StepStatus.NOT_RUN)


@pytest.mark.slow
def test_waiting_for_a_background_run_and_interrupting_cancels_it(fixture_pipeline, monkeypatch):
    root = fixture_pipeline("widget_slow_steps")
    handle = nbflow.run(root, parameters={"delay": 3}, background=True, display=False)
    assert isinstance(handle, api.RunHandle)
    real_wait = handle._finished.wait
    calls = []

    def interrupted_once(timeout=None):
        calls.append(timeout)
        if len(calls) == 1:
            real_wait(2)  # the run is under way
            raise KeyboardInterrupt  # the kernel's interrupt, while the cell waits
        return real_wait(timeout)

    monkeypatch.setattr(handle._finished, "wait", interrupted_once)
    result = handle.wait()
    assert result is not None and result.status == RunStatus.CANCELLED and result.duration_s < 15


def test_ui_polling_only_where_it_can_deliver_clicks(monkeypatch):
    """jupyter-ui-poll hands clicks to a waiting cell on ipykernel 6 only (7.0 reads the shell on its own thread,
    7.1 removed do_one_iteration), and from the kernel's main thread only."""
    import ipykernel
    import jupyter_ui_poll

    assert api._ui_poller() is None  # not in a kernel
    monkeypatch.setattr(api, "_in_jupyter", lambda: True)
    monkeypatch.setattr(ipykernel, "__version__", "6.31.0")
    assert api._ui_poller() is jupyter_ui_poll.ui_events
    found: list = []
    thread = threading.Thread(target=lambda: found.append(api._ui_poller()))
    thread.start()
    thread.join()
    assert found == [None]
    for version in ("7.0.1", "7.4.0", "8.0.0"):
        monkeypatch.setattr(ipykernel, "__version__", version)
        assert api._ui_poller() is None
    monkeypatch.setattr(ipykernel, "__version__", "6.31.0")
    monkeypatch.setitem(__import__("sys").modules, "jupyter_ui_poll", None)  # not installed
    assert api._ui_poller() is None


# -- the timer, the throttle, the display -----------------------------------------------------

def test_timer_moves_elapsed_while_running_and_stops_at_run_finished(pipeline, monkeypatch):
    monkeypatch.setattr(widget_module, "TICK_S", 0.02)
    w = make_widget(pipeline)
    t0 = time.time()
    started(w, t0)
    w(StepStarted("numbers", 1, notebook("numbers"), 3, t0 - 5))
    first = row_html(w, "numbers")
    deadline = time.time() + 5
    while row_html(w, "numbers") == first and time.time() < deadline:
        time.sleep(0.01)
    assert row_html(w, "numbers") != first
    assert w._timer is not None and w._timer.is_alive()
    finish(w, RunStatus.SUCCEEDED, t0)
    w._timer.join(1)
    assert not w._timer.is_alive()


def test_the_timer_ends_with_the_run(pipeline, monkeypatch):
    """Nothing of the widget outlives RunFinished: the next cell finds no timer thread, even mid-tick."""
    monkeypatch.setattr(widget_module, "TICK_S", 30.0)
    w = make_widget(pipeline)
    t0 = time.time()
    started(w, t0)
    assert w._timer is not None and w._timer.is_alive()
    finish(w, RunStatus.SUCCEEDED, t0)
    assert not w._timer.is_alive()
    assert time.time() - t0 < 5


def test_cell_by_cell_progress_is_sent_at_most_every_min_push_s(pipeline, monkeypatch):
    monkeypatch.setattr(widget_module, "MIN_PUSH_S", 60.0)
    monkeypatch.setattr(widget_module, "TICK_S", 60.0)
    w = make_widget(pipeline)
    t0 = time.time()
    started(w, t0)
    w(StepStarted("numbers", 1, notebook("numbers"), 5, t0))  # a change of state: sent at once
    assert "running" in row_html(w, "numbers")
    sent = []
    w.model.observe(lambda change: sent.append(change), names="body")
    for index in range(1, 5):
        w(CellStarted("numbers", index + 1, index, 5, index))
        w(CellFinished("numbers", index + 1, index, 5, 0.01, True))
    assert sent == [] and w._dirty  # kept for the timer's next tick
    w(StepSucceeded("numbers", 1, 1.0, notebook("numbers"), "fp", {}, {}, (), (), t0))
    assert len(sent) == 1 and ">5/5<" in row_html(w, "numbers")
    finish(w, RunStatus.FAILED, t0)


def test_graph_is_redrawn_on_state_changes_only(pipeline, monkeypatch):
    w = make_widget(pipeline)
    assert all(f">{name}<" in w.model.graph for name in w.rows)
    calls = []
    real = plot.html
    monkeypatch.setattr(plot, "html", lambda *a, **k: calls.append(a) or real(*a, **k))
    t0 = time.time()
    started(w, t0)
    calls.clear()
    w(StepStarted("numbers", 1, notebook("numbers"), 3, t0))
    assert len(calls) == 1
    w(CellStarted("numbers", 2, 1, 3, 1))
    w(CellFinished("numbers", 2, 1, 3, 0.1, True))
    assert len(calls) == 1
    w(StepSucceeded("numbers", 1, 1.0, notebook("numbers"), "fp", {}, {}, (), (), t0))
    assert len(calls) == 2
    shown = calls[-1][1]
    assert shown.steps["numbers"].status == "succeeded" and shown.steps["total"].status == "pending"
    assert f"widget_step_raises/_nbflow/runs/{RUN}/numbers.ipynb" in w.model.graph  # boxes link too
    finish(w, RunStatus.FAILED, t0)


def test_the_saved_notebook_keeps_the_final_state_as_static_html_only(pipeline, monkeypatch):
    """The widget view is replaced when the run ends: a notebook reopened without its kernel shows the run,
    never 'model not found'."""
    displayed = []

    class Handle:
        def update(self, obj, raw=False):
            displayed.append(obj)

    def display(obj, raw=False, display_id=None):
        assert raw and display_id
        displayed.append(obj)
        return Handle()

    monkeypatch.setattr("IPython.display.display", display)
    w = make_widget(pipeline)
    closed = []
    monkeypatch.setattr(w.model, "close", lambda: closed.append(True))  # outside a kernel no comm is open
    w.show()
    first = displayed[0]
    assert first[WIDGET_VIEW]["model_id"] == w.model.model_id  # live while it runs
    assert "pending" in first["text/html"]
    t0 = time.time()
    started(w, t0)
    succeed(w, "numbers", t0=t0)
    w(StepStarted("total", 1, notebook("total"), 5, t0))
    w(StepFailed("total", 1, 0.75, notebook("total"), ERROR))
    w(StepNotRun("report", "total"))
    assert len(displayed) == 1  # the display is replaced once, at the end
    finish(w, RunStatus.FAILED, t0,
           numbers=StepResult("numbers", StepStatus.SUCCEEDED, 1, 1.25, notebook("numbers")),
           total=StepResult("total", StepStatus.FAILED, 1, 0.75, notebook("total"), ERROR),
           report=StepResult("report", StepStatus.NOT_RUN))
    final = displayed[-1]
    assert set(final) == {"text/html", "text/plain"}  # no widget view left to look up
    page = final["text/html"]
    for expected in ("succeeded", "failed", "not run", "ValueError: the numbers add up to 55, not 54",
                     f'href="widget_step_raises/_nbflow/runs/{RUN}/total.ipynb"', RUN, "<style>"):
        assert expected in page
    # the graph as an image: a sanitizing viewer (Lab, untrusted) drops inline SVG but keeps an image
    assert "<svg" not in page and "nbflow-graph-slot" not in page
    [encoded] = re.findall(r'src="data:image/svg\+xml;base64,([^"]+)"', page)
    picture = base64.b64decode(encoded).decode()
    assert ">total<" in picture and "#ffffff" in picture  # on a white card
    assert "pending" not in page and "running" not in page
    plain = final["text/plain"]
    assert "failed" in plain and "ValueError" in plain
    # a failed run keeps its model for the Rerun button of its static HTML (hidden until widget.js shows it)
    assert closed == [] and w.can_rerun
    assert (f'<button type="button" class="nbflow-rerun-button jupyter-button" hidden style="display:none" '
            f'data-nbflow-rerun="{w.rerun_token}"') in page
    assert w.model.controls["rerun_token"] == w.rerun_token


def test_a_run_that_ends_well_closes_its_model(pipeline, monkeypatch):
    class Handle:
        def update(self, obj, raw=False):
            pass

    monkeypatch.setattr("IPython.display.display", lambda obj, raw=False, display_id=None: Handle())
    w = make_widget(pipeline)
    closed = []
    monkeypatch.setattr(w.model, "close", lambda: closed.append(True))
    w.show()
    t0 = time.time()
    started(w, t0)
    succeed(w, "numbers", t0=t0)
    finish(w, RunStatus.SUCCEEDED, t0, numbers=StepResult("numbers", StepStatus.SUCCEEDED, 1, 1.25, notebook("numbers")))
    assert closed == [True] and not w.can_rerun  # nothing of it is left in the kernel
    assert "data-nbflow-rerun" not in w.static_html() and "rerun failed" not in w.static_html()


def failed_run_shown(pipeline, monkeypatch, parameters=None, options=None) -> tuple[RunWidget, list]:
    """A widget shown in a (fake) output whose run failed in `total`; the list collects what the output shows."""
    shown: list = []

    class Handle:
        def update(self, obj, raw=False):
            shown.append(obj)

    def display(obj, raw=False, display_id=None):
        shown.append(obj)
        return Handle()

    monkeypatch.setattr("IPython.display.display", display)
    w = make_widget(pipeline, parameters, options)
    monkeypatch.setattr(w.model, "close", lambda: shown.append("closed"))
    w.show()
    t0 = time.time()
    started(w, t0)
    succeed(w, "numbers", t0=t0)
    w(StepStarted("total", 1, notebook("total"), 5, t0))
    w(StepFailed("total", 1, 0.75, notebook("total"), ERROR))
    w(StepNotRun("report", "total"))
    finish(w, RunStatus.FAILED, t0,
           numbers=StepResult("numbers", StepStatus.SUCCEEDED, 1, 1.25, notebook("numbers")),
           total=StepResult("total", StepStatus.FAILED, 1, 0.75, notebook("total"), ERROR),
           report=StepResult("report", StepStatus.NOT_RUN))
    return w, shown


def test_rerun_failed_makes_the_call_it_shows_in_the_background_and_shows_it_in_the_same_output(pipeline,
                                                                                                   monkeypatch):
    (pipeline / "nbflow.yaml").write_text("secrets: [delay]\n")
    w, shown = failed_run_shown(pipeline, monkeypatch, {"total.delay": 0.5, "numbers.n": 12})
    assert ("nbflow.run(&#x27;widget_step_raises&#x27;, [&#x27;total&#x27;, &#x27;report&#x27;], parameters="
            "{&#x27;total.delay&#x27;: &#x27;***&#x27;, &#x27;numbers.n&#x27;: 12})") in w.static_html()
    calls = []

    def run(*args, **kwargs):  # what nbflow.run does in Jupyter: a widget of its own, shown
        calls.append((args, kwargs))
        again = make_widget(pipeline)
        again.show()
        return again

    monkeypatch.setattr(nbflow, "run", run)
    w._on_message(w.model, {"rerun": True}, [])  # the button's click, as the front end sends it
    w._on_message(w.model, {"rerun": True}, [])  # a second click starts nothing more
    assert calls == [((str(w.root), ["total", "report"]),
                      {"parameters": {"total.delay": 0.5, "numbers.n": 12}, "background": True})]
    # the rerun's widget took this run's output (no new output: a click's output has no cell to go to),
    # live, below this run's record, folded, which says where its rerun is
    rerun_bundle = shown[-2]
    assert shown[-1] == "closed" and WIDGET_VIEW in rerun_bundle
    page = rerun_bundle["text/html"]
    earlier, current = page.split('<details class="nbflow-run" data-key="run"', 1)
    assert '<div class="nbflow-earlier"><details class="nbflow-run" data-key="' + RUN + '/run"' in earlier
    assert "ValueError: the numbers add up to 55, not 54" in earlier and "rerun below" in earlier
    assert "data-nbflow-rerun" not in earlier and "pending" in current


def test_rerun_failed_keeps_the_runs_executor_and_options(pipeline, monkeypatch):
    """A run on a cluster is rerun on it, with its -j and --fail-fast (and a grid= it was given)."""
    options = {"executor": "dask", "dask_address": "tcp://10.0.0.5:8786", "jobs": 4, "fail_fast": True}
    w, _ = failed_run_shown(pipeline, monkeypatch, options=options)
    assert w.rerun_call(masked=False) == ((str(w.root), ["total", "report"]), options)
    assert ("nbflow.run(&#x27;widget_step_raises&#x27;, [&#x27;total&#x27;, &#x27;report&#x27;], executor=&#x27;dask"
            "&#x27;, dask_address=&#x27;tcp://10.0.0.5:8786&#x27;, jobs=4, fail_fast=True)") in w.static_html()
    calls = []
    monkeypatch.setattr(nbflow, "run", lambda *args, **kwargs: calls.append((args, kwargs)))
    w._on_message(w.model, {"rerun": True}, [])
    assert calls == [((str(w.root), ["total", "report"]), {**options, "background": True})]


def test_a_rerun_that_cannot_start_says_why_in_place(pipeline, monkeypatch):
    w, shown = failed_run_shown(pipeline, monkeypatch)

    def run(*args, **kwargs):
        raise nbflow.PipelineLocked("another nbflow run of this pipeline is in progress")

    monkeypatch.setattr(nbflow, "run", run)
    w.rerun()
    assert shown[-1] == "closed"
    assert "the rerun could not start: another nbflow run of this pipeline is in progress" in shown[-2]["text/html"]


def test_a_background_run_announces_its_end(pipeline):
    w = make_widget(pipeline)
    w.attach(FakeRunner().cancel, holds_kernel=False, background=True)
    t0 = time.time()
    started(w, t0)
    assert "nbflow-notice" not in body(w)
    finish(w, RunStatus.SUCCEEDED, t0)
    assert "the background run ended at" in body(w)


def test_the_worker_a_step_ran_on_is_shown(pipeline):
    from nbflow.events import FileRecord  # noqa: F401 - the event's fields

    w = make_widget(pipeline)
    t0 = time.time()
    started(w, t0)
    w(StepStarted("numbers", 1, notebook("numbers"), 1, t0))
    w(StepSucceeded("numbers", 1, 0.5, notebook("numbers"), "fp", {}, {}, (), (), t0, worker="tcp://10.0.0.7:40123"))
    assert w.view.steps["numbers"].worker == "tcp://10.0.0.7:40123"
    assert "ran on worker" in w._more_html(w.view.steps["numbers"]) and "10.0.0.7:40123" in w.static_html()


def test_a_step_s_outputs_in_an_object_store_are_named_not_linked(tmp_path, notebook_factory):
    notebook_factory(tmp_path / "a.ipynb", 'outputs = {"o": "s3://bucket/out.csv", "l": "local.csv"}', "x = 1")
    w = make_widget(tmp_path)
    more = w._more_html(w.view.steps["a"])
    assert "<code>s3://bucket/out.csv</code>" in more and "local.csv" in more
    assert "s3:/bucket" not in more  # never turned into a broken file path
