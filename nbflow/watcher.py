"""Watch mode: the pipeline follows your edits (`nbflow.watch`, `nbflow run --watch`).

(Not `nbflow/watch.py`: importing a submodule named `watch` would replace the function `nbflow.watch`.)

Owns: what a watch follows (the pipeline folder's notebooks and nbflow.yaml,
every declared local input, file or folder, and the project modules steps
import), waiting for changes to them (watchfiles, in threads of its own),
deciding which changes count (not `_nbflow/`, checkpoints, caches or hidden
files, and not what a run of the watch wrote itself), debouncing, and the
cycles: one run of what went stale at a time, every change made during a run
queuing exactly one more. Each cycle is an ordinary run (`api.run`), recorded
in the ledger; the watch lends it an executor that lives as long as the
watch, so the fork server and a warm kernel are ready when the next save
comes. It presents nothing: WatchCycleStarted / WatchCycleFinished /
WatchStopped and the runs' events go to listeners (terminal, log, widget).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

from .errors import NbflowError, Problem
from .events import Event, Listener, RunResult, WatchCycleFinished, WatchCycleStarted, WatchStopped
from .graph import relative_to

if TYPE_CHECKING:
    from .api import RunHandle
    from .executors import Executor
    from .graph import Graph
    from .plan import Plan
    from .settings import RunSettings

log = logging.getLogger("nbflow")

#: A change is acted on once no other change came for this long (a save storm is one cycle) ...
QUIET_MS = 120
#: ... or once changes have kept coming for this long.
MAX_WAIT_MS = 1_600
#: How long watchfiles waits for more changes before it hands over a batch (shorter than QUIET_MS, so
#: that the batches of one storm are merged here).
_BATCH_MS = 40
#: A declared output whose file was modified up to this long after a cycle ended was written by that cycle.
OWN_WRITE_GRACE_S = 0.5
_SKIP_PARTS = frozenset({"_nbflow", ".ipynb_checkpoints", "__pycache__", "node_modules"})
_INSTALL = 'watch mode needs the watchfiles package: pip install "nbflow[watch]"'


def require_watchfiles() -> None:
    """Raise NbflowError naming the extra to install when watchfiles is missing."""
    try:
        import watchfiles  # noqa: F401, PLC0415
    except ImportError:
        raise NbflowError(_INSTALL) from None


# -- what a watch follows ------------------------------------------------------------

@dataclass(frozen=True)
class Followed:
    """What one state of the pipeline makes a watch follow, and which changed paths count."""

    root: Path
    files: frozenset[Path] = frozenset()  # declared input files, project modules, nbflow.yaml
    folders: frozenset[Path] = frozenset()  # declared folder inputs: everything inside counts
    module_folders: frozenset[Path] = frozenset()  # a new module there may be what a step imports now
    outputs: frozenset[Path] = frozenset()  # declared outputs (files and folders): what runs write
    notebooks: int = 0
    recursive_roots: tuple[Path, ...] = ()
    flat_roots: tuple[Path, ...] = ()

    @property
    def count(self) -> int:
        """Files and folders followed (notebooks, nbflow.yaml, inputs, modules)."""
        return self.notebooks + len(self.files) + len(self.folders)

    def counts(self, path: Path, own_writes: Iterable[tuple[float, float]] = ()) -> bool:
        """Whether a change to `path` can make a step stale, given the cycles' time windows (start, end)."""
        if _inside_any(path, self.outputs):
            # a run's own writes never start a cycle: a declared output modified during a cycle (or right
            # after its end) was written by it; deleted or modified at another time, it was not
            try:
                mtime = os.stat(path).st_mtime
            except OSError:
                return True
            if any(start - 0.05 <= mtime <= end + OWN_WRITE_GRACE_S for start, end in own_writes):
                return False
        if _skipped(path, self.root):
            return False
        if path in self.files or _inside_any(path, self.folders):
            return True
        if path.suffix == ".py" and path.parent in self.module_folders:
            return True
        if self.root in path.parents:
            return path.suffix == ".ipynb" or (path.suffix == ".py" and _is_percent_script(path))
        return False


