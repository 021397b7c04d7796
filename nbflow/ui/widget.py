"""The live status widget shown when `nbflow.run` is called inside Jupyter.

Owns: presenting a run's events in the notebook (one row per step, grid
instances grouped, the run's totals, the graph coloured by state, a Cancel
button), the timer thread that keeps elapsed times moving and watches for a
cancel request, and the static HTML that replaces the widget when the run
ends, so that a saved notebook shows the run's final state everywhere (Lab,
Notebook 7, VS Code, nbconvert, GitHub) with or without a kernel, never
"model not found". It is a listener: it reads events, the RunView holds the
picture, and the only thing it calls is the `cancel` it was given. anywidget
and ipywidgets are imported here and nowhere else in nbflow.

The HTML is made here, in Python, once, for the live widget and the static
copy alike; the front end (widget.js) only places it and adds what needs a
browser: open/closed sections kept across updates, links that open notebooks
inside the running Jupyter, and the Cancel button.

Cancel. Widget values are sent from the Runner's and the timer's threads as
comm messages on IOPub, which works while a cell runs. Clicks come back on the
shell channel, which the kernel reads only between cells (ipykernel 7 even
with jupyter-ui-poll). So the button does not rely on it alone: it (1) sends
the click as a comm message, which arrives when the kernel is free (a
background run), and (2) asks the Jupyter server to write a cancel-request
file into the pipeline's `_nbflow/` (contents API), which the timer thread
here watches whatever the kernel's main thread does; (3) when that file
cannot be written (the pipeline is outside the server's root) and the run
holds the kernel, it interrupts the kernel (REST API), which the Runner turns
into a clean cancel. Without a Jupyter server (VS Code) only (1) works: the
button says so before it is pressed.

Rerun failed. A run that ends with failed steps offers the call that reruns
them and what depends on them (`nbflow.run(pipeline, [steps], parameters=...)`,
copyable) and, where it was shown in a live kernel, a button that makes it.
The run's final static HTML carries the button (hidden); the run's model stays
open for it and widget.js, which knows the model, shows the button and sends
the click. The kernel then runs that call in the background, and its new
widget takes the place of the old one in the same output (a click's output
has no cell to go to; a display's id does), below the failed run's record, so
the saved notebook shows both. A page reloaded since, or a viewer without
the kernel, keeps the call to copy.
"""

from __future__ import annotations

import html
import os
import re
import secrets
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import contextvars

import anywidget
import traitlets

from ..events import MASK, Event, RunFinished, RunResult, RunStarted, StepFailed, StepStarted, StepStatus
from .view import RUN_STYLES, STATE_STYLES, RunView, StateStyle, StepView, format_duration

if TYPE_CHECKING:
    from ..graph import Graph
    from ..plan import Plan

TICK_S = 0.25  # how often elapsed times move and the cancel request is looked for
MIN_PUSH_S = 0.15  # cell-by-cell progress is sent at most this often (a 50-step run stays light)
HERE = Path(__file__).parent
CSS = (HERE / "widget.css").read_text(encoding="utf-8")

OUTLINED = {"pending": "solid", "not run": "dashed", "not started": "dashed"}  # label -> border style
BAR_COLOURS = {StepStatus.SUCCEEDED: STATE_STYLES[StepStatus.SUCCEEDED].colour,
               StepStatus.FAILED: STATE_STYLES[StepStatus.FAILED].colour,
               StepStatus.CANCELLED: STATE_STYLES[StepStatus.CANCELLED].colour,
               StepStatus.RUNNING: STATE_STYLES[StepStatus.RUNNING].colour}
# failures first in a group of grid instances, then what runs, then the rest
GROUP_ORDER = {StepStatus.FAILED: 0, StepStatus.RUNNING: 1, StepStatus.CANCELLED: 2, StepStatus.NOT_RUN: 3,
               StepStatus.PENDING: 4, StepStatus.SUCCEEDED: 5, StepStatus.SKIPPED: 6}
MANY_ROWS = 20  # more rows than this scroll inside the widget

# Set while "Rerun failed" makes its call: the output to show the rerun's widget in, and what it shows above it
_RERUN_INTO: contextvars.ContextVar[tuple[Any, str] | None] = contextvars.ContextVar("nbflow_rerun_into", default=None)

MUTED = "var(--jp-ui-font-color2, #616161)"
MONO = "var(--jp-code-font-family, monospace)"
ERROR_RED = "var(--jp-error-color1, #c62828)"


