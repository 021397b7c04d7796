"""nbflow.ui.widget without a browser: scripted events in, widget values out."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

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
    assert parts.error.layout.display == "none"  # not a failure (yet)
    w(StepStarted("total", 2, notebook("total"), 3, t0))
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


def test_cancel_button_calls_runner_cancel_for_a_background_run(pipeline):
    w = make_widget(pipeline)
    assert w.cancel_button.disabled  # nothing to cancel before attach
    runner = FakeRunner()
    w.attach(runner)  # type: ignore[arg-type]
    background = threading.Thread(target=started, args=(w, time.time()))
    background.start()
    background.join()
    assert not w.blocking
    assert not w.cancel_button.disabled and w.cancel_button.description == "Cancel"
    w.cancel_button.click()
    assert runner.cancels == 1
    assert w.cancel_button.disabled and w.cancel_button.description == "Cancelling…"
    w.cancel_button.click()  # a second click is ignored
    assert runner.cancels == 1
    finish(w, RunStatus.CANCELLED, time.time())
    assert w.cancel_button.layout.display == "none"


def test_a_blocking_run_points_to_the_kernel_interrupt(pipeline):
    w = make_widget(pipeline)
    w.attach(FakeRunner())  # type: ignore[arg-type]
    started(w, time.time())  # from the main thread: the run holds the kernel
    assert w.blocking
    assert w.cancel_button.disabled
    assert "Interrupt the kernel" in w.cancel_button.description
    finish(w, RunStatus.SUCCEEDED, time.time())


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