def follow(graph: "Graph | None", root: Path) -> Followed:
    """What to follow for a pipeline read as `graph` (None: unreadable, follow its folder only)."""
    from .config import CONFIG_NAME  # noqa: PLC0415
    from .graph import is_folder_path  # noqa: PLC0415
    from .imports import project_modules  # noqa: PLC0415

    files: set[Path] = {root / CONFIG_NAME}
    folders: set[Path] = set()
    outputs: set[Path] = set()
    modules: set[Path] = set()
    notebooks = 0
    if graph is not None:
        notebooks = len({step.path for step in graph.steps.values()}) + len(graph.not_steps)
        search = graph.python_path()
        for step in graph.steps.values():
            for label, path in step.input_paths():
                if isinstance(path, Path):  # not a URL: nothing to hear of it from this machine's files
                    (folders if is_folder_path(label) else files).add(path)
            for _, path in step.output_paths():
                if isinstance(path, Path):
                    outputs.add(path)
            if step.imports:
                modules.update(project_modules(step.imports, (*search, step.folder)))
    files |= modules
    recursive = {root} | {f for f in folders if f.is_dir()}
    flat = {_existing_folder(p.parent) for p in files} | {_existing_folder(f.parent) for f in folders if not f.is_dir()}
    recursive_roots = _outermost(recursive)
    flat_roots = tuple(sorted(f for f in flat if not any(f == r or r in f.parents for r in recursive_roots)))
    return Followed(root, frozenset(files), frozenset(folders), frozenset(m.parent for m in modules),
                    frozenset(outputs), notebooks, recursive_roots, flat_roots)


def _existing_folder(path: Path) -> Path:
    while not path.is_dir() and path != path.parent:
        path = path.parent
    return path


def _outermost(folders: set[Path]) -> tuple[Path, ...]:
    return tuple(sorted(f for f in folders if not any(o in f.parents for o in folders)))


def _inside_any(path: Path, folders: frozenset[Path]) -> bool:
    return path in folders or any(parent in folders for parent in path.parents)


def _skipped(path: Path, root: Path) -> bool:
    """`_nbflow/`, checkpoints, caches and hidden files never start a cycle (below the pipeline folder: any part)."""
    parts = path.relative_to(root).parts if root in path.parents else (path.name,)
    return any(part in _SKIP_PARTS or part.startswith((".", "~")) for part in parts)


def _is_percent_script(path: Path) -> bool:
    from .notebook import is_percent_script  # noqa: PLC0415

    return is_percent_script(path)


# -- waiting for changes ---------------------------------------------------------------

class _Watcher:
    """watchfiles on a set of folders, in threads of its own, putting each batch of changed paths on a queue."""

    def __init__(self, followed: Followed, sink: "queue.Queue[tuple[str, Any]]"):
        self.followed = followed
        self._stop = threading.Event()
        self._ready: list[threading.Event] = []
        self._threads: list[threading.Thread] = []
        for roots, recursive in ((followed.recursive_roots, True), (followed.flat_roots, False)):
            if not roots:
                continue
            ready = threading.Event()
            thread = threading.Thread(target=self._follow, args=(roots, recursive, sink, ready),
                                      name="nbflow-watch-files", daemon=True)
            self._ready.append(ready)
            self._threads.append(thread)
            thread.start()

    def wait_ready(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        for ready in self._ready:
            ready.wait(max(0.0, deadline - time.monotonic()))

    def _follow(self, roots: tuple[Path, ...], recursive: bool, sink: "queue.Queue[tuple[str, Any]]",
                ready: threading.Event) -> None:
        import watchfiles  # noqa: PLC0415

        try:
            # yield_on_timeout: the first (empty) batch says that the watch is in place
            for changes in watchfiles.watch(*roots, watch_filter=None, debounce=MAX_WAIT_MS, step=_BATCH_MS,
                                            stop_event=self._stop, rust_timeout=100, yield_on_timeout=True,
                                            raise_interrupt=False, recursive=recursive,
                                            ignore_permission_denied=True):
                ready.set()
                if changes:
                    sink.put(("changes", {Path(os.path.normpath(path)) for _, path in changes}))
        except Exception as e:  # noqa: BLE001 - told to the watch loop, which says it
            sink.put(("error", f"cannot watch {', '.join(map(str, roots))}: {e}"))
        finally:
            ready.set()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)


