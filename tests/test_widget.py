"""nbflow.ui.widget without a browser: scripted events in, widget values out."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

import nbflow
from nbflow import api
from nbflow.events import (CellFinished, CellStarted, RunFinished, RunResult, RunStarted, RunStatus, StepCancelled,
                           StepError, StepFailed, StepNotRun, StepResult, StepSkipped, StepStarted, StepStatus,
                           StepSucceeded)
from nbflow.graph import build_graph
from nbflow.plan import make_plan
from nbflow.state import Ledger
from nbflow.ui import widget as widget_module
from nbflow.ui.widget import RunWidget

RUN = "20260101T000000-abcdef"
ERROR = StepError("exception", "ValueError", "the numbers add up to 55, not 54", cell=5,
                  source_line='raise ValueError(f"the numbers add up to {sum(numbers)}, not 54")')


@pytest.fixture
def pipeline(fixture_pipeline, tmp_path, monkeypatch):
    """widget_step_raises (numbers -> total -> report), run from a notebook in tmp_path."""
    monkeypatch.chdir(tmp_path)
    return fixture_pipeline("widget_step_raises")


def make_widget(root: Path) -> RunWidget:
    graph = build_graph(root)
    ledger = Ledger(graph.state_dir)
    try:
        plan = make_plan(graph, ledger)
    finally:
        ledger.close()
    return RunWidget(graph, plan)


def notebook(step: str) -> str:
    return f"_nbflow/runs/{RUN}/{step}.ipynb"


def started(w: RunWidget, t0: float) -> None:
    w(RunStarted(RUN, str(w.root), t0, ()))


def succeed(w: RunWidget, step: str, cells: int = 3, t0: float = 0.0) -> None:
    w(StepStarted(step, 1, notebook(step), cells, t0 or time.time()))
    for i in range(1, cells + 1):
        w(CellStarted(step, i + 1, i, cells))
        w(CellFinished(step, i + 1, i, cells, 0.01, True))
    w(StepSucceeded(step, 1, 1.25, notebook(step), "fp", {}, {}, (), (), t0))


def finish(w: RunWidget, status: RunStatus, t0: float, **steps: StepResult) -> RunResult:
    result = RunResult(RUN, str(w.root), status, steps, t0, t0 + 7.5)
    w(RunFinished(result))
    return result


def text(html_widget) -> str:
    return html_widget.value


class FakeRunner:
    def __init__(self):
        self.cancels = 0

    def cancel(self) -> None:
        self.cancels += 1


def test_rows_start_pending_in_plan_order(pipeline):
    w = make_widget(pipeline)
    assert list(w.rows) == ["numbers", "total", "report"]
    for name in w.rows:
        parts = w.row_widgets[name]
        assert "pending" in text(parts.state)
        assert parts.progress.layout.display == "none"
        assert text(parts.notebook) == ""
    assert "3</span> pending" in text(w.totals)


def test_progress_follows_cells_and_ends_green(pipeline):
    w = make_widget(pipeline)
    t0 = time.time()
    started(w, t0)
    w(StepStarted("numbers", 1, notebook("numbers"), 4, t0))
    bar = w.row_widgets["numbers"].progress
    assert "running" in text(w.row_widgets["numbers"].state)
    assert (bar.value, bar.max, bar.bar_style, bar.layout.display) == (0, 4, "", "")
    w(CellStarted("numbers", 2, 1, 4))
    w(CellFinished("numbers", 2, 1, 4, 0.1, True))
    w(CellStarted("numbers", 3, 2, 4))
    assert bar.value == 1
    assert "1/4" in text(w.row_widgets["numbers"].cells)
    assert "running cell 3" in text(w.row_widgets["numbers"].note)
    assert text(w.row_widgets["numbers"].notebook) == ""  # no link before the executed copy is written
    w(StepSucceeded("numbers", 1, 2.5, notebook("numbers"), "fp", {}, {}, (), (), t0))
    assert (bar.value, bar.max, bar.bar_style) == (4, 4, "success")
    assert "succeeded" in text(w.row_widgets["numbers"].state)
    assert "2.5 s" in text(w.row_widgets["numbers"].elapsed)
    assert ">1<" in text(w.row_widgets["numbers"].attempts)
    assert "1</span> succeeded" in text(w.totals)
    assert "2</span> pending" in text(w.totals)
    w(RunFinished(RunResult(RUN, str(w.root), RunStatus.FAILED, {}, t0, t0 + 1)))


def test_failure_shows_error_cell_and_source_line_and_dependents_not_run(pipeline):
    w = make_widget(pipeline)
    t0 = time.time()
    started(w, t0)
    succeed(w, "numbers", t0=t0)
    w(StepStarted("total", 1, notebook("total"), 5, t0))
    for i in range(1, 4):
        w(CellFinished("total", i + 1, i, 5, 0.01, True))
    w(CellFinished("total", 5, 4, 5, 0.01, False))
    w(StepFailed("total", 1, 0.75, notebook("total"), ERROR))
    w(StepNotRun("report", "total"))
    parts = w.row_widgets["total"]
    assert "failed" in text(parts.state)
    assert (parts.progress.value, parts.progress.max, parts.progress.bar_style) == (3, 5, "danger")  # 3 completed
    assert "3/5" in text(parts.cells)
    error = text(parts.error)
    assert "ValueError: the numbers add up to 55, not 54" in error
    assert "in cell 5" in error
    assert "raise ValueError(f&quot;the numbers add up to {sum(numbers)}, not 54&quot;)" in error
    assert parts.error.layout.display == ""
    assert w.row_widgets["numbers"].error.layout.display == "none"
    assert "not run" in text(w.row_widgets["report"].state)
    assert "total did not succeed" in text(w.row_widgets["report"].note)
    assert w.row_widgets["report"].progress.layout.display == "none"
    finish(w, RunStatus.FAILED, t0,
           numbers=StepResult("numbers", StepStatus.SUCCEEDED, 1, 1.25, notebook("numbers")),
           total=StepResult("total", StepStatus.FAILED, 1, 0.75, notebook("total"), ERROR),
           report=StepResult("report", StepStatus.NOT_RUN))
    totals = text(w.totals)
    for expected in ("1</span> succeeded", "1</span> failed", "1</span> not run", "7.5 s"):
        assert expected in totals
    assert "pending" not in totals and "running" not in totals
    assert "failed" in text(w.title)


def test_links_are_relative_to_the_calling_notebook(pipeline, tmp_path, monkeypatch):
    w = make_widget(pipeline)
    succeed(w, "numbers")
    link = text(w.row_widgets["numbers"].notebook)
    assert f'href="widget_step_raises/_nbflow/runs/{RUN}/numbers.ipynb"' in link
    assert 'target="_blank"' in link
    assert w.href(notebook("numbers")) == f"widget_step_raises/_nbflow/runs/{RUN}/numbers.ipynb"

    elsewhere = tmp_path / "analysis"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    other = make_widget(pipeline)
    assert other.href("_nbflow/runs/x y/total.ipynb") == "../widget_step_raises/_nbflow/runs/x%20y/total.ipynb"


def test_skipped_cancelled_and_retrying_steps(pipeline):
    (pipeline / "nbflow.yaml").write_text("steps:\n  total:\n    retries: 2\n")
    w = make_widget(pipeline)
    t0 = time.time()
    started(w, t0)
    w(StepSkipped("numbers", ("fresh",)))
    assert "skipped" in text(w.row_widgets["numbers"].state)
    assert "fresh" in text(w.row_widgets["numbers"].note)
    assert w.row_widgets["numbers"].progress.layout.display == "none"

    w(StepStarted("total", 1, notebook("total"), 3, t0))
    w(StepFailed("total", 1, 0.5, notebook("total"), ERROR, will_retry=True, retry_in_s=1.0))
    parts = w.row_widgets["total"]
    assert "retrying" in text(parts.state)
    assert "attempt 1 failed" in text(parts.note) and "retry in 1 s" in text(parts.note)
    # the failed attempt's error shows (as in the terminal) until the next attempt starts
    assert parts.error.layout.display == "" and ERROR.ename in text(parts.error)
    w(StepStarted("total", 2, notebook("total"), 3, t0))
    assert parts.error.layout.display == "none"
    assert "2 of 3" in text(parts.attempts)
    assert "running" in text(parts.state) and parts.progress.bar_style == ""
    w(StepCancelled("total", 2, 0.25, notebook("total"), t0))
    w(StepCancelled("report", 0, 0.0, None))
    assert "cancelled" in text(parts.state)
    assert parts.progress.bar_style == "warning"
    assert "cancelled" in text(w.row_widgets["report"].state)
    assert text(w.row_widgets["report"].notebook) == ""
    finish(w, RunStatus.CANCELLED, t0,
           numbers=StepResult("numbers", StepStatus.SKIPPED),
           total=StepResult("total", StepStatus.CANCELLED, 2, 0.25, notebook("total")),
           report=StepResult("report", StepStatus.CANCELLED))
    assert "cancelled" in text(w.title)
    assert "2</span> cancelled" in text(w.totals) and "1</span> skipped" in text(w.totals)


def in_thread(target, *args) -> None:
    thread = threading.Thread(target=target, args=args)
    thread.start()
    thread.join()


@pytest.mark.parametrize("from_main_thread", [False, True])
def test_cancel_button_calls_runner_cancel_when_a_click_can_reach_the_kernel(pipeline, from_main_thread):
    """A background run, or a blocking one waited for with UI events processed: the events' thread does not matter."""
    w = make_widget(pipeline)
    assert w.cancel_button.disabled  # nothing to cancel before attach
    runner = FakeRunner()
    w.attach(runner, can_cancel=True)  # type: ignore[arg-type]
    assert not w.cancel_button.disabled and w.cancel_button.description == "Cancel"
    if from_main_thread:
        started(w, time.time())
    else:
        in_thread(started, w, time.time())
    assert not w.blocking
    assert not w.cancel_button.disabled and w.cancel_button.description == "Cancel"
    w.cancel_button.click()
    assert runner.cancels == 1
    assert w.cancel_button.disabled and w.cancel_button.description == "Cancelling…"
    w.cancel_button.click()  # a second click is ignored
    assert runner.cancels == 1
    finish(w, RunStatus.CANCELLED, time.time())
    assert w.cancel_button.layout.display == "none"


