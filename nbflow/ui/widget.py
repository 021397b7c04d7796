"""The live status widget shown when `nbflow.run` is called inside Jupyter.

Owns: presenting a run's events with ipywidgets (one row per step, the run's
totals, the graph coloured by state, a Cancel button), the timer thread that
keeps elapsed times moving while steps run, and the static HTML that stays in
a saved notebook for viewers without widget state (GitHub, nbviewer). It is a
listener: it reads events and calls nothing on the Runner but `cancel()`.
ipywidgets is imported here and nowhere else in nbflow.

Widget values are set from the Runner's thread and from the timer thread:
ipywidgets sends each change as a comm message on IOPub, which works from any
thread, so the frontend updates while the cell is busy. Clicks, though, arrive
on the shell channel, which the kernel reads only between cells. Whoever
starts the run says whether a click can reach the kernel while it goes on
(`attach(runner, can_cancel=...)`): yes for a background run, and for a
blocking run that `nbflow.run` waits for while processing UI events
(jupyter-ui-poll); no for a blocking run on the cell's own thread, where the
way to stop it is the kernel's interrupt (the Runner turns KeyboardInterrupt
into a clean cancel), and the widget says so.
"""

from __future__ import annotations

import html
import os
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ipywidgets as w

from ..events import Event, RunFinished, RunResult, RunStarted, RunStatus, StepFailed, StepStarted, StepStatus
from .view import RUN_STYLES, STATE_STYLES, RunView, StateStyle, StepView, format_duration

if TYPE_CHECKING:
    from ..execute import Runner
    from ..graph import Graph
    from ..plan import Plan

TICK_S = 0.5  # how often elapsed times move while steps run

OUTLINED = {"pending": "solid", "not run": "dashed"}  # label -> border style
BAR_STYLES = {StepStatus.SUCCEEDED: "success", StepStatus.FAILED: "danger", StepStatus.CANCELLED: "warning"}

# Jupyter's theme variables, with fallbacks for frontends that lack them: readable in light and dark themes
MUTED = "var(--jp-ui-font-color2, #616161)"
MONO = "var(--jp-code-font-family, monospace)"
ERROR_RED = "var(--jp-error-color1, #c62828)"

# column widths, shared by the column titles, the rows and the static table
WIDTHS = {"state": "9.5em", "progress": "150px", "cells": "4.5em", "elapsed": "6em", "attempts": "5.5em",
          "notebook": "13em"}


@dataclass
class RowWidgets:
    name: Any
    state: Any
    progress: Any
    cells: Any
    elapsed: Any
    attempts: Any
    notebook: Any
    note: Any
    error: Any
    box: Any = None