# -- the cycles ------------------------------------------------------------------------

class WatchCycle:
    """What a watch lends one of its runs (`api.run(cycle=...)`): its executor; and what it learns: the graph."""

    def __init__(self, watch: "Watch"):
        self._watch = watch
        self.graph: Graph | None = None

    def planned(self, graph: "Graph", plan: "Plan") -> list[Listener]:
        """Called by the run once planned; returns the listeners made for this run (a widget's rows)."""
        self.graph = graph
        made = []
        for listener in self._watch.listeners:
            for_run = getattr(listener, "planned", None)
            if for_run is not None:
                extra = for_run(graph, plan)
                if extra is not None:
                    made.append(extra)
        return made

    def executor(self, settings: "RunSettings") -> "Executor":
        return self._watch.executor_for(settings)


@dataclass
class Watch:
    """The watch loop: call `run()` in a thread of its own, `stop()` from any thread."""

    pipeline: Path
    steps: tuple[str, ...] = ()
    run_options: Mapping[str, Any] = field(default_factory=dict)  # passed to api.run each cycle
    listeners: list[Listener] = field(default_factory=list)
    quiet_ms: int = QUIET_MS
    cycles: list[WatchCycleFinished] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.pipeline = Path(self.pipeline).absolute()
        self._stopping = threading.Event()
        self._changes: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._watcher: _Watcher | None = None
        self._followed: Followed | None = None
        self._windows: list[tuple[float, float]] = []  # (start, end) of the latest cycles
        self._current: RunHandle | None = None
        self._executor: Executor | None = None
        self._settings: RunSettings | None = None
        self._lock = threading.Lock()

    # -- from any thread -------------------------------------------------------------
    def stop(self) -> None:
        """End the watch: the run going on is cancelled (its notebooks saved), then everything is released."""
        self._stopping.set()
        with self._lock:
            current = self._current
        if current is not None:
            current.cancel()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    @property
    def followed(self) -> Followed | None:
        return self._followed

    # -- the loop --------------------------------------------------------------------
    def run(self) -> None:
        """Run what is stale, then a cycle after every change that counts, until `stop()`."""
        error = None
        try:
            self._refollow(_best_effort_graph(self.pipeline))
            changed: set[Path] = set()
            number = 0
            while not self._stopping.is_set():
                number += 1
                self._cycle(number, changed)
                changed = self._wait_for_changes()
        except Exception as e:  # noqa: BLE001 - said in WatchStopped, and raised by the handle's wait()
            log.exception("the watch of %s ended with an error", self.pipeline)
            error = f"{type(e).__name__}: {e}"
            raise
        finally:
            try:
                if self._watcher is not None:
                    self._watcher.stop()
                if self._executor is not None:
                    self._executor.close()
            finally:
                self._emit(WatchStopped(len(self.cycles), error))

    def _cycle(self, number: int, changed: set[Path]) -> None:
        from . import api  # noqa: PLC0415

        started = time.time()
        paths = tuple(sorted(relative_to(p, self.pipeline) for p in changed))
        self._emit(WatchCycleStarted(number, paths, started))
        hooks = WatchCycle(self)
        result: RunResult | None = None
        error: str | None = None
        try:
            handle = api.run(self.pipeline, list(self.steps), background=True, display=False,
                             listeners=self.listeners, cycle=hooks, **self.run_options)
            assert isinstance(handle, api.RunHandle)
            with self._lock:
                self._current = handle
            if self._stopping.is_set():
                handle.cancel()
            result = handle.wait()
        except NbflowError as e:  # an invalid pipeline (a notebook saved half-way, a cycle): this cycle's error
            error = _describe_error(e)
        finally:
            with self._lock:
                self._current = None
            self._windows = [*self._windows[-2:], (started, time.time())]
        self._refollow(hooks.graph or _best_effort_graph(self.pipeline))
        finished = WatchCycleFinished(number, paths, result, error,
                                      self._followed.count if self._followed else 0)
        self.cycles.append(finished)
        self._emit(finished)

    def _refollow(self, graph: "Graph | None") -> None:
        """Follow what the pipeline declares now; a new set of folders gets a new watcher (the old one goes after)."""
        followed = follow(graph, self.pipeline)
        old = self._watcher
        if old is None or (followed.recursive_roots, followed.flat_roots) != (old.followed.recursive_roots,
                                                                              old.followed.flat_roots):
            self._watcher = _Watcher(followed, self._changes)
            self._watcher.wait_ready()
            if old is not None:
                old.stop()
        self._followed = followed

    def _wait_for_changes(self) -> set[Path]:
        """The changes that count, once they stop coming (changes made during the last cycle included)."""
        pending: set[Path] = set()
        first_at = 0.0
        while not self._stopping.is_set():
            if pending and time.monotonic() - first_at > MAX_WAIT_MS / 1000:
                return pending
            try:
                kind, payload = self._changes.get(timeout=self.quiet_ms / 1000 if pending else 0.1)
            except queue.Empty:
                if pending:
                    return pending
                continue
            if kind == "error":
                raise NbflowError(payload)
            assert self._followed is not None
            counted = {p for p in payload if self._followed.counts(p, self._windows)}
            if counted and not pending:
                first_at = time.monotonic()
            pending |= counted
        return pending

    # -- what the runs share -----------------------------------------------------------
    def executor_for(self, settings: "RunSettings") -> "Executor":
        """One executor for every cycle (made again only when nbflow.yaml changes how steps run)."""
        if self._executor is not None and settings != self._settings:
            self._executor.close()
            self._executor = None
        if self._executor is None:
            from .executors import make_executor  # noqa: PLC0415

            self._executor = make_executor(settings)  # the local one keeps warm forks while the watch lasts
            self._settings = settings
        return self._executor

    def _emit(self, event: Event) -> None:
        for listener in self.listeners:
            try:
                listener(event)
            except Exception:  # noqa: BLE001 - a display bug must not end the watch
                log.exception("listener %r failed on %s", listener, type(event).__name__)


