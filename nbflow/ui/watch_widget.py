"""The widget of `nbflow.watch()` in Jupyter: the watch's cycles, the latest cycle's run live, a Stop button.

Owns: the watch's frame (what it follows, its state, a line per cycle: when, what changed, what reran or why it
could not run), the latest cycle's run inside it (a RunWidget per cycle, writing into this frame rather than into
a widget of its own), the Stop button (the run widget's front end, labelled "Stop watching": its click arrives as
a comm message, since the watch runs in a background thread, or as a request file written through the Jupyter
server), and the static HTML that replaces the widget once the watch stops. A listener of the watch's events;
the only thing it calls is the `stop` it was given.
"""

from __future__ import annotations

import html
import secrets
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..events import Event, WatchCycleFinished, WatchCycleStarted, WatchStopped
from .view import cycle_cause, cycle_outcome
from .widget import CSS, TICK_S, RunModel, RunWidget, _notebook_dir, _kernel_id

if TYPE_CHECKING:
    from ..graph import Graph
    from ..plan import Plan

SHOWN_CYCLES = 8  # the newest cycles listed; older ones are counted


class _CycleFrame:
    """Where a cycle's RunWidget writes: its body goes inside the watch's frame, its graph to the watch's model."""

    def __init__(self, owner: "WatchWidget"):
        self._owner = owner
        self._body = ""
        self.controls: dict[str, Any] = {}  # the run's Cancel is the watch's Stop: nothing to set

    @property
    def body(self) -> str:
        return self._body

    @body.setter
    def body(self, value: str) -> None:
        self._body = value
        self._owner.render()

    @property
    def graph(self) -> str:
        return self._owner.model.graph

    @graph.setter
    def graph(self, value: str) -> None:
        if self._owner.model.graph != value:
            self._owner.model.graph = value

    def on_msg(self, _callback: Any) -> None:
        pass

    def close(self) -> None:
        pass