class RunWidget:
    """The live view of one run: `show()` it, pass it to the Runner as a listener, `attach(runner)`."""

    def __init__(self, graph: "Graph", plan: "Plan"):
        self.graph = graph
        self.root = Path(graph.root)
        self.cwd = Path.cwd()  # the notebook calling nbflow.run: links are relative to it
        self.view = RunView(plan.steps, {p.name: graph.config.for_step(p.name).retries + 1 for p in plan.steps})
        self.runner: "Runner | None" = None
        self.blocking = False  # the run holds the kernel: clicks wait until the cell ends
        self._can_cancel: bool | None = None  # set by attach(); None: guessed from the thread at RunStarted
        self.cancel_requested = False
        self._lock = threading.RLock()
        self._ticking = threading.Event()
        self._stop_ticking = threading.Event()  # wakes the timer at once when the run ends
        self._timer: threading.Thread | None = None
        self._handle: Any = None
        self._build()
        self._refresh_all()

    @property
    def rows(self) -> dict[str, StepView]:
        return self.view.steps

    @property
    def result(self) -> RunResult | None:
        return self.view.result

    @property
    def run_id(self) -> str:
        return self.view.run_id

    # -- public ----------------------------------------------------------------------
    def attach(self, runner: "Runner", can_cancel: bool | None = None) -> None:
        """Let the Cancel button stop `runner`.

        `can_cancel`: whether a click reaches the kernel while the run goes on
        (False: the run holds the kernel, so the button points to the kernel's
        interrupt instead). None guesses from the thread the run starts on: the
        main thread holds the kernel.
        """
        with self._lock:
            self.runner = runner
            self._can_cancel = can_cancel
            if can_cancel is not None:
                self.blocking = not can_cancel
            self.cancel_button.disabled = False
            self._refresh_header()

    def show(self) -> None:
        """Display the widget, with a text/html twin that is replaced by the final table when the run ends."""
        from IPython.display import display  # noqa: PLC0415

        self._handle = display(self._mimebundle(), raw=True, display_id=True)

    def cancel(self) -> None:
        """What the Cancel button does."""
        with self._lock:
            if self.runner is None or self.result is not None or self.cancel_requested:
                return
            self.cancel_requested = True
            self.cancel_button.disabled = True
            self.cancel_button.description = "Cancelling…"
        self.runner.cancel()

    def __call__(self, event: Event) -> None:
        with self._lock:
            self._handle_event(event)
        if isinstance(event, RunFinished) and self._timer is not None \
                and self._timer is not threading.current_thread():
            self._timer.join(5)  # it stops at once: nothing of the run outlives it

    # -- events ----------------------------------------------------------------------
    def _handle_event(self, event: Event) -> None:
        before = {name: row.status for name, row in self.rows.items()}
        row = self.view.apply(event)
        if isinstance(event, RunStarted):
            if self._can_cancel is None:
                self.blocking = threading.current_thread() is threading.main_thread()
            self._refresh_header()
            self._start_timer()
            return
        if isinstance(event, RunFinished):
            self._finish()
            return
        if row is None:
            return
        now = time.time()
        self._refresh_row(row, now)
        if row.status != before.get(row.name) or isinstance(event, (StepStarted, StepFailed)):
            self._refresh_header()
            self._refresh_graph()
        else:
            self._set(self.totals, "value", self._totals_html(now))  # the run's elapsed time with the row's

    def _finish(self) -> None:
        self._ticking.clear()
        self._stop_ticking.set()
        self.cancel_button.layout.display = "none"
        self._refresh_all()
        if self._handle is not None:
            self._handle.update(self._mimebundle(), raw=True)

    # -- the timer -------------------------------------------------------------------
    def _start_timer(self) -> None:
        if self._timer is not None:
            return
        self._ticking.set()
        self._timer = threading.Thread(target=self._tick_until_finished, name="nbflow-widget-timer", daemon=True)
        self._timer.start()

    def _tick_until_finished(self) -> None:
        while self._ticking.is_set() and not self._stop_ticking.wait(TICK_S):
            with self._lock:
                if not self._ticking.is_set():
                    return
                now = time.time()
                for row in self.rows.values():
                    if row.status == StepStatus.RUNNING and row.duration_s is None:
                        self._set(self.row_widgets[row.name].elapsed, "value",
                                  _cell(format_duration(row.elapsed(now))))
                self._set(self.totals, "value", self._totals_html(now))

    # -- building and refreshing the widgets -----------------------------------------
    def _build(self) -> None:
        name_width = f"{max([len(n) for n in self.rows] + [4]) + 3}ch"

        def fixed(width: str) -> Any:
            return w.Layout(width=width, min_width=width, flex="0 0 auto")

        self.title = w.HTML(layout=w.Layout(flex="1 1 auto"))
        self.totals = w.HTML(layout=w.Layout(flex="0 1 auto", margin="0 1em"))
        self.cancel_button = w.Button(description="Cancel", icon="stop", disabled=True,
                                      tooltip="Stop the run: running kernels are stopped, notebooks saved",
                                      layout=w.Layout(width="auto", min_width="8em", flex="0 0 auto"))
        self.cancel_button.on_click(lambda _button: self.cancel())
        header = w.HBox([self.title, self.totals, self.cancel_button],
                        layout=w.Layout(align_items="center", justify_content="space-between",
                                        border_bottom="1px solid var(--jp-border-color2, #e0e0e0)",
                                        padding="0 0 4px 0"))
        header.add_class("nbflow-header")
        titles = [("step", name_width), ("state", WIDTHS["state"]),
                  ("progress", f"calc({WIDTHS['progress']} + 10px)"), ("cells", WIDTHS["cells"]),
                  ("elapsed", WIDTHS["elapsed"]), ("attempts", WIDTHS["attempts"]),
                  ("executed notebook", WIDTHS["notebook"]), ("", "auto")]
        column_titles = w.HBox([w.HTML(f'<span style="color:{MUTED};font-size:0.85em">{t}</span>',
                                       layout=fixed(width) if width != "auto" else w.Layout(flex="1 1 auto"))
                                for t, width in titles])
        self.row_widgets: dict[str, RowWidgets] = {}  # the widgets of each step's row
        rows = [header, column_titles]
        for name in self.rows:
            parts = RowWidgets(
                name=w.HTML(f'<span data-step="{html.escape(name)}" title="{html.escape(name)}" '
                            f'style="font-family:{MONO};font-weight:600">{html.escape(name)}</span>',
                            layout=fixed(name_width)),
                state=w.HTML(layout=fixed(WIDTHS["state"])),
                progress=w.IntProgress(value=0, min=0, max=1, layout=w.Layout(
                    width=WIDTHS["progress"], min_width=WIDTHS["progress"], flex="0 0 auto", margin="0 10px 0 0")),
                cells=w.HTML(layout=fixed(WIDTHS["cells"])),
                elapsed=w.HTML(layout=fixed(WIDTHS["elapsed"])),
                attempts=w.HTML(layout=fixed(WIDTHS["attempts"])),
                notebook=w.HTML(layout=fixed(WIDTHS["notebook"])),
                note=w.HTML(layout=w.Layout(flex="1 1 auto", overflow="hidden")),
                error=w.HTML(layout=w.Layout(display="none", margin=f"0 0 6px {name_width}")),
            )
            parts.box = w.VBox([w.HBox([parts.name, parts.state, parts.progress, parts.cells, parts.elapsed,
                                        parts.attempts, parts.notebook, parts.note],
                                       layout=w.Layout(align_items="center")), parts.error])
            parts.box.add_class("nbflow-step")
            for column in ("state", "progress", "cells", "elapsed", "attempts", "notebook", "note"):
                getattr(parts, column).add_class(f"nbflow-{column}")
            self.row_widgets[name] = parts
            rows.append(parts.box)
        self.graph_view = w.HTML(layout=w.Layout(margin="8px 0 0 0", overflow="auto"))
        self.graph_view.add_class("nbflow-graph")
        rows.append(self.graph_view)
        self.box = w.VBox(rows, layout=w.Layout(padding="4px 0", max_width="100%"))
        self.box.add_class("nbflow-run")

    def _mimebundle(self) -> dict[str, Any]:
        bundle = dict(self.box._repr_mimebundle_())
        bundle["text/html"] = self._static_html(time.time())
        bundle["text/plain"] = self._static_text()
        return bundle

    @staticmethod
    def _set(widget: Any, name: str, value: Any) -> None:
        """Set a trait only when it changes: each change is a comm message."""
        if getattr(widget, name) != value:
            setattr(widget, name, value)

    def _refresh_all(self) -> None:
        now = time.time()
        self._refresh_header()
        for row in self.rows.values():
            self._refresh_row(row, now)
        self._refresh_graph()

    def _refresh_header(self) -> None:
        now = time.time()
        status = _pill(RUN_STYLES[self.view.status] if self.view.started_at else STATE_STYLES[StepStatus.PENDING])
        where = os.path.relpath(self.root, self.cwd) if _is_below(self.root, self.cwd) else str(self.root)
        run = f' · run <span style="font-family:{MONO}">{html.escape(self.run_id)}</span>' if self.run_id else ""
        self._set(self.title, "value",
                  f'<b>nbflow</b> <span style="font-family:{MONO}">{html.escape(where)}</span>'
                  f'<span style="color:{MUTED}">{run}</span> &nbsp;{status}')
        self._set(self.totals, "value", self._totals_html(now))
        if self.result is None and self.runner is not None and self.blocking \
                and self.cancel_button.description == "Cancel":
            self.cancel_button.description = "Interrupt the kernel (■) to cancel"
            self.cancel_button.tooltip = ("This cell holds the kernel, so it reads the button only after the run: "
                                          "interrupt the kernel to cancel cleanly, or run with background=True")
            self.cancel_button.disabled = True

    def _totals_html(self, now: float) -> str:
        parts = [f'<span style="color:{STATE_STYLES[s].colour};font-weight:600">{n}</span> {STATE_STYLES[s].word}'
                 for s, n in self.view.counts().items()]
        elapsed = self.view.elapsed(now)
        since = f' <span style="color:{MUTED}">· {format_duration(elapsed)}</span>' if elapsed is not None else ""
        return " · ".join(parts) + since

    def _refresh_row(self, row: StepView, now: float) -> None:
        parts = self.row_widgets[row.name]
        self._set(parts.state, "value", self._state_html(row))
        bar = parts.progress
        ran = row.started
        for column in (bar, parts.cells, parts.elapsed, parts.attempts, parts.notebook):
            # a step that has not started has nothing in these: its note ("fresh", why not run) follows the state
            self._set(column.layout, "display", "" if ran else "none")
        self._set(bar, "max", max(row.cells_total, 1))
        self._set(bar, "value", bar.max if row.status == StepStatus.SUCCEEDED else min(row.cells_done, bar.max))
        self._set(bar, "bar_style", "danger" if row.retrying else BAR_STYLES.get(row.status, ""))
        self._set(parts.cells, "value", _cell(row.cells))
        self._set(parts.elapsed, "value", _cell(format_duration(row.elapsed(now))))
        attempts = (f"{row.attempt} of {row.max_attempts}" if row.max_attempts > 1 else str(row.attempt)) if ran else ""
        self._set(parts.attempts, "value", _cell(attempts))
        self._set(parts.notebook, "value", self._link_html(row))
        note = html.escape(row.note)
        self._set(parts.note, "value",
                  f'<span style="color:{MUTED};white-space:nowrap" title="{note}">{note}</span>' if note else "")
        self._set(parts.error, "value", self._error_html(row) if row.error else "")
        self._set(parts.error.layout, "display", "" if row.error else "none")

    def _state_html(self, row: StepView) -> str:
        return _pill(row.style, title="; ".join(row.reasons))

    def href(self, notebook: str) -> str:
        """A link to an executed notebook, relative to the calling notebook's folder (as Jupyter serves it)."""
        path = Path(os.path.relpath(self.root / notebook, self.cwd)).as_posix()
        return urllib.parse.quote(path)

    def _link_html(self, row: StepView) -> str:
        if not row.notebook:
            return ""
        return (f'<a href="{html.escape(self.href(row.notebook))}" target="_blank" rel="noopener" '
                f'title="open {html.escape(row.notebook)} in Jupyter" '
                f'style="color:var(--jp-content-link-color, #1976d2);text-decoration:underline;'
                f'font-family:{MONO}">{html.escape(Path(row.notebook).name)}</a>')

    def _error_html(self, row: StepView) -> str:
        error = row.error
        assert error is not None
        what = html.escape(f"{error.ename}: {error.evalue}" if error.evalue else error.ename)
        where = ""
        if error.cell:
            line = (f': <code style="font-family:{MONO}">{html.escape(error.source_line)}</code>'
                    if error.source_line else "")
            where = f'<div style="margin-top:2px">in cell {error.cell}{line}</div>'
        return (f'<div class="nbflow-error" style="border-left:4px solid {STATE_STYLES[StepStatus.FAILED].colour};'
                f'background:rgba(198,40,40,0.08);padding:4px 10px;line-height:1.5;white-space:pre-wrap;'
                f'text-align:left">'
                f'<div style="color:{ERROR_RED};font-family:{MONO};font-weight:600">{what}</div>{where}</div>')

    def _refresh_graph(self) -> None:
        self._set(self.graph_view, "value", self._graph_html())

    def _graph_html(self) -> str:
        from . import plot  # noqa: PLC0415

        links = {r.name: self.href(r.notebook) for r in self.rows.values() if r.notebook}
        return plot.html(self.graph, self._snapshot(), links)

    def _snapshot(self) -> RunResult:
        return self.view.snapshot()

    # -- the static twin ---------------------------------------------------------------
    def _static_html(self, now: float) -> str:
        cell_style = "padding:2px 10px;text-align:left;vertical-align:top;white-space:nowrap"
        head = "".join(f'<th style="{cell_style};color:{MUTED};font-weight:normal">{t}</th>'
                       for t in ("step", "state", "cells", "elapsed", "attempts", "executed notebook", ""))
        body = []
        for row in self.rows.values():
            cells = [f'<span style="font-family:{MONO};font-weight:600">{html.escape(row.name)}</span>',
                     self._state_html(row), row.cells, format_duration(row.elapsed(now)),
                     str(row.attempt) if row.started else "", self._link_html(row),
                     html.escape(row.note)]
            body.append("<tr>" + "".join(f'<td style="{cell_style}">{c}</td>' for c in cells) + "</tr>")
            if row.error:
                body.append(f'<tr><td></td><td colspan="6" style="padding:0 10px 6px;text-align:left">'
                            f"{self._error_html(row)}</td></tr>")
        title = (f'<div style="margin-bottom:4px"><b>nbflow</b> run '
                 f'<span style="font-family:{MONO}">{html.escape(self.run_id or "")}</span> &nbsp;'
                 f"{_pill(RUN_STYLES[self.view.status]) if self.result else ''} &nbsp;{self._totals_html(now)}</div>")
        return (f'<div class="nbflow-run-static">{title}<table style="border-collapse:collapse">'
                f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>")

    def _static_text(self) -> str:
        status = self.view.status.value if self.result else "running"
        lines = [f"nbflow run {self.run_id or ''}: {status}"]
        for row in self.rows.values():
            error = f"  {row.error.summary()}" if row.error else ""
            elapsed = format_duration(row.elapsed(time.time()))
            lines.append(f"  {row.name:<20} {row.style.word:<10} {elapsed:>8}{error}")
        return "\n".join(lines)


def _pill(style: StateStyle, title: str = "") -> str:
    icon, label, colour = style.icon, style.word, style.colour
    tip = f' title="{html.escape(title)}"' if title else ""
    if label in OUTLINED:  # nothing happened (yet): an outline, not a filled badge
        look = f"border:1px {OUTLINED[label]} {colour};color:{colour};"
    else:
        look = f"border:1px solid {colour};background:{colour};color:#fff;"
    return (f'<span{tip} style="display:inline-block;min-width:8.4em;box-sizing:border-box;padding:0 8px;'
            f'border-radius:10px;{look}font-weight:600;font-size:0.9em;line-height:1.6;white-space:nowrap">'
            f"{icon}&nbsp;{label}</span>")


def _cell(text: str) -> str:
    return f'<span style="font-variant-numeric:tabular-nums">{html.escape(text)}</span>' if text else ""


def _is_below(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True