class RunModel(anywidget.AnyWidget):
    """The front end's half: the HTML to show, the graph, and what the Cancel button can do."""

    _esm = HERE / "widget.js"
    _css = HERE / "widget.css"
    body = traitlets.Unicode("").tag(sync=True)
    graph = traitlets.Unicode("").tag(sync=True)
    # holds_kernel, background, kernel_id, cancel_path (relative to the notebook's folder), attached,
    # cancelling, finished
    controls = traitlets.Dict({}).tag(sync=True)


class RunWidget:
    """The live view of one run: `show()` it, pass it to the Runner as a listener, `attach(cancel, ...)`."""

    def __init__(self, graph: "Graph", plan: "Plan", model: Any = None, options: "dict[str, Any] | None" = None):
        """`model`: where to put the HTML instead of a RunModel of its own (a watch's widget shows each cycle's
        run inside its own frame). `options`: the run's other `nbflow.run` options (grid=, executor=,
        dask_address=, jobs=, fail_fast=), which a rerun of its failed steps gets too."""
        self.graph = graph
        self.root = Path(graph.root)
        self.notebook_dir = _notebook_dir()  # links are relative to the notebook calling nbflow.run
        self.view = RunView(plan.steps, {p.name: graph.config.for_step(p.name).retries + 1 for p in plan.steps},
                            graph=graph, parameters=plan.parameters)
        self.overrides = dict(plan.overrides)  # the parameters the run was given: a rerun gets them too
        self.options = dict(options or {})
        self.earlier = ""  # the record of the run(s) this one reruns, shown above it
        self.rerun_token = secrets.token_hex(8)  # names this run's Rerun button to the front end
        self.rerun_started = False
        self._cancel: Callable[[], None] | None = None
        self.holds_kernel = False  # the run holds the kernel's main thread: clicks wait until the cell ends
        self.background = False
        self.cancel_requested = False
        self.cancel_file = Path(graph.state_dir) / f"cancel-{secrets.token_hex(8)}"
        self._lock = threading.RLock()
        self._ticking = threading.Event()
        self._stop_ticking = threading.Event()  # wakes the timer at once when the run ends
        self._timer: threading.Thread | None = None
        self._handle: Any = None
        self._pushed_at = 0.0
        self._dirty = False
        self.model = model if model is not None else RunModel(controls=self._controls())
        self.model.on_msg(self._on_message)
        self._push(graph=True)

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
    def attach(self, cancel: Callable[[], None], *, holds_kernel: bool, background: bool = False) -> None:
        """Let the Cancel button call `cancel` (the Runner's).

        `holds_kernel`: the run goes on in the cell's own thread, so the kernel
        reads no click until it ends (the button then goes through the Jupyter
        server, or says to interrupt the kernel where there is none).
        `background`: the cell returned at once; the end of the run is announced.
        """
        with self._lock:
            self._cancel = cancel
            self.holds_kernel, self.background = holds_kernel, background
            self._set_controls()

    def show(self) -> None:
        """Display the widget, with a static twin; both are replaced by the final static HTML when the run ends."""
        from IPython.display import display  # noqa: PLC0415

        self._set_controls(kernel_id=_kernel_id())
        into = _RERUN_INTO.get()
        if into is not None:  # a rerun: in the output of the run it reruns, below that run's record
            self._handle, self.earlier = into
            self._handle.update(self._mimebundle(), raw=True)
            return
        self._handle = display(self._mimebundle(), raw=True, display_id=True)

    def cancel(self) -> None:
        """What the Cancel button does, by whichever way its click arrives."""
        with self._lock:
            if self._cancel is None or self.result is not None or self.cancel_requested:
                return
            self.cancel_requested = True
            self._set_controls()
        self._cancel()

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
            self._push(graph=True)
            self._start_timer()
            return
        if isinstance(event, RunFinished):
            self._finish()
            return
        if row is None:
            return
        changed = row.status != before.get(row.name) or isinstance(event, (StepStarted, StepFailed))
        self._push(graph=changed, now=changed)

    def _finish(self) -> None:
        self._ticking.clear()
        self._stop_ticking.set()
        if self.view.nothing_to_do:
            self.view.up_to_date_since = _newest_success(self.graph, list(self.rows))
        self._remove_cancel_file()
        self._set_controls()
        self._push(graph=True)
        if self._handle is not None:
            # the saved notebook keeps this: plain HTML, which every viewer shows, kernel or not
            self._handle.update(self._static_bundle(), raw=True)
            if not self.can_rerun:
                self.model.close()  # the front end's view is gone with the display it was in
            # else the model stays open for the Rerun button of the static HTML (widget.js sends its click)

    def _on_message(self, _model: Any, content: Any, _buffers: Any) -> None:
        if isinstance(content, dict) and content.get("cancel"):
            self.cancel()
        elif isinstance(content, dict) and content.get("rerun"):
            self.rerun()

    # -- rerun failed -----------------------------------------------------------------
    @property
    def can_rerun(self) -> bool:
        """The run ended with failures, in an output of a live kernel: its Rerun button can work."""
        return self.result is not None and self._handle is not None and bool(self.view.to_rerun())

    def rerun_call(self, masked: bool = True) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The `nbflow.run` call that reruns the failed steps and what depends on them, with this run's
        parameters and options (a grid, the executor): (args, kwargs). `masked`: as shown, secrets as ***;
        else as made."""
        args: tuple[Any, ...] = (self._pipeline_as_named() if masked else str(self.root), self.view.to_rerun())
        parameters = self.overrides
        if masked and parameters:
            from ..params import is_secret_parameter  # noqa: PLC0415

            secret = tuple(getattr(self.graph.config, "secrets", ()) or ())
            parameters = {key: MASK if is_secret_parameter(key, secret) else value
                          for key, value in parameters.items()}
        return args, ({"parameters": parameters} if parameters else {}) | self.options

    def rerun(self) -> None:
        """What the Rerun button does: that call, in the background, its widget in this run's output."""
        with self._lock:
            if self.rerun_started or not self.can_rerun:
                return
            self.rerun_started = True
        import nbflow  # noqa: PLC0415

        args, kwargs = self.rerun_call(masked=False)
        record = self.record_html()
        into = _RERUN_INTO.set((self._handle, record))
        try:
            nbflow.run(*args, **kwargs, background=True)
        except Exception as e:  # noqa: BLE001 - an invalid pipeline, a run in progress: said where the click was
            notice = (f'<div class="nbflow-notice" role="alert" style="border-color:{ERROR_RED}">the rerun could '
                      f"not start: {html.escape(str(e).strip())}</div>")
            self._handle.update({"text/html": f'<div class="nbflow-run-static"><style>{CSS}</style>{record}'
                                              f"{notice}</div>", "text/plain": self.static_text()}, raw=True)
        finally:
            _RERUN_INTO.reset(into)
            self.model.close()

    def record_html(self) -> str:
        """This run, ended, as it stays above its rerun: folded to its summary line, the earlier runs above it."""
        from . import plot  # noqa: PLC0415

        body = self.body_html(graph=plot.image(self.graph, self._statuses()), opened=False)
        return body.replace('data-key="', f'data-key="{html.escape(self.run_id)}/')

    # -- the timer -------------------------------------------------------------------
    def _start_timer(self) -> None:
        if self._timer is not None:
            return
        self._ticking.set()
        self._timer = threading.Thread(target=self._tick_until_finished, name="nbflow-widget-timer", daemon=True)
        self._timer.start()

    def _tick_until_finished(self) -> None:
        while self._ticking.is_set() and not self._stop_ticking.wait(TICK_S):
            if self.cancel_file.exists():  # written by the front end through the Jupyter server
                self._remove_cancel_file()
                self.cancel()
            with self._lock:
                if not self._ticking.is_set():
                    return
                running = any(r.status == StepStatus.RUNNING for r in self.rows.values())
                if running or self._dirty:
                    self._push(now=True)

    def _remove_cancel_file(self) -> None:
        try:
            self.cancel_file.unlink()
        except OSError:
            pass

    # -- what the front end gets -------------------------------------------------------
    def _controls(self, **extra: Any) -> dict[str, Any]:
        try:
            cancel_path = Path(os.path.relpath(self.cancel_file, self.notebook_dir)).as_posix()
        except ValueError:  # another drive
            cancel_path = ""
        # what is there already stays: the kernel's id, and the keys of a watch's widget that shares the model
        controls = dict(self.model.controls) if hasattr(self, "model") else {}
        controls.update(holds_kernel=self.holds_kernel, background=self.background, cancel_path=cancel_path,
                        rerun_token=self.rerun_token,
                        attached=self._cancel is not None, cancelling=self.cancel_requested,
                        finished=self.result is not None, **extra)
        return controls

    def _set_controls(self, **extra: Any) -> None:
        self.model.controls = self._controls(**extra)

    def _push(self, graph: bool = False, now: bool = True) -> None:
        """Send the body (and the graph when states changed); cell-by-cell updates at most every MIN_PUSH_S."""
        t = time.time()
        if graph:
            self._set(self.model, "graph", self._graph_html())
        if not now and t - self._pushed_at < MIN_PUSH_S:
            self._dirty = True
            return
        self._dirty = False
        self._pushed_at = t
        self._set(self.model, "body", self.body_html(t))

    @staticmethod
    def _set(widget: Any, name: str, value: Any) -> None:
        """Set a trait only when it changes: each change is a comm message."""
        if getattr(widget, name) != value:
            setattr(widget, name, value)

    def _mimebundle(self) -> dict[str, Any]:
        bundle: Any = self.model._repr_mimebundle_()
        data = dict(bundle[0] if isinstance(bundle, tuple) else bundle)
        data.update(self._static_bundle())
        return data

    def _static_bundle(self) -> dict[str, str]:
        return {"text/html": self.static_html(), "text/plain": self.static_text()}

    # -- the HTML, one for the live widget and the static copy -------------------------
    def body_html(self, now: float | None = None, graph: str | None = None, opened: bool | None = None) -> str:
        """The whole run as HTML: a one-line summary that opens onto the rows and the graph; the runs it
        reruns above it.

        `graph`: the graph's HTML to put in place; None leaves a slot for the front end to fill.
        `opened`: whether it starts open; by default unless every step was fresh.
        """
        now = now or time.time()
        view = self.view
        open_ = " open" if (not view.nothing_to_do if opened is None else opened) else ""
        longest = max([len(n) for n in self.rows] + [4])
        name_width = f"{min(longest, 28) + 1}ch"
        rows = self._rows_html(now)
        scroll = " nbflow-scroll" if len(self.rows) > MANY_ROWS else ""
        slot = graph if graph is not None else '<div class="nbflow-graph-slot"></div>'
        earlier = f'<div class="nbflow-earlier">{self.earlier}</div>' if self.earlier else ""
        return (f'{earlier}<details class="nbflow-run" data-key="run"{open_} style="--nbflow-name:{name_width}">'
                f"{self._header_html(now)}"
                f"{self._notice_html()}"
                f'<div class="nbflow-rows{scroll}">{rows}</div>'
                f"{self._rerun_html()}{slot}</details>")

    def _pipeline_as_named(self) -> str:
        """The pipeline folder as the calling notebook names it: relative when below it, else absolute."""
        if _is_below(self.root, self.notebook_dir):
            return Path(os.path.relpath(self.root, self.notebook_dir)).as_posix()
        return str(self.root)

    def _header_html(self, now: float) -> str:
        view = self.view
        status = _pill(RUN_STYLES[view.status] if view.started_at else STATE_STYLES[StepStatus.PENDING])
        where = self._pipeline_as_named()
        run = (f' <span class="nbflow-muted">run <code>{html.escape(self.run_id)}</code></span>'
               if self.run_id else "")
        return (f'<summary class="nbflow-header"><span class="nbflow-chevron" aria-hidden="true"></span>'
                f'<span class="nbflow-title"><b>nbflow</b> <code>{html.escape(where)}</code>{run}</span>'
                f'<span class="nbflow-runstate">{status}</span>'
                f'<span class="nbflow-totals">{self._totals_html(now)}</span>'
                f'<span class="nbflow-actions"></span></summary>')

    def _totals_html(self, now: float) -> str:
        view = self.view
        elapsed = view.elapsed(now)
        since = f' <span class="nbflow-muted">· {format_duration(elapsed)}</span>' if elapsed is not None else ""
        if view.nothing_to_do and view.result is not None:
            return f"{html.escape(view.summary())}{since}"
        parts = [f'<span style="color:{style.colour};font-weight:600">{n}</span> {style.word}'
                 for style, n in view.tallies()]
        return " · ".join(parts) + since

    def _notice_html(self) -> str:
        if not (self.background and self.result is not None):
            return ""
        at = time.strftime("%H:%M:%S", time.localtime(self.view.finished_at or time.time()))
        style = RUN_STYLES[self.view.status]
        return (f'<div class="nbflow-notice" role="status" style="border-color:{style.colour}">'
                f"{_pill(style)} the background run ended at {at}: {html.escape(self.view.summary())}</div>")

    def _rerun_html(self) -> str:
        names = self.view.to_rerun() if self.result is not None else []
        if not names:
            return ""
        args, kwargs = self.rerun_call()
        code = "nbflow.run(" + ", ".join([repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]) + ")"
        if self.rerun_started:
            return (f'<div class="nbflow-rerun">rerun below (the failed steps and what depends on them): '
                    f'<code class="nbflow-rerun-code">{html.escape(code)}</code></div>')
        # shown by widget.js where the kernel that ran this still holds the run's model; else hidden
        button = (f'<button type="button" class="nbflow-rerun-button jupyter-button" hidden style="display:none" '
                  f'data-nbflow-rerun="{self.rerun_token}" title="run this call in the kernel, in the background">'
                  f"↻ Rerun failed</button> " if self.can_rerun else "")
        return (f'<div class="nbflow-rerun">{button}rerun failed (the failed steps and what depends on them): '
                f'<code class="nbflow-rerun-code">{html.escape(code)}</code></div>')

    def _rows_html(self, now: float) -> str:
        groups = self.view.groups()
        grouped = {name for names in groups.values() for name in names}
        out = []
        done_groups: set[str] = set()
        for row in self.rows.values():
            if row.name not in grouped:
                out.append(self._row_html(row, now))
                continue
            base = row.group
            assert base is not None
            if base not in done_groups:
                done_groups.add(base)
                out.append(self._group_html(base, [self.rows[n] for n in groups[base]], now))
        return "".join(out)

    def _group_html(self, base: str, members: list[StepView], now: float) -> str:
        n = len(members)
        done = sum(r.status in (StepStatus.SUCCEEDED, StepStatus.SKIPPED, StepStatus.FAILED, StepStatus.NOT_RUN,
                                StepStatus.CANCELLED) for r in members)
        worst = min(members, key=lambda r: GROUP_ORDER[r.status])
        counts: dict[str, tuple[StateStyle, int]] = {}
        for r in members:
            counts[r.style.word] = (r.style, counts.get(r.style.word, (r.style, 0))[1] + 1)
        tally = " · ".join(f'<span style="color:{s.colour};font-weight:600">{k}</span> {s.word}'
                           for s, k in counts.values())
        ordered = sorted(members, key=lambda r: GROUP_ORDER[r.status])
        inner = "".join(self._row_html(r, now) for r in ordered)
        key = html.escape(f"group:{base}")
        return (f'<details class="nbflow-group" data-group="{html.escape(base)}" data-key="{key}">'
                f'<summary class="nbflow-line"><span class="nbflow-chevron" aria-hidden="true"></span>'
                f'<span class="nbflow-name" title="{html.escape(base)}[…]: {n} grid instances">'
                f"{html.escape(base)}[…]</span>"
                f'<span class="nbflow-state">{_pill(worst.style)}</span>'
                f"{_bar(done, n, BAR_COLOURS.get(worst.status, ''))}"
                f'<span class="nbflow-cells">{done}/{n}</span>'
                f'<span class="nbflow-note">{tally}</span></summary>'
                f'<div class="nbflow-group-rows">{inner}</div></details>')

    def _row_html(self, row: StepView, now: float) -> str:
        name = html.escape(row.name)
        parts = [f'<span class="nbflow-name" title="{name}">{name}</span>',
                 f'<span class="nbflow-state">{_pill(row.style, "; ".join(row.reasons))}</span>']
        if row.started:
            value = row.cells_total if row.status == StepStatus.SUCCEEDED else row.cells_done
            colour = STATE_STYLES[StepStatus.FAILED].colour if row.retrying else BAR_COLOURS.get(row.status, "")
            parts.append(_bar(value, max(row.cells_total, 1), colour))
            parts.append(f'<span class="nbflow-cells" title="code cells done, of all the code cells">'
                         f"{row.cells}</span>")
            parts.append(f'<span class="nbflow-elapsed">{format_duration(row.elapsed(now))}</span>')
            if row.max_attempts > 1 or row.attempt > 1:
                parts.append(f'<span class="nbflow-attempts">attempt {row.attempt} of {row.max_attempts}</span>')
            if row.notebook:
                parts.append(self._link_html(row.notebook, "nbflow-link", Path(row.notebook).name,
                                             f"open the executed notebook {row.notebook}"))
        note = html.escape(row.note)
        if row.source_line and row.status == StepStatus.RUNNING:
            line = html.escape(row.source_line)
            parts.append(f'<span class="nbflow-note nbflow-live" title="{note}: {line}">{note}: '
                         f"<code>{line}</code></span>")
        elif note:
            parts.append(f'<span class="nbflow-note" title="{note}">{note}</span>')
        more = self._more_html(row)
        key = html.escape(f"step:{row.name}")
        status = "not_started" if row.never_started else row.status.value
        attrs = f'class="nbflow-step" data-step="{name}" data-status="{status}"'
        error = self._error_html(row) if row.error else self._output_html(row)
        if not more:
            return (f'<div {attrs}><div class="nbflow-line"><span class="nbflow-chevron nbflow-none"></span>'
                    f'{"".join(parts)}</div>{error}</div>')
        # the row opens onto its parameters and outputs; its error shows either way
        return (f'<div {attrs}><details class="nbflow-row" data-key="{key}"><summary class="nbflow-line" '
                f'title="parameters and outputs"><span class="nbflow-chevron" aria-hidden="true"></span>'
                f'{"".join(parts)}</summary>{more}</details>{error}</div>')

    def _more_html(self, row: StepView) -> str:
        """What opens under a row: effective parameters, declared outputs, why it ran."""
        items = []
        if row.parameters:
            values = ", ".join(f"{html.escape(k)} = {html.escape(_short(repr(v)))}" for k, v in row.parameters.items())
            items.append(f'<div class="nbflow-params"><span class="nbflow-muted">parameters</span> '
                         f"<code>{values}</code></div>")
        if row.outputs:
            links = " ".join(f"<code>{html.escape(p)}</code>" if "://" in p  # an object in a store: no file to open
                             else self._link_html(p, "nbflow-output", p, f"open {p}") for p in row.outputs)
            items.append(f'<div class="nbflow-outputs"><span class="nbflow-muted">outputs</span> {links}</div>')
        if row.reasons and row.status != StepStatus.SKIPPED:
            items.append(f'<div><span class="nbflow-muted">why it ran</span> {html.escape("; ".join(row.reasons))}'
                         "</div>")
        if row.worker:
            items.append(f'<div><span class="nbflow-muted">ran on worker</span> <code>{html.escape(row.worker)}</code>'
                         "</div>")
        return f'<div class="nbflow-more">{"".join(items)}</div>' if items else ""

    def href(self, path: str) -> str:
        """A link to a file of the pipeline (relative to its folder), relative to the calling notebook's folder."""
        import urllib.parse  # noqa: PLC0415

        return urllib.parse.quote(Path(os.path.relpath(self.root / path, self.notebook_dir)).as_posix())

    def _link_html(self, path: str, cls: str, text: str, title: str) -> str:
        href = html.escape(self.href(path))
        return (f'<a class="{cls}" href="{href}" data-nbflow-path="{href}" target="_blank" rel="noopener" '
                f'title="{html.escape(title)}">{html.escape(text)}</a>')

    def _output_html(self, row: StepView) -> str:
        """The last lines a running step printed, stderr in the error colour."""
        lines = row.live_output
        if not lines:
            return ""
        shown = "".join(f'<div class="nbflow-{stream if stream == "stderr" else "stdout"}">{html.escape(text) or " "}'
                        "</div>" for stream, text in lines)
        return (f'<div class="nbflow-printed" role="log" title="the last lines {html.escape(row.name)} printed '
                f'(all of them: the executed notebook)"><pre>{shown}</pre></div>')

    def _error_html(self, row: StepView) -> str:
        error = row.error
        assert error is not None
        what = html.escape(f"{error.ename}: {error.evalue}" if error.evalue else error.ename)
        where = ""
        if error.where:
            line = f": <code>{html.escape(error.source_line)}</code>" if error.source_line else ""
            where = f'<div class="nbflow-where">{html.escape(error.where)}{line}</div>'
        traceback = ""
        if error.traceback:
            key = html.escape(f"traceback:{row.name}")
            traceback = (f'<details class="nbflow-traceback" data-key="{key}"><summary>full traceback</summary>'
                         f"<pre>{html.escape(error.traceback)}</pre></details>")
        return (f'<div class="nbflow-error" style="border-left:4px solid {STATE_STYLES[StepStatus.FAILED].colour}">'
                f'<div class="nbflow-what" style="color:{ERROR_RED}">{what}</div>{where}{traceback}</div>')

    def _graph_html(self) -> str:
        """The live graph: inline SVG whose boxes open the executed notebooks."""
        from . import plot  # noqa: PLC0415

        urls = {r.name: self.href(r.notebook) for r in self.rows.values() if r.notebook}
        return plot.html(self.graph, self._statuses(), urls, fit=True)

    def _statuses(self) -> Any:
        """The run as the graph colours it: a step cancelled before it started is 'not started'."""
        snapshot = self.view.snapshot()
        steps = {name: _Shown(step, "not_started" if self.rows[name].never_started else step.status.value)
                 for name, step in snapshot.steps.items() if name in self.rows}
        return _Snapshot(steps)

    def static_html(self) -> str:
        """The run for viewers without the widget: the same HTML, its style inline, the graph as an image
        (a sanitizing viewer keeps an image and drops inline SVG)."""
        from . import plot  # noqa: PLC0415

        body = self.body_html(graph=plot.image(self.graph, self._statuses()))
        return f'<div class="nbflow-run-static"><style>{CSS}</style>{body}</div>'

    def static_text(self) -> str:
        status = self.view.status.value if self.result else "running"
        lines = [f"nbflow run {self.run_id or ''}: {status}"]
        for row in self.rows.values():
            error = f"  {row.error.summary()}" if row.error else ""
            elapsed = format_duration(row.elapsed(time.time()))
            lines.append(f"  {row.name:<20} {row.style.word:<11} {elapsed:>8}{error}")
        return "\n".join(lines)