class WatchWidget:
    """The live view of a watch: `show()` it, give it the watch's events, `attach(stop)`."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.notebook_dir = _notebook_dir()
        self.cycles: list[WatchCycleFinished] = []
        self.current: WatchCycleStarted | None = None
        self.state = "starting"  # "running" a cycle, "watching" for changes, "stopped"
        self.error: str | None = None
        self.run_widget: RunWidget | None = None
        self._frame: _CycleFrame | None = None
        self._stop: Callable[[], None] | None = None
        self.stop_requested = False
        self.stop_file = self.root / "_nbflow" / f"stop-watch-{secrets.token_hex(8)}"
        self._lock = threading.RLock()
        self._ended = threading.Event()
        self._timer: threading.Thread | None = None
        self._handle: Any = None
        self.model = RunModel(controls=self._controls())
        self.model.on_msg(self._on_message)
        self.render()

    # -- public ----------------------------------------------------------------------
    def show(self) -> None:
        from IPython.display import display  # noqa: PLC0415

        self.model.controls = self._controls(kernel_id=_kernel_id())
        bundle = self.model._repr_mimebundle_()
        data = dict((bundle[0] if isinstance(bundle, tuple) else bundle) or {})
        data.update({"text/html": self.static_html(), "text/plain": self.static_text()})
        self._handle = display(data, raw=True, display_id=True)

    def attach(self, stop: Callable[[], None]) -> None:
        """Let the Stop button call `stop` (the watch handle's); starts looking for a stop request file."""
        with self._lock:
            self._stop = stop
            self.model.controls = self._controls()
        if self._timer is None:
            self._timer = threading.Thread(target=self._look_for_stop_file, name="nbflow-watch-widget", daemon=True)
            self._timer.start()

    def stop(self) -> None:
        """What the Stop button does, by whichever way its click arrives."""
        with self._lock:
            if self._stop is None or self.state == "stopped" or self.stop_requested:
                return
            self.stop_requested = True
            self.model.controls = self._controls()
        self._stop()

    def planned(self, graph: "Graph", plan: "Plan") -> RunWidget:
        """A cycle's run is planned: its rows live inside this frame (the watch adds it as the run's listener)."""
        with self._lock:
            self._frame = _CycleFrame(self)
            self.run_widget = RunWidget(graph, plan, model=self._frame)
            return self.run_widget

    def __call__(self, event: Event) -> None:
        with self._lock:
            if isinstance(event, WatchCycleStarted):
                self.current, self.state = event, "running"
            elif isinstance(event, WatchCycleFinished):
                self.cycles.append(event)
                self.current, self.state = None, "watching"
                if event.result is None:  # the cycle could not run: its error, not the last run's rows
                    self.run_widget, self._frame = None, None
            elif isinstance(event, WatchStopped):
                self.state, self.error = "stopped", event.error
            else:
                return
            self.model.controls = self._controls()
            self.render()
        if isinstance(event, WatchStopped):
            self._end()

    # -- the front end -----------------------------------------------------------------
    def _controls(self, **extra: Any) -> dict[str, Any]:
        import os  # noqa: PLC0415

        try:
            stop_path = Path(os.path.relpath(self.stop_file, self.notebook_dir)).as_posix()
        except ValueError:
            stop_path = ""
        controls = dict(getattr(self, "model", None) and self.model.controls or {})
        controls.update(holds_kernel=False, background=True, cancel_path=stop_path, attached=self._stop is not None,
                        cancelling=self.stop_requested, finished=self.state == "stopped",
                        label="Stop watching", busy_label="Stopping…", **extra)
        return controls

    def _on_message(self, _model: Any, content: Any, _buffers: Any) -> None:
        if isinstance(content, dict) and content.get("cancel"):
            self.stop()

    def _look_for_stop_file(self) -> None:
        while not self._ended.wait(TICK_S):
            if self.stop_file.exists():  # written by the front end through the Jupyter server
                self._remove_stop_file()
                self.stop()

    def _remove_stop_file(self) -> None:
        try:
            self.stop_file.unlink()
        except OSError:
            pass

    def _end(self) -> None:
        self._ended.set()
        self._remove_stop_file()
        if self._handle is not None:
            self._handle.update({"text/html": self.static_html(), "text/plain": self.static_text()}, raw=True)
            self.model.close()

    def render(self) -> None:
        with self._lock:
            body = self.body_html()
            if self.model.body != body:
                self.model.body = body

    # -- the HTML ----------------------------------------------------------------------
    def body_html(self, run_body: str | None = None) -> str:
        """The watch: its header (state, Stop), a line per cycle, the latest cycle's run (`run_body`, else live)."""
        if run_body is None:
            run_body = self._frame.body if self._frame is not None else ""
        return (f'<div class="nbflow-run nbflow-watch">{self._header_html()}{self._cycles_html()}'
                f'{self._error_html()}<div class="nbflow-watch-run">{run_body}</div></div>')

    def _header_html(self) -> str:
        words = {"starting": "starting", "running": "running a cycle", "watching": "watching for changes",
                 "stopped": "stopped"}
        followed = f" · {self.cycles[-1].watching} files and folders" if self.cycles else ""
        return (f'<div class="nbflow-header"><span class="nbflow-title"><b>nbflow watch</b> '
                f"<code>{html.escape(str(self.root))}</code></span>"
                f'<span class="nbflow-totals nbflow-muted">{words[self.state]}{followed}</span>'
                f'<span class="nbflow-actions"></span></div>')

    def _cycles_html(self) -> str:
        lines = []
        if self.current is not None:
            lines.append(self._line(self.current.number, self.current.started_at, cycle_cause(self.current.changed),
                                    "running…", ""))
        for cycle in reversed(self.cycles[-SHOWN_CYCLES:]):
            text, style = cycle_outcome(cycle)
            colour = style.colour if style is not None else ("#c92a2a" if cycle.error else "")
            started = cycle.result.started_at if cycle.result is not None else None
            lines.append(self._line(cycle.number, started, cycle_cause(cycle.changed), text, colour))
        older = len(self.cycles) - SHOWN_CYCLES
        if older > 0:
            lines.append(f'<li class="nbflow-muted">… {older} earlier cycle(s)</li>')
        return f'<ol class="nbflow-cycles" style="list-style:none;padding:0;margin:4px 0">{"".join(lines)}</ol>'

    @staticmethod
    def _line(number: int, at: float | None, cause: str, outcome: str, colour: str) -> str:
        when = time.strftime("%H:%M:%S", time.localtime(at)) if at else ""
        look = f' style="color:{colour}"' if colour else ""
        return (f'<li class="nbflow-cycle" data-cycle="{number}"><span class="nbflow-muted">{when} cycle {number}'
                f"</span> · {html.escape(cause)} · <span{look}>{html.escape(outcome)}</span></li>")

    def _error_html(self) -> str:
        last = self.cycles[-1] if self.cycles else None
        if last is None or last.error is None or self.current is not None:
            return ""
        return (f'<div class="nbflow-error" style="border-left:4px solid #c92a2a;padding-left:8px">'
                f"<pre>{html.escape(last.error)}</pre></div>")

    def static_html(self) -> str:
        """The watch for viewers without the widget: the same frame, the latest run as its own static copy."""
        if self.run_widget is not None:  # it brings the style along
            return f'<div class="nbflow-run-static">{self.body_html(self.run_widget.static_html())}</div>'
        return f'<div class="nbflow-run-static"><style>{CSS}</style>{self.body_html("")}</div>'

    def static_text(self) -> str:
        lines = [f"nbflow watch {self.root}: {self.state}"]
        for cycle in self.cycles[-SHOWN_CYCLES:]:
            lines.append(f"  cycle {cycle.number}: {cycle_cause(cycle.changed)}: {cycle_outcome(cycle)[0]}")
        return "\n".join(lines)


__all__ = ["WatchWidget"]