@pytest.mark.parametrize("from_main_thread", [False, True])
def test_a_run_that_holds_the_kernel_points_to_the_kernel_interrupt(pipeline, from_main_thread):
    w = make_widget(pipeline)
    runner = FakeRunner()
    w.attach(runner, can_cancel=False)  # type: ignore[arg-type]
    assert w.blocking and w.cancel_button.disabled  # at once, before the run starts
    assert "Interrupt the kernel" in w.cancel_button.description
    if from_main_thread:
        started(w, time.time())
    else:
        in_thread(started, w, time.time())
    assert w.blocking
    assert w.cancel_button.disabled
    assert "Interrupt the kernel" in w.cancel_button.description
    finish(w, RunStatus.SUCCEEDED, time.time())
    w.cancel_button.click()  # a click read only after the run ended does nothing
    assert runner.cancels == 0
    assert w.cancel_button.layout.display == "none"


def test_without_can_cancel_the_thread_the_run_starts_on_decides(pipeline):
    """attach(runner) alone: a run started on the main thread holds the kernel, one on another thread does not."""
    blocking = make_widget(pipeline)
    blocking.attach(FakeRunner())  # type: ignore[arg-type]
    started(blocking, time.time())
    assert blocking.blocking and "Interrupt the kernel" in blocking.cancel_button.description
    finish(blocking, RunStatus.SUCCEEDED, time.time())

    background = make_widget(pipeline)
    background.attach(FakeRunner())  # type: ignore[arg-type]
    in_thread(started, background, time.time())
    assert not background.blocking and background.cancel_button.description == "Cancel"
    assert not background.cancel_button.disabled
    finish(background, RunStatus.SUCCEEDED, time.time())


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
    assert not w.blocking
    assert not w.cancel_button.disabled and w.cancel_button.description == "Cancel"
    w.cancel_button.click()


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
    assert w.result is result and "cancelled" in text(w.title)
    assert result.duration_s < 15  # stopped early, not after the 3 x 3 s of sleeping cells


