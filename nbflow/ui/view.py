"""One picture of a run, fed by the Runner's events and read by every presenter.

Owns: what is known about each step while a run goes on (state, attempt,
progress through its cells, the cell it is in, times, executed notebook,
error, the note that says why), the run's own state and totals, the words,
icons and colours of each state, and how a duration is written. The widget,
the terminal and the log read this; none keeps a picture of its own, so they
cannot disagree. Imports nothing heavy: no ipywidgets, no rich.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable, Mapping

from ..events import (CellFinished, CellStarted, Event, PlannedStep, RunFinished, RunResult, RunStarted, RunStatus,
                      StepCancelled, StepError, StepFailed, StepNotRun, StepSkipped, StepStarted, StepStatus,
                      StepSucceeded)


@dataclass(frozen=True)
class StateStyle:
    icon: str
    word: str
    colour: str  # for HTML badges; white text on it has a contrast >= 4:1
    rich: str  # the terminal's style
    fill: str = "#ffffff"  # a node of the graph: a light fill with a strong outline
    stroke: str = "#495057"
    text: str = "#212529"
    dash: bool = False
    legend: str = ""


# The order is the graph legend's order.
STATE_STYLES: dict[StepStatus, StateStyle] = {
    StepStatus.PENDING: StateStyle("○", "pending", "#868e96", "grey50", "#f1f3f5", "#868e96", legend="pending"),
    StepStatus.RUNNING: StateStyle("▶", "running", "#1971c2", "bold dodger_blue2", "#d0ebff", "#1c7ed6",
                                   legend="running"),
    StepStatus.SUCCEEDED: StateStyle("✔", "succeeded", "#2b8a3e", "green", "#d3f9d8", "#2f9e44", legend="succeeded"),
    StepStatus.SKIPPED: StateStyle("↷", "skipped", "#5c7f67", "dark_sea_green4", "#e6f0e8", "#8db596", "#3d5c45",
                                   legend="skipped (fresh)"),
    StepStatus.FAILED: StateStyle("✖", "failed", "#c92a2a", "bold red", "#ffe3e3", "#e03131", legend="failed"),
    StepStatus.CANCELLED: StateStyle("■", "cancelled", "#d9480f", "dark_orange", "#ffe8cc", "#f08c00",
                                     legend="cancelled"),
    StepStatus.NOT_RUN: StateStyle("⊘", "not run", "#868e96", "grey50", "#f8f9fa", "#adb5bd", "#868e96", dash=True,
                                   legend="not run"),
}
RETRYING = StateStyle("↻", "retrying", "#e67700", "bold yellow")
RUN_STYLES: dict[RunStatus, StateStyle] = {
    RunStatus.RUNNING: STATE_STYLES[StepStatus.RUNNING],
    RunStatus.SUCCEEDED: STATE_STYLES[StepStatus.SUCCEEDED],
    RunStatus.FAILED: STATE_STYLES[StepStatus.FAILED],
    RunStatus.CANCELLED: STATE_STYLES[StepStatus.CANCELLED],
    RunStatus.INTERRUPTED: STATE_STYLES[StepStatus.CANCELLED],
}
# the order in which totals are written, everywhere
TOTALS_ORDER = (StepStatus.SUCCEEDED, StepStatus.SKIPPED, StepStatus.FAILED, StepStatus.NOT_RUN,
                StepStatus.CANCELLED, StepStatus.RUNNING, StepStatus.PENDING)
FINISHED = frozenset({StepStatus.SUCCEEDED, StepStatus.SKIPPED, StepStatus.FAILED, StepStatus.NOT_RUN,
                      StepStatus.CANCELLED})


def format_duration(seconds: float | None) -> str:
    """'0.4 s', '3 min 04 s', '1 h 02 min'; '' for None."""
    if seconds is None:
        return ""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def not_run_note(because: str) -> str:
    return "--fail-fast: another step failed" if because == "--fail-fast" else f"{because} did not succeed"


@dataclass
class StepView:
    """What is known about one step of the run."""

    name: str
    max_attempts: int = 1
    status: StepStatus = StepStatus.PENDING
    retrying: bool = False  # an attempt failed and another one follows
    attempt: int = 0
    cells_done: int = 0  # code cells that completed (a cell that raised did not)
    cells_total: int = 0
    cell: int | None = None  # the notebook cell (as numbered in Jupyter) running now, or where it stopped
    started_at: float | None = None
    duration_s: float | None = None
    notebook: str | None = None  # the executed copy, relative to the pipeline folder
    error: StepError | None = None
    note: str = ""  # why it runs, why it was skipped or not run, what it does now
    reasons: tuple[str, ...] = ()

    @property
    def style(self) -> StateStyle:
        return RETRYING if self.retrying else STATE_STYLES[self.status]

    @property
    def started(self) -> bool:
        return self.attempt > 0

    @property
    def cells(self) -> str:
        """Progress through the code cells, '3/4'; '' before the step started."""
        return f"{self.cells_done}/{self.cells_total}" if self.started else ""

    def elapsed(self, now: float) -> float | None:
        if self.duration_s is not None:
            return self.duration_s
        if self.started_at is not None and self.status == StepStatus.RUNNING:
            return max(0.0, now - self.started_at)
        return None


class RunView:
    """The state of a run, step by step; `apply` each event (a listener may call it as `view(event)`)."""

    def __init__(self, planned: Iterable[PlannedStep] = (), max_attempts: Mapping[str, int] | None = None):
        self.steps: dict[str, StepView] = {}
        self.run_id = ""
        self.root = ""
        self.status = RunStatus.RUNNING
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.result: RunResult | None = None
        self._max_attempts = dict(max_attempts or {})
        self._plan(planned)

    def _plan(self, planned: Iterable[PlannedStep]) -> None:
        for p in planned:
            note = "fresh" if p.action == "skip" else "; ".join(p.reasons)
            self.steps[p.name] = StepView(p.name, self._max_attempts.get(p.name, 1), note=note, reasons=p.reasons)

    def __call__(self, event: Event) -> StepView | None:
        return self.apply(event)

    def apply(self, event: Event) -> StepView | None:
        """Take in one event; returns the step it changed, if any."""
        if isinstance(event, RunStarted):
            self.run_id, self.root, self.started_at = event.run_id, event.root, event.started_at
            if not self.steps:
                self._plan(event.plan)
            return None
        if isinstance(event, RunFinished):
            self._finish(event.result)
            return None
        row = self.steps.get(getattr(event, "step", ""))
        if row is None:
            return None
        if isinstance(event, StepStarted):
            row.status, row.retrying, row.attempt = StepStatus.RUNNING, False, event.attempt
            row.cells_done, row.cells_total, row.cell = 0, event.total_cells, None
            row.started_at, row.duration_s, row.notebook, row.error = event.started_at, None, None, None
            if event.attempt == 1 and event.reasons:
                row.reasons = event.reasons
            row.note = "starting"
        elif isinstance(event, CellStarted):
            row.cells_total, row.cell = event.total, event.cell
            row.note = f"running cell {event.cell}" if event.cell else "running the injected parameters"
        elif isinstance(event, CellFinished):
            row.cells_done = event.index if event.ok else event.index - 1
            row.cells_total = event.total
        elif isinstance(event, StepSucceeded):
            row.status, row.attempt, row.duration_s = StepStatus.SUCCEEDED, event.attempt, event.duration_s
            row.notebook, row.cells_done, row.cell, row.note = event.notebook, row.cells_total, None, ""
        elif isinstance(event, StepFailed):
            row.attempt, row.notebook = event.attempt, event.notebook or row.notebook
            row.cell = event.error.cell or row.cell
            if event.will_retry:
                row.retrying, row.error = True, event.error
                row.note = f"attempt {event.attempt} failed; retry in {event.retry_in_s:g} s"
            else:
                row.status, row.retrying, row.duration_s = StepStatus.FAILED, False, event.duration_s
                row.error, row.note = event.error, ""
        elif isinstance(event, StepCancelled):
            row.status, row.retrying, row.note = StepStatus.CANCELLED, False, ""
            if event.attempt:
                row.attempt, row.duration_s = event.attempt, event.duration_s
                row.notebook = event.notebook or row.notebook
        elif isinstance(event, StepSkipped):
            row.status, row.reasons, row.note = StepStatus.SKIPPED, event.reasons, "; ".join(event.reasons)
        elif isinstance(event, StepNotRun):
            row.status, row.note = StepStatus.NOT_RUN, not_run_note(event.because)
        return row

    def _finish(self, result: RunResult) -> None:
        self.result, self.status = result, result.status
        self.started_at, self.finished_at = result.started_at, result.finished_at
        for name, final in result.steps.items():
            row = self.steps.setdefault(name, StepView(name))
            row.status, row.retrying = final.status, False
            row.attempt = final.attempts or row.attempt
            if final.duration_s is not None:
                row.duration_s = final.duration_s
            elif row.status in (StepStatus.CANCELLED, StepStatus.FAILED) and row.started_at is not None:
                row.duration_s = max(0.0, result.finished_at - row.started_at)
            row.notebook = final.notebook or row.notebook
            row.error = final.error if final.status == StepStatus.FAILED else None

    # -- what presenters ask ------------------------------------------------------------
    def counts(self) -> dict[StepStatus, int]:
        """How many steps are in each state, in TOTALS_ORDER, leaving out the empty ones."""
        counts = {status: 0 for status in TOTALS_ORDER}
        for row in self.steps.values():
            counts[row.status] += 1
        return {status: n for status, n in counts.items() if n}

    @property
    def done(self) -> int:
        return sum(row.status in FINISHED for row in self.steps.values())

    def elapsed(self, now: float | None = None) -> float | None:
        if self.started_at is None:
            return None
        end = self.finished_at if self.finished_at is not None else (now or time.time())
        return end - self.started_at

    def snapshot(self, now: float | None = None) -> RunResult:
        """The run as a RunResult (the final one once it ended), e.g. to colour the graph."""
        if self.result is not None:
            return self.result
        from ..events import StepResult  # noqa: PLC0415

        now = now or time.time()
        steps = {r.name: StepResult(r.name, r.status, r.attempt, r.elapsed(now), r.notebook, r.error, r.reasons)
                 for r in self.steps.values()}
        return RunResult(self.run_id, self.root, RunStatus.RUNNING, steps, self.started_at or now, now)
