"""One picture of a run, fed by the Runner's events and read by every presenter.

Owns: what is known about each step while a run goes on (state, attempt,
progress through its cells, the cell it is in, times, executed notebook,
error, the note that says why), the run's own state and totals, the words,
icons and colours of each state, how a duration is written, and how a cell
is named: `In [n]`, its execution count in the executed notebook, the one
number a Jupyter user sees (events.cell_label writes it; the progress `n/total`
counts the same cells), and the last lines a running step printed (its
stdout and stderr, from CellOutput events). The widget, the terminal and the
log read this; none keeps a picture of its own, so they cannot disagree.
Imports nothing heavy: no ipywidgets, no rich.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from ..events import (MASK, CellFinished, CellOutput, CellStarted, Event, PlannedStep, RunFinished, RunResult,
                      RunStarted, RunStatus, StepCancelled, StepError, StepFailed, StepNotRun, StepSkipped,
                      StepStarted, StepStatus, StepSucceeded, WatchCycleFinished, cell_label)

if TYPE_CHECKING:
    from ..graph import Graph


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
# a step the run was cancelled before it started: nothing of it ran
NOT_STARTED = StateStyle("○", "not started", "#868e96", "grey50", "#f8f9fa", "#adb5bd", "#868e96", dash=True,
                         legend="not started")
# an instance of a parameter grid: `train[alpha=0.1,seed=1]` belongs to the group `train`
_INSTANCE = re.compile(r"^(?P<base>[^\[\]]+)\[(?P<values>[^\[\]]*)\]$")
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


def group_of(name: str) -> str | None:
    """The grid a step is an instance of (`train` for `train[alpha=0.1]`), from its name alone; None if none."""
    match = _INSTANCE.match(name)
    return match.group("base") if match else None


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
    execution: int | None = None  # the n of the In [n] of `cell` in the executed notebook
    source_line: str = ""  # the first line of the cell running now
    output: list[tuple[str, str]] = field(default_factory=list)  # the last lines it printed: (stream, line)
    output_open: bool = False  # the last line has no newline yet: what comes next continues it
    parameters: dict[str, Any] = field(default_factory=dict)  # effective, secrets masked
    outputs: tuple[str, ...] = ()  # declared output paths, relative to the pipeline folder
    worker: str | None = None  # the dask worker it ran on (None: this machine)

    @property
    def style(self) -> StateStyle:
        if self.retrying:
            return RETRYING
        return NOT_STARTED if self.never_started else STATE_STYLES[self.status]

    @property
    def never_started(self) -> bool:
        """Cancelled before its first attempt began."""
        return self.status == StepStatus.CANCELLED and self.attempt == 0

    @property
    def group(self) -> str | None:
        return group_of(self.name)

    @property
    def at(self) -> str:
        """The cell it runs now (or stopped in) as the user sees it in the executed notebook: 'In [3]'."""
        return cell_label(self.execution, self.cell)

    @property
    def live_output(self) -> list[tuple[str, str]]:
        """The last lines a running step printed, (stream, line); none once it ended."""
        return self.output if self.status == StepStatus.RUNNING and not self.retrying else []

    def take_output(self, stream: str, text: str, cut: bool) -> None:
        """Add what a cell printed: the last LIVE_LINES lines are kept; a carriage return rewrites its line
        (a progress bar); a line that has no newline yet goes on with the next text of its stream."""
        pieces = text.split("\n")
        if cut or not self.output_open or not self.output or self.output[-1][0] != stream:
            self.output.append((stream, ""))
        for i, piece in enumerate(pieces):
            if i:
                self.output.append((stream, ""))
            last = self.output[-1][1] + piece
            if "\r" in last:
                kept = [part for part in last.split("\r") if part]
                last = kept[-1] if kept else ""
            self.output[-1] = (stream, last[-MAX_LIVE_LINE:])
        self.output_open = not text.endswith("\n")
        if not self.output_open and self.output and self.output[-1][1] == "":
            self.output.pop()  # the empty line after the last newline
        del self.output[:-LIVE_LINES]

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


LIVE_LINES = 6  # the last lines of a running step's output that are shown
MAX_LIVE_LINE = 300  # characters of each


class RunView:
    """The state of a run, step by step; `apply` each event (a listener may call it as `view(event)`)."""

    def __init__(self, planned: Iterable[PlannedStep] = (), max_attempts: Mapping[str, int] | None = None,
                 graph: "Graph | None" = None, parameters: Mapping[str, Mapping[str, Any]] | None = None):
        """`graph` (optional) gives each step its declared outputs, its parameters' defaults and its cells' source;
        `parameters` the values injected per step (a Plan's)."""
        self.steps: dict[str, StepView] = {}
        self.graph = graph
        self._injected = dict(parameters or {})
        self.up_to_date_since = ""  # an all-fresh run: the newest run that made what is current
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
            row = StepView(p.name, self._max_attempts.get(p.name, 1), note=note, reasons=p.reasons)
            self._describe(row)
            self.steps[p.name] = row

    def _describe(self, row: StepView) -> None:
        """What the graph declares of a step: its output files and its effective parameters."""
        graph = self.graph
        step = graph.steps.get(row.name) if graph is not None else None
        if graph is None or step is None:
            return
        from ..graph import relative_to  # noqa: PLC0415 - only the widget gives a graph
        from ..params import is_secret_parameter  # noqa: PLC0415

        root = Path(graph.root)
        row.outputs = tuple(relative_to(ref.path, root) for ref in graph.outputs_of(row.name)  # a URL stays one
                            if not ref.label.startswith("value "))
        values = {name: p.default for name, p in step.parameters.items() if name not in ("inputs", "outputs")}
        values.update({k: v for k, v in self._injected.get(row.name, {}).items() if k not in ("inputs", "outputs")})
        secrets = set(getattr(graph.config, "secrets", ()) or ())
        row.parameters = {k: MASK if is_secret_parameter(k, secrets) else v for k, v in values.items()}

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
            row.cells_done, row.cells_total, row.cell, row.execution = 0, event.total_cells, None, None
            row.source_line, row.output, row.output_open = "", [], False
            row.started_at, row.duration_s, row.notebook, row.error = event.started_at, None, None, None
            if event.attempt == 1 and event.reasons:
                row.reasons = event.reasons
            row.note = "starting"
        elif isinstance(event, CellStarted):
            row.cells_total, row.cell, row.execution = event.total, event.cell, event.execution_count
            row.source_line = event.source_line
            row.note = f"running {row.at}" if row.at else "running the injected parameters"
        elif isinstance(event, CellOutput):
            row.take_output(event.stream, event.text, event.cut)
        elif isinstance(event, CellFinished):
            row.cells_done = event.index if event.ok else event.index - 1
            row.cells_total = event.total
        elif isinstance(event, StepSucceeded):
            row.worker = event.worker
            row.status, row.attempt, row.duration_s = StepStatus.SUCCEEDED, event.attempt, event.duration_s
            row.notebook, row.cells_done, row.cell, row.note = event.notebook, row.cells_total, None, ""
            row.source_line = ""
        elif isinstance(event, StepFailed):
            row.attempt, row.notebook = event.attempt, event.notebook or row.notebook
            row.cell = event.error.cell or row.cell
            row.execution = event.error.execution_count or row.execution
            if event.will_retry:
                row.retrying, row.error = True, event.error
                row.note = f"attempt {event.attempt} failed; retry in {event.retry_in_s:g} s"
            else:
                row.status, row.retrying, row.duration_s = StepStatus.FAILED, False, event.duration_s
                row.error, row.note, row.source_line = event.error, "", ""
        elif isinstance(event, StepCancelled):
            row.status, row.retrying, row.note, row.source_line = StepStatus.CANCELLED, False, "", ""
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
            if row.status != StepStatus.RUNNING:
                row.source_line = ""
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

    def tallies(self) -> list[tuple[StateStyle, int]]:
        """How many steps show each state, in TOTALS_ORDER, 'not started' apart from 'cancelled'."""
        counts: dict[str, tuple[StateStyle, int]] = {}
        order = [STATE_STYLES[s].word for s in TOTALS_ORDER]
        order.insert(order.index("cancelled") + 1, NOT_STARTED.word)
        for row in self.steps.values():
            style = NOT_STARTED if row.never_started else STATE_STYLES[row.status]
            counts[style.word] = (style, counts.get(style.word, (style, 0))[1] + 1)
        return [counts[word] for word in order if word in counts]

    @property
    def nothing_to_do(self) -> bool:
        """Every step was fresh: the run ran nothing."""
        return bool(self.steps) and all(r.status == StepStatus.SKIPPED for r in self.steps.values())

    def summary(self) -> str:
        """The run in one line: 'nothing to do: 15 steps up to date since run X' for an all-fresh run."""
        if self.nothing_to_do and self.result is not None:
            n = len(self.steps)
            since = f" since run {self.up_to_date_since}" if self.up_to_date_since else ""
            return f"nothing to do: {n} step{'s' if n != 1 else ''} up to date{since}"
        return " · ".join(f"{n} {style.word}" for style, n in self.tallies())

    def groups(self) -> dict[str, list[str]]:
        """Grid instances by their grid (two or more instances of one base name), in plan order."""
        found: dict[str, list[str]] = {}
        for name in self.steps:
            base = group_of(name)
            if base is not None:
                found.setdefault(base, []).append(name)
        return {base: names for base, names in found.items() if len(names) > 1}

    def to_rerun(self) -> list[str]:
        """The failed steps and those that did not run because of them: what 'rerun failed' runs."""
        if not any(r.status == StepStatus.FAILED for r in self.steps.values()):
            return []
        return [r.name for r in self.steps.values() if r.status in (StepStatus.FAILED, StepStatus.NOT_RUN)]

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


# -- watch mode: the words of a cycle -------------------------------------------------------

def cycle_cause(changed: tuple[str, ...], limit: int = 5) -> str:
    """Why a cycle runs: 'changed clean.ipynb, data/raw.csv' (at most `limit` named)."""
    if not changed:
        return "running what is stale"
    more = f" and {len(changed) - limit} more" if len(changed) > limit else ""
    return "changed " + ", ".join(changed[:limit]) + more


def cycle_outcome(event: WatchCycleFinished) -> tuple[str, StateStyle | None]:
    """What a cycle did, in words, with the style of its outcome (None: an error, or nothing ran)."""
    if event.error is not None:
        first = event.error.splitlines()[0] if event.error else "error"
        more = f" (and {len(event.error.splitlines()) - 1} more problems)" if "\n" in event.error else ""
        return f"✖ cannot run: {first}{more}; fix it and save, the watch goes on", None
    result = event.result
    assert result is not None
    fresh = sum(1 for s in result.steps.values() if s.status == StepStatus.SKIPPED)
    if not event.reran:
        return f"nothing to rerun: {fresh} step{'s' if fresh != 1 else ''} fresh", None
    style = STATE_STYLES[StepStatus.SUCCEEDED if result.ok else StepStatus.CANCELLED
                         if result.status == RunStatus.CANCELLED else StepStatus.FAILED]
    reran = ", ".join(event.reran[:8]) + (f" and {len(event.reran) - 8} more" if len(event.reran) > 8 else "")
    kept = f", {fresh} fresh" if fresh else ""
    return f"{style.icon} reran {reran}: {result.status.value} in {format_duration(result.duration_s)}{kept}", style
