"""Live progress of a run in a terminal, drawn with rich.

Owns: the live table (one line per step: state, a bar through its cells,
elapsed time, attempts, and why it runs or why it failed), under it the
cell each running step is in with the last lines it printed, the failure
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
from pathlib import Path

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from ..events import (CellOutput, Event, RunFinished, RunStarted, StepStatus, WatchCycleFinished, WatchCycleStarted,
                      WatchStopped)
from ..layout import StateLayout
from .view import STATE_STYLES, RunView, StepView, cycle_cause, cycle_outcome, format_duration

_BAR_WIDTH = 16
_EAGER_ROWS = 30  # a table up to this long is redrawn on every event
_BAR_STYLES = {StepStatus.FAILED: "red", StepStatus.CANCELLED: "dark_orange"}
_LIVE_STEPS = 3  # running steps whose cell and last printed lines show under the table
_LIVE_OUTPUT_LINES = 3


class TerminalProgress:
    """A listener that shows a run live in the terminal; leaves the final table and a summary on screen."""

    def __init__(self, console: Console | None = None, *, refresh_per_second: float = 8, hide_skipped: bool = False):
        """`hide_skipped`: leave fresh steps out of the table (a watch's cycle shows what reran; the summary
        line counts them)."""
        self.console = console or Console()
        self.refresh_per_second = refresh_per_second
        self.hide_skipped = hide_skipped
        self.view = RunView()
        self._live: Live | None = None
        self._lock = threading.Lock()
        # Kernels write to the terminal directly (warnings, crash reports): on our own terminal their
        # lines are printed above the live table instead of tearing it.
        self._reroute_stderr = console is None and _is_terminal(1) and _is_terminal(2)
        self._stderr: _StderrAboveLive | None = None
        self._drawn_at = 0.0

    @property
    def rows(self) -> dict[str, StepView]:
        return self.view.steps

    # -- events ---------------------------------------------------------------------------
    def __call__(self, event: Event) -> None:
        with self._lock:
            if isinstance(event, RunStarted):
                self.view = RunView()
            self.view.apply(event)
        if isinstance(event, RunStarted):
            self._start()
        elif isinstance(event, RunFinished):
            self._stop()
            self.console.print(self._summary(), soft_wrap=True)  # paths stay whole, easy to copy
        elif self._live is not None and not isinstance(event, CellOutput):  # printed text: the next refresh
            # Drawn at once for a small run; a large one (300 steps: a table of 300 rows per event) is redrawn
            # at most refresh_per_second times, by this call or by the Live's own refresh thread.
            now = time.monotonic()
            if len(self.rows) <= _EAGER_ROWS or now - self._drawn_at >= 1 / self.refresh_per_second:
                self._drawn_at = now
                self._live.refresh()

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
            shown, hidden = self._visible_rows()
            for row in shown:
                table.add_row(*self._cells(row, now))
            if hidden:
                table.add_row("", Text(f"… {hidden}", style="grey50"), "", "", "", "", "")
            failures = [self._failure(r) for r in self.rows.values() if r.error is not None
                        and (r.status == StepStatus.FAILED or r.retrying)]
            live = self._running_now() if self._live is not None and self.view.result is None else []
            return Group(table, *live, *failures) if failures or live else table

    def _running_now(self) -> list[RenderableType]:
        """Under the table, for the first few running steps: the cell it is in and the last lines it printed."""
        shown: list[RenderableType] = []
        for row in [r for r in self.rows.values() if r.status == StepStatus.RUNNING and not r.retrying
                    and (r.source_line or r.live_output)][:_LIVE_STEPS]:
            text = Text(no_wrap=True, overflow="ellipsis")
            text.append(f"▶ {row.name}", style="bold dodger_blue2")
            if row.at:
                text.append(f" {row.at}", style="grey50")
            if row.source_line:
                text.append(f": {row.source_line}")
            for stream, line in row.live_output[-_LIVE_OUTPUT_LINES:]:
                text.append(f"\n    {line}", style="red" if stream == "stderr" else "grey50")
            shown.append(text)
        return shown

    def _visible_rows(self) -> tuple[list[StepView], str]:
        """While live, as many rows as the terminal shows: the steps running or failed first, then those next
        in the plan; the rest are counted ('… 250 more: 240 skipped, 10 pending'). The final table has them all."""
        rows = [r for r in self.rows.values() if not (self.hide_skipped and r.status == StepStatus.SKIPPED)]
        room = self.console.size.height - 6
        if self._live is None or self.view.result is not None or len(rows) <= max(room, _EAGER_ROWS):
            return rows, ""
        room = max(room, 5)
        wanted = {r.name for r in rows if r.status in (StepStatus.RUNNING, StepStatus.FAILED) or r.retrying}
        for r in rows:
            if len(wanted) >= room:
                break
            if r.status == StepStatus.PENDING:
                wanted.add(r.name)
        shown = [r for r in rows if r.name in wanted][:room]
        left: dict[str, int] = {}
        for r in rows:
            if r.name not in wanted:
                left[r.style.word] = left.get(r.style.word, 0) + 1
        return shown, f"{len(rows) - len(shown)} more: " + ", ".join(f"{n} {word}" for word, n in left.items())

    def _title(self) -> str:
        return f"nbflow run {self.view.run_id}  ({self.view.done}/{len(self.rows)} steps done)"

    def _cells(self, row: StepView, now: float) -> list[RenderableType]:
        style = row.style
        live = self._live is not None and self.view.result is None
        running = row.status == StepStatus.RUNNING and not row.retrying
        mark: RenderableType = Spinner("dots", style=style.rich) if running and live else Text(style.icon, style.rich)
        if row.cells_total and row.started:
            bar_style = "yellow" if row.retrying else _BAR_STYLES.get(row.status, "green")
            bar: RenderableType = Text.assemble(*_bar_segments(row.cells_done, row.cells_total, bar_style),
                                                f" {row.cells}")
        else:
            bar = Text("")
        note = row.note
        failed = row.status == StepStatus.FAILED
        if failed and row.error is not None:
            note = row.error.summary()
        return [mark, Text(row.name), Text(style.word, style.rich), bar, Text(format_duration(row.elapsed(now))),
                Text(str(row.attempt) if row.attempt > 1 else ""), Text(note, style="red" if failed else "grey50")]

    def _failure(self, row: StepView) -> RenderableType:
        error = row.error
        assert error is not None
        text = Text()
        text.append(f"✖ {row.name}", style="bold red")
        text.append(f": {error.summary()}", style="red")
        if row.retrying:
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
        full = os.path.join(self.view.root, rel)
        try:
            here = os.path.relpath(full)
        except ValueError:
            return full
        return full if here.startswith("..") else here

    def _summary(self) -> Text:
        result = self.view.result
        if result is None:
            return Text("")
        counts = self.view.counts()
        parts = ", ".join(f"{n} {STATE_STYLES[s].word}" for s, n in counts.items())
        style = STATE_STYLES[StepStatus(result.status.value)] if result.status.value in ("succeeded", "cancelled") \
            else STATE_STYLES[StepStatus.FAILED]
        text = Text.assemble((f"{style.icon} run {result.run_id} {result.status.value}", style.rich),
                             f" in {format_duration(result.duration_s)}: {parts}")
        if any(r.notebook for r in self.rows.values()):
            run_dir = StateLayout(Path(self.view.root)).run_dir(result.run_id)
            text.append(f"\n  executed notebooks: {self._path(str(run_dir))}/", style="grey50")
        return text


class WatchProgress:
    """Watch mode in a terminal: a line per cycle (what changed, what reran), and the steps of each cycle that
    runs something live, as for a run (fresh steps left out)."""

    def __init__(self, console: Console | None = None):
        self.console = console or Console()
        self._run: TerminalProgress | None = None

    def __call__(self, event: Event) -> None:
        if isinstance(event, WatchCycleStarted):
            self.console.print(Text.assemble((f"{_clock(event.started_at)} cycle {event.number}", "bold"),
                                             f": {cycle_cause(event.changed)}"), soft_wrap=True)
            self._run = None
        elif isinstance(event, WatchCycleFinished):
            self._run = None
            text, style = cycle_outcome(event)
            look = style.rich if style is not None else ("red" if event.error else "grey50")
            self.console.print(Text.assemble((f"{_clock(time.time())} cycle {event.number}", "bold"), ": ",
                                             (text, look)), soft_wrap=True)
            self.console.print(Text(f"watching {event.watching} files and folders for changes (Ctrl-C stops)",
                                    style="grey50"))
        elif isinstance(event, WatchStopped):
            self.console.print(Text(f"watch stopped after {event.cycles} cycle(s)"
                                    + (f": {event.error}" if event.error else ""), style="grey50"))
        elif isinstance(event, RunStarted):
            # a cycle where every step is fresh gets its line only, not an empty table
            self._run = TerminalProgress(self.console, hide_skipped=True) \
                if any(p.action == "run" for p in event.plan) else None
            if self._run is not None:
                self._run(event)
        elif self._run is not None:
            self._run(event)


def _clock(at: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(at))


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


__all__ = ["TerminalProgress", "WatchProgress"]
