"""Live progress of a run in a terminal, drawn with rich.

Owns: the live table (one line per step: state, a bar through its cells,
elapsed time, attempts, and why it runs or why it failed), the failure
details (error, failing line, executed notebook) and the summary line. A
listener; the CLI picks it when stdout is a terminal. rich is imported here
and nowhere else.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
from dataclasses import dataclass

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from ..events import (
    CellFinished,
    CellStarted,
    Event,
    RunFinished,
    RunResult,
    RunStarted,
    StepCancelled,
    StepError,
    StepFailed,
    StepNotRun,
    StepSkipped,
    StepStarted,
    StepSucceeded,
)

# status -> (icon, word, rich style): the hues of nbflow.ui.plot
STYLES: dict[str, tuple[str, str, str]] = {
    "pending": ("○", "pending", "grey50"),
    "running": ("▶", "running", "bold dodger_blue2"),
    "retrying": ("↻", "retrying", "bold yellow"),
    "succeeded": ("✔", "succeeded", "green"),
    "skipped": ("↷", "skipped", "dark_sea_green4"),
    "failed": ("✖", "failed", "bold red"),
    "not_run": ("⊘", "not run", "grey50"),
    "cancelled": ("■", "cancelled", "dark_orange"),
}
_BAR_WIDTH = 16


@dataclass
class _Row:
    name: str
    status: str = "pending"
    note: str = ""  # why it runs, why it was skipped, what it waits for
    attempt: int = 0
    cells_done: int = 0
    cells_total: int = 0
    started_at: float | None = None
    duration_s: float | None = None
    notebook: str | None = None
    error: StepError | None = None

    def elapsed(self, now: float) -> float | None:
        if self.duration_s is not None:
            return self.duration_s
        if self.started_at is not None and self.status == "running":
            return now - self.started_at
        return None


class TerminalProgress:
    """A listener that shows a run live in the terminal; leaves the final table and a summary on screen."""

    def __init__(self, console: Console | None = None, *, refresh_per_second: float = 8):
        self.console = console or Console()
        self.refresh_per_second = refresh_per_second
        self.rows: dict[str, _Row] = {}
        self.run_id = ""
        self.root = ""
        self.result: RunResult | None = None
        self._live: Live | None = None
        self._lock = threading.Lock()
        # Kernels write to the terminal directly (warnings, crash reports): on our own terminal their
        # lines are printed above the live table instead of tearing it.
        self._reroute_stderr = console is None and _is_terminal(1) and _is_terminal(2)
        self._stderr: _StderrAboveLive | None = None

    # -- events ---------------------------------------------------------------------------
    def __call__(self, event: Event) -> None:
        with self._lock:
            self._apply(event)
        if isinstance(event, RunStarted):
            self._start()
        elif isinstance(event, RunFinished):
            self._stop()
            self.console.print(self._summary(), soft_wrap=True)  # paths stay whole, easy to copy
        elif self._live is not None:
            self._live.refresh()

    def _apply(self, e: Event) -> None:
        if isinstance(e, RunStarted):
            self.run_id, self.root = e.run_id, e.root
            self.rows = {p.name: _Row(p.name, note="fresh" if p.action == "skip" else "; ".join(p.reasons))
                         for p in e.plan}
            return
        row = self.rows.get(getattr(e, "step", ""))
        if isinstance(e, RunFinished):
            self.result = e.result
            for name, step in e.result.steps.items():
                r = self.rows.setdefault(name, _Row(name))
                r.status = step.status.value
                r.attempt = step.attempts or r.attempt
                r.notebook = step.notebook or r.notebook
                r.error = step.error or (r.error if r.status == "failed" else None)
                if step.duration_s is not None:
                    r.duration_s = step.duration_s
        elif row is None:
            return
        elif isinstance(e, StepStarted):
            row.status, row.attempt, row.started_at = "running", e.attempt, e.started_at
            row.cells_done, row.cells_total, row.notebook, row.duration_s = 0, e.total_cells, e.notebook, None
            if e.reasons and e.attempt == 1:
                row.note = "; ".join(e.reasons)
        elif isinstance(e, CellStarted):
            row.cells_total = e.total
        elif isinstance(e, CellFinished):
            row.cells_done, row.cells_total = e.index, e.total
        elif isinstance(e, StepSucceeded):
            row.status, row.duration_s, row.notebook, row.error = "succeeded", e.duration_s, e.notebook, None
            row.cells_done = row.cells_total
        elif isinstance(e, StepFailed):
            row.error, row.notebook = e.error, e.notebook or row.notebook
            if e.will_retry:
                row.status, row.note = "retrying", f"attempt {e.attempt} failed; retrying in {e.retry_in_s:g}s"
            else:
                row.status, row.duration_s = "failed", e.duration_s
        elif isinstance(e, StepCancelled):
            row.status = "cancelled"
            row.duration_s = e.duration_s if e.attempt else None
            row.notebook = e.notebook or row.notebook
        elif isinstance(e, StepSkipped):
            row.status, row.note = "skipped", "; ".join(e.reasons)
        elif isinstance(e, StepNotRun):
            row.status = "not_run"
            row.note = "--fail-fast" if e.because == "--fail-fast" else f"{e.because} did not succeed"

    # -- the live display --------------------------------------------------------------------
    def _start(self) -> None:
        self._stop()
        self._live = Live(console=self.console, get_renderable=self.render, refresh_per_second=self.refresh_per_second,
                          transient=False, redirect_stdout=False, redirect_stderr=False)
        self._live.start()
        if self._reroute_stderr:
            self._stderr = _StderrAboveLive(self.console)
        atexit.register(self._stop)  # a run that dies without RunFinished must still give the terminal back

    def _stop(self) -> None:
        live, self._live = self._live, None
        if live is not None:
            atexit.unregister(self._stop)
            live.stop()  # draws the final state once more, without spinners, and keeps it on screen
        stderr, self._stderr = self._stderr, None
        if stderr is not None:
            stderr.restore()

    # -- rendering -------------------------------------------------------------------------
    def render(self) -> RenderableType:
        with self._lock:
            now = time.time()
            table = Table(box=None, show_header=True, header_style="grey50", pad_edge=False, padding=(0, 1),
                          title=self._title(), title_justify="left", title_style="bold", expand=True)
            table.add_column("", width=1, min_width=1, no_wrap=True)
            table.add_column("step", no_wrap=True, style="bold")
            table.add_column("state", no_wrap=True)
            table.add_column("cells", no_wrap=True)
            table.add_column("elapsed", justify="right", no_wrap=True)
            table.add_column("tries", justify="right", no_wrap=True)
            table.add_column("", overflow="ellipsis", no_wrap=True, ratio=1, style="grey50")
            for row in self.rows.values():
                table.add_row(*self._cells(row, now))
            failures = [self._failure(r) for r in self.rows.values() if r.error is not None
                        and r.status in ("failed", "retrying")]
            return Group(table, *failures) if failures else table

    def _title(self) -> str:
        total = len(self.rows)
        done = sum(r.status in ("succeeded", "skipped", "failed", "not_run", "cancelled") for r in self.rows.values())
        return f"nbflow run {self.run_id}  ({done}/{total} steps done)"

    def _cells(self, row: _Row, now: float) -> list[RenderableType]:
        icon, word, style = STYLES.get(row.status, STYLES["pending"])
        live = self._live is not None and self.result is None
        mark: RenderableType = Spinner("dots", style=style) if row.status == "running" and live else Text(icon, style)
        if row.cells_total and row.attempt:
            bar_style = {"failed": "red", "cancelled": "dark_orange", "retrying": "yellow"}.get(row.status, "green")
            bar: RenderableType = Text.assemble(*_bar_segments(row.cells_done, row.cells_total, bar_style),
                                                f" {row.cells_done}/{row.cells_total}")
        else:
            bar = Text("")
        elapsed = row.elapsed(now)
        note = row.note
        if row.status == "failed" and row.error is not None:
            note = row.error.summary()
        return [mark, Text(row.name), Text(word, style), bar,
                Text(_seconds(elapsed) if elapsed is not None else ""),
                Text(str(row.attempt) if row.attempt > 1 else ""), Text(note, style="red" if row.status == "failed"
                                                                         else "grey50")]

    def _failure(self, row: _Row) -> RenderableType:
        error = row.error
        assert error is not None
        text = Text()
        text.append(f"✖ {row.name}", style="bold red")
        text.append(f": {error.summary()}", style="red")
        if row.status == "retrying":
            text.append(f" (attempt {row.attempt}; retrying)", style="yellow")
        if error.source_line:
            text.append("\n    at: ", style="grey50")
            text.append(error.source_line.strip())
        if row.notebook:
            text.append("\n    executed notebook: ", style="grey50")
            text.append(self._path(row.notebook), style="underline")
        return text

    def _path(self, rel: str) -> str:
        """A path of the pipeline folder as the user can open it from where nbflow was started."""
        full = os.path.join(self.root, rel)
        try:
            here = os.path.relpath(full)
        except ValueError:
            return full
        return full if here.startswith("..") else here

    def _summary(self) -> Text:
        result = self.result
        if result is None:
            return Text("")
        counts = result.counts()
        order = ("succeeded", "skipped", "failed", "not_run", "cancelled", "pending", "running")
        parts = ", ".join(f"{counts[s]} {STYLES[s][1]}" for s in order if s in counts)
        icon, _, style = {"succeeded": STYLES["succeeded"], "cancelled": STYLES["cancelled"]}.get(
            result.status.value, STYLES["failed"])
        text = Text.assemble((f"{icon} run {result.run_id} {result.status.value}", style),
                             f" in {_seconds(result.duration_s)}: {parts}")
        if any(r.notebook for r in self.rows.values()):
            text.append(f"\n  executed notebooks: {self._path(f'_nbflow/runs/{result.run_id}')}/", style="grey50")
        return text


class _StderrAboveLive:
    """Routes file descriptor 2 through a pipe; each line is printed above the live table.

    After `restore`, fd 2 is the terminal again and lines still coming from
    processes that inherited the pipe (kernels shutting down) are passed on
    to it unchanged, so no writer ever blocks or gets SIGPIPE.
    """

    def __init__(self, console: Console):
        self.console = console
        sys.stderr.flush()
        self.terminal = os.dup(2)
        read, write = os.pipe()
        os.dup2(write, 2)
        os.close(write)
        self.above_live = True
        threading.Thread(target=self._pump, args=(read,), name="nbflow-stderr", daemon=True).start()

    def _pump(self, read: int) -> None:
        with os.fdopen(read, "rb", buffering=0) as pipe:
            for line in iter(pipe.readline, b""):
                if self.above_live:
                    self.console.print(Text(line.decode(errors="replace").rstrip("\n"), style="grey50"))
                else:
                    os.write(self.terminal, line)

    def restore(self) -> None:
        sys.stderr.flush()
        self.above_live = False
        os.dup2(self.terminal, 2)


def _is_terminal(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False


def _bar_segments(done: int, total: int, style: str) -> list[tuple[str, str]]:
    filled = round(_BAR_WIDTH * done / total) if total else 0
    return [("━" * filled, style), ("━" * (_BAR_WIDTH - filled), "grey23")]


def _seconds(s: float) -> str:
    if s < 60:
        return f"{s:.1f}s"
    m, sec = divmod(int(round(s)), 60)
    return f"{m}m{sec:02d}s" if m < 60 else f"{m // 60}h{m % 60:02d}m"


__all__ = ["TerminalProgress"]