class _Shown:
    """One step as the graph reads it: the step's result with the state it shows."""

    def __init__(self, step: Any, status: str):
        self.status = status
        self.attempts, self.duration_s, self.error = step.attempts, step.duration_s, step.error


class _Snapshot:
    def __init__(self, steps: dict[str, _Shown]):
        self.steps = steps


def _pill(style: StateStyle, title: str = "") -> str:
    icon, label, colour = style.icon, style.word, style.colour
    tip = f' title="{html.escape(title)}"' if title else ""
    if label in OUTLINED:  # nothing happened (yet): an outline, not a filled badge
        look = f"border:1px {OUTLINED[label]} {colour};color:{colour};"
    else:
        look = f"border:1px solid {colour};background:{colour};color:#fff;"
    return (f'<span class="nbflow-pill"{tip} style="display:inline-block;min-width:8.4em;box-sizing:border-box;'
            f"padding:0 8px;border-radius:10px;{look}font-weight:600;font-size:0.9em;line-height:1.6;"
            f'white-space:nowrap">{icon}&nbsp;{label}</span>')


def _bar(value: int, total: int, colour: str) -> str:
    width = 100 * min(value, total) / max(total, 1)
    return (f'<span class="nbflow-bar" role="progressbar" aria-valuenow="{value}" aria-valuemax="{total}">'
            f'<span style="width:{width:.0f}%;background:{colour or "#868e96"}"></span></span>')


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _is_below(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


def _notebook_dir() -> Path:
    """The folder of the notebook that runs this kernel (Jupyter Server tells it), else the working folder."""
    session = os.environ.get("JPY_SESSION_NAME", "")
    if session and os.path.isabs(session):
        return Path(session).parent
    return Path.cwd()


def _kernel_id() -> str:
    """The Jupyter Server's id of this kernel (its connection file is kernel-<id>.json), or ''."""
    try:
        from ipykernel import get_connection_file  # noqa: PLC0415

        match = re.fullmatch(r"kernel-(.+)\.json", Path(get_connection_file()).name)
    except Exception:  # noqa: BLE001 - not in an ipykernel
        return ""
    return match.group(1) if match else ""


def _newest_success(graph: "Graph", steps: list[str]) -> str:
    """The newest run in which one of `steps` succeeded: what an all-fresh run is up to date with."""
    from ..state import Ledger  # noqa: PLC0415

    try:
        ledger = Ledger(graph.state_dir, create=False)
    except Exception:  # noqa: BLE001 - the sentence just leaves the run out
        return ""
    try:
        found = [s for s in (ledger.last_success(name) for name in steps) if s]
    except Exception:  # noqa: BLE001
        return ""
    finally:
        ledger.close()
    return max(found, key=lambda s: s["finished_at"])["run_id"] if found else ""