def test_a_blocking_run_without_ui_polling_holds_the_kernel(fixture_pipeline, monkeypatch, shown):
    """ipykernel 7, or no jupyter-ui-poll: the run uses the cell's thread and the widget points to the interrupt."""
    root = fixture_pipeline("widget_slow_steps")
    monkeypatch.setattr(api, "_ui_poller", lambda: None)
    seen: list[tuple[str, bool, str]] = []

    def listener(event) -> None:
        if isinstance(event, RunStarted):
            [w] = shown
            seen.append((threading.current_thread().name, w.blocking, w.cancel_button.description))

    result = nbflow.run(root, ["numbers"], parameters={"delay": 0}, display=True, listeners=[listener])
    assert result.ok
    [(thread, blocking, label)] = seen
    assert thread == threading.main_thread().name and blocking and "Interrupt the kernel" in label


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
    in_thread(lambda: found.append(api._ui_poller()))
    assert found == [None]
    for version in ("7.0.1", "7.4.0", "8.0.0"):
        monkeypatch.setattr(ipykernel, "__version__", version)
        assert api._ui_poller() is None
    monkeypatch.setattr(ipykernel, "__version__", "6.31.0")
    monkeypatch.setitem(__import__("sys").modules, "jupyter_ui_poll", None)  # not installed
    assert api._ui_poller() is None