def _best_effort_graph(root: Path) -> "Graph | None":
    """The pipeline's readable steps, even when it has problems (they are the cycle's error)."""
    from .graph import build_graph  # noqa: PLC0415

    problems: list[Problem] = []
    try:
        return build_graph(root, collect=problems)
    except NbflowError:
        return None


def _describe_error(error: NbflowError) -> str:
    problems = getattr(error, "problems", None)
    if problems:
        return "\n".join(str(p) for p in problems)
    return str(error)


# -- the handle ------------------------------------------------------------------------

class WatchHandle:
    """A watch going on in a background thread: `.stop()`, `.wait()`, `.cycles`, `.done`."""

    def __init__(self, watch: Watch, on_end: Callable[[], None] | None = None):
        self.watch = watch
        self.error: BaseException | None = None
        self._on_end = on_end
        self._finished = threading.Event()
        self._thread = threading.Thread(target=self._main, name="nbflow-watch", daemon=True)
        self._thread.start()

    def _main(self) -> None:
        try:
            self.watch.run()
        except BaseException as e:  # noqa: BLE001 - handed to wait()
            self.error = e
        finally:
            try:
                if self._on_end is not None:
                    self._on_end()
            finally:
                self._finished.set()

    @property
    def cycles(self) -> list[WatchCycleFinished]:
        """Every finished cycle: what changed, what reran, the run's result or the cycle's error."""
        return list(self.watch.cycles)

    @property
    def done(self) -> bool:
        return self._finished.is_set()

    def stop(self) -> None:
        """End the watch cleanly (the run going on is cancelled); returns at once, `wait()` for the end."""
        self.watch.stop()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the watch has ended (True) or `timeout` passed (False). Ctrl-C while waiting stops it."""
        from .api import wait_or_stop  # noqa: PLC0415

        wait_or_stop(self._finished, timeout, self.stop)
        if self.error is not None:
            raise self.error
        return self._finished.is_set()

    def __repr__(self) -> str:
        state = "stopped" if self.done else "watching"
        return f"<nbflow watch {self.watch.pipeline}: {state}, {len(self.watch.cycles)} cycle(s)>"


__all__ = ["Followed", "QUIET_MS", "Watch", "WatchCycle", "WatchHandle", "follow", "require_watchfiles"]