def test_timer_moves_elapsed_while_running_and_stops_at_run_finished(pipeline, monkeypatch):
    monkeypatch.setattr(widget_module, "TICK_S", 0.02)
    w = make_widget(pipeline)
    t0 = time.time()
    started(w, t0)
    w(StepStarted("numbers", 1, notebook("numbers"), 3, t0 - 5))
    elapsed = w.row_widgets["numbers"].elapsed
    first = text(elapsed)
    deadline = time.time() + 5
    while text(elapsed) == first and time.time() < deadline:
        time.sleep(0.01)
    assert text(elapsed) != first
    assert float(text(elapsed).split(">")[1].split(" ")[0]) >= 5.0
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


def test_graph_is_redrawn_on_state_changes_only(pipeline, monkeypatch):
    from nbflow.ui import plot

    w = make_widget(pipeline)
    assert all(f">{name}<" in text(w.graph_view) for name in w.rows)
    calls = []
    real = plot.html
    monkeypatch.setattr(plot, "html", lambda *a, **k: calls.append(a) or real(*a, **k))
    t0 = time.time()
    started(w, t0)
    w(StepStarted("numbers", 1, notebook("numbers"), 3, t0))
    assert len(calls) == 1
    w(CellStarted("numbers", 2, 1, 3))
    w(CellFinished("numbers", 2, 1, 3, 0.1, True))
    assert len(calls) == 1
    w(StepSucceeded("numbers", 1, 1.0, notebook("numbers"), "fp", {}, {}, (), (), t0))
    assert len(calls) == 2
    snapshot = calls[-1][1]
    assert snapshot.steps["numbers"].status == StepStatus.SUCCEEDED
    assert snapshot.steps["total"].status == StepStatus.PENDING
    assert f"widget_step_raises/_nbflow/runs/{RUN}/numbers.ipynb" in text(w.graph_view)  # boxes link too
    finish(w, RunStatus.FAILED, t0)


def test_saved_notebook_keeps_the_final_state_as_html(pipeline, monkeypatch):
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
    w.show()
    first = displayed[0]
    assert first["application/vnd.jupyter.widget-view+json"]["model_id"] == w.box.model_id
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
    assert final["application/vnd.jupyter.widget-view+json"]["model_id"] == w.box.model_id
    page = final["text/html"]
    for expected in ("succeeded", "failed", "not run", "ValueError: the numbers add up to 55, not 54", "cell 5",
                     f'href="widget_step_raises/_nbflow/runs/{RUN}/total.ipynb"', RUN):
        assert expected in page
    assert "pending" not in page and "running" not in page
    plain = final["text/plain"]
    assert "failed" in plain and "ValueError" in plain
