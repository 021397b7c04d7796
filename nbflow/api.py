"""The Python API: `run`, `Pipeline`, `history`, `clean`, `repair`. The CLI calls exactly these.

Owns: wiring a run together (graph, lock, ledger, plan, executor, listeners,
Runner) and releasing everything afterwards, background runs, the
read-only views (status, history) and the upkeep of `_nbflow/` (clean,
repair). Must not print: results are returned, progress goes to listeners.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping

from . import stores
from .config import load_config
from .errors import PipelineError, PipelineLocked, Problem
from .events import Listener, RunResult
from .graph import STATE_DIR, Graph, build_graph, resolve_parameters
from .layout import StateLayout
from .notebook import Step

if TYPE_CHECKING:
    import pandas

    from .execute import Runner
    from .scheduling import Schedule
    from .watcher import WatchCycle, WatchHandle
    from .state import Ledger, RunLock


@dataclass(frozen=True)
class StepState:
    """What `nbflow status` says about one notebook."""

    name: str
    state: str  # "fresh", "stale" or "not_a_step"
    reasons: tuple[str, ...]
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    upstream: tuple[str, ...] = ()
    path: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "state": self.state, "reasons": list(self.reasons), "inputs": list(self.inputs),
                "outputs": list(self.outputs), "upstream": list(self.upstream)}


class Pipeline:
    """A pipeline folder, read statically: `.steps`, `.graph`, `.status()`, `.left_behind()`, `.plot()`.

    `grid` (`{"train": {"alpha": [0.1, 1.0]}}`) replaces nbflow.yaml's grids of the steps it names.
    """

    def __init__(self, path: str | os.PathLike = ".", grid: Mapping[str, Mapping[str, Any]] | None = None):
        self._grid = grid
        self._graph: Graph = build_graph(path, grid=grid)
        self._read_again = False  # the first status() uses the graph just read
        self.root: Path = self._graph.root
        self.last_result: RunResult | None = None

    @property
    def steps(self) -> dict[str, Step]:
        return self._graph.steps

    @property
    def graph(self) -> dict[str, list[str]]:
        """Each step and the steps it depends on."""
        return {name: list(self._graph.upstream[name]) for name in self._graph.order}

    def status(self, parameters: Mapping[str, Any] | None = None,
               grid: Mapping[str, Mapping[str, Any]] | None = None) -> list[StepState]:
        """Per step (each instance of a grid): fresh or stale, and why; notebooks that are not steps too.

        `grid` replaces the Pipeline's grids from now on.
        """
        from .plan import kernel_of, lost_steps, missing_kernels  # noqa: PLC0415
        from .state import Ledger, assess  # noqa: PLC0415

        if grid is not None:
            self._grid, self._read_again = grid, True
        if self._read_again:  # the notebooks as they are now, not as first read
            self._graph = build_graph(self.root, grid=self._grid)
        self._read_again = True
        g = self._graph
        _require_steps(g)
        params = resolve_parameters(g, parameters)
        ledger = Ledger(g.state_dir, create=False)
        try:
            lost = lost_steps(g, ledger)
            if lost:  # as `run` would: a notebook that left the pipeline silently is an error
                raise PipelineError(lost)
            unrunnable = {p.step: p.message for p in missing_kernels(g, g.order)}
            stale: set[str] = set()
            states = []
            for name in g.order:
                ups = tuple(u for u in g.upstream[name] if u in stale)
                f = assess(g, name, params[name], ledger, ups, kernel_of(g, name))
                reasons = f.reasons + ((unrunnable[name],) if name in unrunnable else ())
                if not f.fresh:
                    stale.add(name)
                states.append(StepState(name, "fresh" if f.fresh else "stale", reasons,
                                        tuple(r.label for r in g.inputs_of(name)),
                                        tuple(r.label for r in g.outputs_of(name)), g.upstream[name],
                                        g.steps[name].rel_path))
        finally:
            ledger.close()
        states += [StepState(n.name, "not_a_step", (n.reason,), path=n.rel_path) for n in g.not_steps]
        return states

    def code_change(self) -> dict[str, Any] | None:
        """The git commit now against the last run's: {commit, last_run_commit, last_run_id, differs, dirty}.

        None when the folder is not in a git repository or no run recorded a commit.
        """
        from .audit import git_state  # noqa: PLC0415

        now = git_state(self.root)
        if now is None:
            return None
        with read_ledger(self.root) as ledger:
            last = next((r for r in ledger.runs() if (r.get("audit") or {}).get("git")), None)
        if last is None:
            return None
        then = last["audit"]["git"]
        return {"commit": now["commit"], "dirty": now["dirty"], "last_run_commit": then["commit"],
                "last_run_id": last["run_id"], "differs": now["commit"] != then["commit"]}

    def left_behind(self) -> list[dict[str, str]]:
        """Outputs of grid instances that are no longer in the grid: `{"step", "path", "why"}` each, the path
        relative to the pipeline folder (a folder ends in `/`). `clean(..., left_behind=True)` removes them."""
        from .graph import relative_to  # noqa: PLC0415

        return [{"step": item.step, "path": relative_to(item.path, self.root)
                 + ("/" if isinstance(item.path, Path) and item.path.is_dir() else ""),
                 "why": item.why} for item in self._graph.left_behind()]

    def plot(self, path: str | os.PathLike | None = None, result: RunResult | None = None) -> str:
        """Write the DAG to `path` (.svg, .png, .html, .mmd); returns the SVG (or mermaid) text."""
        from .ui import plot  # noqa: PLC0415

        return plot.write(self._graph, path, result or self.last_result)

    def run(self, *steps: str, **kwargs: Any) -> "RunResult | RunHandle":
        kwargs.setdefault("grid", self._grid)
        result = run(self.root, steps, **kwargs)
        if isinstance(result, RunResult):
            self.last_result = result
        return result

    def _repr_html_(self) -> str:
        from .ui import plot  # noqa: PLC0415

        return plot.html(self._graph, self.last_result)

    def __repr__(self) -> str:
        return f"Pipeline({str(self.root)!r}, steps={list(self._graph.order)})"


def wait_or_stop(finished: threading.Event, timeout: float | None, stop: Callable[[], None]) -> None:
    """Wait for `finished` (at most `timeout`); Ctrl-C (or the kernel's interrupt) meanwhile calls `stop`
    and then waits for the end, so that what was stopped is always wound down cleanly."""
    try:
        finished.wait(timeout)
    except KeyboardInterrupt:
        stop()
        while not finished.is_set():
            try:
                finished.wait()
            except KeyboardInterrupt:
                pass


class RunHandle:
    """A run going on in a background thread: `.wait()`, `.cancel()`, `.result`, `.done`."""

    def __init__(self, runner: "Runner", thread_target):
        self.runner = runner
        self.result: RunResult | None = None
        self.error: BaseException | None = None
        # not Thread.join/is_alive: a Ctrl-C that interrupts join() marks a live thread as stopped (CPython 3.11)
        self._finished = threading.Event()
        self._thread = threading.Thread(target=self._main, args=(thread_target,), name="nbflow-run", daemon=True)
        self._thread.start()

    def _main(self, target) -> None:
        try:
            self.result = target()
        except BaseException as e:  # noqa: BLE001 - handed to wait()
            self.error = e
        finally:
            self._finished.set()

    @property
    def run_id(self) -> str:
        return self.runner.run_id

    @property
    def done(self) -> bool:
        return self._finished.is_set()

    def wait(self, timeout: float | None = None) -> RunResult | None:
        """The run's result once it ended (None if `timeout` passed first).

        Interrupting the kernel (or Ctrl-C) while waiting cancels the run, as
        for a run in the foreground, and waits for it to end cleanly.
        """
        wait_or_stop(self._finished, timeout, self.cancel)
        if self.error is not None:
            raise self.error
        return self.result

    def cancel(self) -> None:
        self.runner.cancel()

    def __repr__(self) -> str:
        state = self.result.status.value if self.result else "running"
        return f"<nbflow run {self.run_id}: {state}>"


def run(pipeline: str | os.PathLike = ".", steps: Iterable[str] | str = (), *,
        parameters: Mapping[str, Any] | None = None, force: bool = False, force_upstream: bool = False,
        only: bool = False, jobs: int | None = None,
        executor: str | None = None, dask_address: str | None = None, fail_fast: bool = False,
        background: bool = False, listeners: Iterable[Listener] = (), display: bool | None = None,
        run_id: str | None = None, call: "str | Callable[[tuple[str, ...]], str] | None" = None,
        grid: Mapping[str, Mapping[str, Any]] | None = None,
        cycle: "WatchCycle | None" = None) -> "RunResult | RunHandle":
    """Run the pipeline (or `steps` and what they need); returns the RunResult.

    `grid` (`{"train": {"alpha": [0.1, 1.0]}}`) replaces nbflow.yaml's grids of
    the steps it names: each combination of values runs as an instance,
    `train[alpha=0.1]`; a step's name in `steps` selects all its instances.

    Invalid pipelines raise PipelineError before any kernel starts. In
    Jupyter a live widget shows the run (display=False turns it off); while
    the cell waits, interrupting the kernel (■) cancels the run cleanly, and
    so does the widget's Cancel button (through the Jupyter server, so also
    while the cell runs). With background=True it returns a RunHandle at once.
    `cycle` is set by `watch`: the run is one cycle of a watch, which lends its
    executor (its kernels stay warm between cycles) and learns the graph and plan.
    """
    from . import audit  # noqa: PLC0415
    from .layout import new_run_id  # noqa: PLC0415
    from .plan import make_plan  # noqa: PLC0415
    from .settings import resolve as resolve_settings  # noqa: PLC0415
    from .state import LedgerRecorder  # noqa: PLC0415

    steps = [steps] if isinstance(steps, str) else list(steps)
    choice = {"force": force, "force_upstream": force_upstream, "only": only}
    graph = _valid_graph(pipeline, steps, parameters, choice, grid)
    run_id = run_id or new_run_id()
    lock, ledger = _take_pipeline(graph, run_id)
    try:
        plan = make_plan(graph, ledger, steps, parameters, **choice)
        settings = resolve_settings(graph.config, jobs=jobs, executor=executor, dask_address=dask_address,
                                    fail_fast=fail_fast)
        display = _in_jupyter() if display is None else display
        options = {"grid": grid, "executor": executor, "dask_address": dask_address, "jobs": jobs,
                   "fail_fast": fail_fast}
        widget = _widget(graph, plan, {k: v for k, v in options.items() if v}) if display else None
        all_listeners = ([widget] if widget else []) + list(listeners) + _alert_hooks(graph)
        all_listeners += _lineage_listener(graph)
        if cycle is not None:
            all_listeners += cycle.planned(graph, plan)
        exe = None
        if plan.to_run:
            from .executors import make_executor  # noqa: PLC0415

            exe = cycle.executor(settings) if cycle is not None else make_executor(settings)
        # imported once the executor exists: its fork server boots meanwhile (first thing, on a fast path)
        from .execute import Runner  # noqa: PLC0415

        said = (call(graph.config.secrets) if callable(call)
                else call or _api_call(pipeline, steps, parameters, choice, grid, graph.config.secrets))
        record = audit.collect(graph.root, said,
                               packages=None if plan.to_run or graph.config.fingerprint_packages else {})
        runner = Runner(plan, ledger, exe or _NoExecutor(), listeners=all_listeners,
                        recorder=LedgerRecorder(ledger, graph.config.secrets), settings=settings, run_id=run_id,
                        audit=record)
        ui_events = _ui_poller() if display and not background else None
        if widget is not None:
            # the run holds the kernel when it goes on in the cell's main thread without processing UI events
            widget.attach(runner.cancel, background=background,
                          holds_kernel=not background and ui_events is None
                          and threading.current_thread() is threading.main_thread())
    except BaseException:
        ledger.close()
        lock.release()
        raise

    def execute() -> RunResult:
        try:
            return runner.run()
        finally:
            try:
                if exe is not None and cycle is None:  # a watch's executor lives as long as the watch
                    exe.close()
            finally:
                ledger.close()
                lock.release()

    if background:
        return RunHandle(runner, execute)
    if ui_events is not None:
        return _wait_processing_ui_events(RunHandle(runner, execute), ui_events)
    return execute()


def _api_call(pipeline: Any, steps: list[str], parameters: Mapping[str, Any] | None, choice: dict[str, bool],
              grid: Mapping[str, Any] | None = None, secrets: tuple[str, ...] = ()) -> str:
    """The API call that started a run, as the ledger records it (secrets redacted)."""
    from .state import redact  # noqa: PLC0415

    args = [repr(str(pipeline))] + ([repr(steps)] if steps else [])
    if parameters:
        args.append(f"parameters={redact(dict(parameters), secrets)!r}")
    args += [f"{k}=True" for k, v in choice.items() if v]
    if grid:
        args.append(f"grid={dict(grid)!r}")
    return f"nbflow.run({', '.join(args)})"


def _valid_graph(pipeline: str | os.PathLike, steps: list[str], parameters: Mapping[str, Any] | None,
                 choice: dict[str, bool], grid: Mapping[str, Mapping[str, Any]] | None = None) -> Graph:
    """The graph, or a PipelineError with every problem, planning's too, without creating or locking _nbflow/."""
    from .plan import make_plan  # noqa: PLC0415
    from .state import Ledger  # noqa: PLC0415

    problems: list[Problem] = []
    graph = build_graph(pipeline, collect=problems, grid=grid)
    if not problems:
        _require_steps(graph)
        return graph
    history = Ledger(graph.state_dir, create=False)
    try:
        make_plan(graph, history, steps, parameters, **choice)
    except PipelineError as e:
        problems += e.problems
    finally:
        history.close()
    raise PipelineError(problems)


def _take_pipeline(graph: Graph, run_id: str) -> tuple["RunLock", "Ledger"]:
    """Lock the pipeline and open its ledger; record what a killed nbflow left running and kill its orphans."""
    from .state import Ledger, RunLock, reap_orphans  # noqa: PLC0415

    lock = RunLock(graph.state_dir)
    try:
        lock.acquire(run_id)
    except PipelineLocked as busy:
        from . import audit  # noqa: PLC0415

        if os.environ.get(audit.TRIGGER_ENV) == "schedule":  # a tick while the last run goes on: say so, later
            ledger = Ledger(graph.state_dir)
            try:
                ledger.record_skipped(run_id, {**audit.collect(graph.root, audit.command_line(graph.config.secrets),
                                                               packages={}),
                                               "skipped": str(busy)})
            finally:
                ledger.close()
        raise
    try:
        ledger = Ledger(graph.state_dir)
        interrupted = ledger.mark_interrupted()
    except BaseException:
        lock.release()
        raise
    if lock.stale and lock.stale.get("run_id") not in (None, "clean", "repair"):
        interrupted.append(lock.stale["run_id"])
    if interrupted:
        reap_orphans(graph.root, interrupted)
    return lock, ledger


def _widget(graph: Graph, plan: Any, options: dict[str, Any]) -> Any:
    from .ui.widget import RunWidget  # noqa: PLC0415

    widget = RunWidget(graph, plan, options=options)
    widget.show()
    return widget


def _alert_hooks(graph: Graph) -> list[Listener]:
    if not (graph.config.on_failure or graph.config.on_success):
        return []
    from .ui.alerts import AlertHooks  # noqa: PLC0415

    return [AlertHooks(graph.root, graph.config.on_success, graph.config.on_failure)]


def _lineage_listener(graph: Graph) -> list[Listener]:
    """OpenLineage events, when nbflow.yaml or the OpenLineage client's environment turns them on."""
    from .ui.openlineage import OpenLineageListener, lineage_settings  # noqa: PLC0415 - stdlib only until on

    settings = lineage_settings(graph.config.openlineage, os.environ)
    return [] if settings is None else [OpenLineageListener(graph, settings)]


def start(pipeline: str | os.PathLike = ".", steps: Iterable[str] | str = (), **options: Any) -> RunHandle:
    """Start a run in a background thread and return its handle at once: `.wait()`, `.cancel()`, `.result`.

    Takes the same options as `run` (`nbflow.run(..., background=True)` is the same call).
    """
    handle = run(pipeline, steps, background=True, **options)
    assert isinstance(handle, RunHandle)
    return handle


def watch(pipeline: str | os.PathLike = ".", steps: Iterable[str] | str = (), *,
          parameters: Mapping[str, Any] | None = None, only: bool = False, jobs: int | None = None,
          executor: str | None = None, dask_address: str | None = None, fail_fast: bool = False,
          listeners: Iterable[Listener] = (), display: bool | None = None,
          call: "str | Callable[[tuple[str, ...]], str] | None" = None) -> "WatchHandle":
    """Rerun what goes stale whenever a notebook, a declared input or an imported project module changes on disk.

    First runs what is stale now, then a cycle after each change: a save storm is one cycle, never two
    runs at once (what changes during a run queues one more). Each cycle is an ordinary run, in the
    ledger. Returns at once with a WatchHandle (`.stop()`, `.wait()`, `.cycles`): the watch goes on in
    a background thread, so a notebook's kernel stays free. In Jupyter a live widget shows each cycle
    (what changed, what reran) with a Stop button (display=False turns it off). Needs
    `pip install "nbflow[watch]"`.
    """
    from .watcher import Watch, WatchHandle, require_watchfiles  # noqa: PLC0415

    require_watchfiles()
    root = _existing_folder(pipeline)
    steps = [steps] if isinstance(steps, str) else list(steps)
    display = _in_jupyter() if display is None else display
    widget = None
    if display:
        from .ui.watch_widget import WatchWidget  # noqa: PLC0415

        widget = WatchWidget(root)
        widget.show()
    options = {"parameters": parameters, "only": only, "jobs": jobs, "executor": executor,
               "dask_address": dask_address, "fail_fast": fail_fast,
               "call": call or f"nbflow.watch({str(pipeline)!r}{', ' + repr(steps) if steps else ''})"}
    loop = Watch(root, tuple(steps), options, ([widget] if widget else []) + list(listeners))
    handle = WatchHandle(loop)
    if widget is not None:
        widget.attach(handle.stop)
    return handle


def _wait_processing_ui_events(handle: RunHandle, ui_events) -> RunResult:
    """Wait for a run in the cell while the kernel handles widget events (the Cancel button).

    Interrupting the kernel cancels the run; the cell still waits until it has
    finished cleanly and returns its RunResult. Cells queued meanwhile run
    after this one (jupyter-ui-poll holds them back and replays them).
    """
    try:
        with ui_events() as poll:
            while not handle.done:
                try:
                    poll(20)
                    handle.wait(0.05)
                except KeyboardInterrupt:
                    handle.cancel()
    except KeyboardInterrupt:  # on the way into or out of the polling: wait without it
        handle.cancel()
    while not handle.done:
        try:
            handle.wait(0.1)
        except KeyboardInterrupt:
            handle.cancel()
    result = handle.wait()
    assert result is not None
    return result


def _ui_poller():
    """jupyter-ui-poll's `ui_events` when it can hand widget clicks to a waiting cell here, else None.

    It can in the main thread of an ipykernel 6 kernel, which queues shell
    messages for `do_one_iteration`. ipykernel 7.0 reads them on a thread of
    its own (kernel subshells) and 7.1 removed `do_one_iteration`: there
    jupyter-ui-poll (1.1.0) processes nothing, and the widget has to point to
    the kernel's interrupt instead of offering a Cancel button that no click
    reaches.
    """
    if threading.current_thread() is not threading.main_thread() or not _in_jupyter():
        return None
    try:
        import ipykernel  # noqa: PLC0415
        from jupyter_ui_poll import ui_events  # noqa: PLC0415
    except ImportError:
        return None
    if int(str(ipykernel.__version__).split(".")[0]) >= 7:
        return None
    return ui_events


class _NoExecutor:
    """Used when every step is fresh: no kernel machinery is imported or started."""

    def submit(self, task, emit):
        raise RuntimeError("no executor: every step was fresh when the run was planned")

    def prestart(self, task) -> None:
        pass

    def cancel(self) -> None:
        pass

    def close(self) -> None:
        pass


def history(pipeline: str | os.PathLike = ".", limit: int | None = None) -> "pandas.DataFrame":
    """Past runs, newest first, as a pandas DataFrame."""
    import pandas as pd  # noqa: PLC0415

    rows = runs(pipeline, limit)
    frame = pd.DataFrame(rows, columns=["run_id", "started_at", "finished_at", "status", "duration_s", "steps",
                                        "parameters", "pid", "host"])
    for col in ("started_at", "finished_at"):
        frame[col] = pd.to_datetime(frame[col], unit="s", utc=True)
    return frame


def runs(pipeline: str | os.PathLike = ".", limit: int | None = None, *, idle: bool = True) -> list[dict[str, Any]]:
    """Past runs, newest first, as plain dicts (what `nbflow history --json` prints).

    `idle=False` leaves out the runs where nothing ran (every step was fresh).
    """
    with read_ledger(pipeline) as ledger:
        found = ledger.runs(None if not idle else limit)
    if not idle:
        found = [r for r in found if not is_idle(r)]
    return found[:limit] if limit else found


def is_idle(run: dict[str, Any]) -> bool:
    """A run where nothing ran: it succeeded and every step was skipped as fresh."""
    return run["status"] == "succeeded" and set(run["steps"]) <= {"skipped"}


def show(pipeline: str | os.PathLike = ".", run_id: str = "latest") -> dict[str, Any]:
    """One run (a unique prefix of its id, or "latest"): the run's record and every step attempt with its files."""
    with read_ledger(pipeline) as ledger:
        chosen = ledger.find_run(run_id)
        [record] = ledger.runs(run_id=chosen)
        return {**record, "steps": ledger.step_runs(chosen)}


def lineage(pipeline: str | os.PathLike, path: str | os.PathLike) -> dict[str, Any]:
    """Which run and step made `path` (relative to the current folder), with what parameters, from what.

    Follows the chain back to source data: each input made by a step has
    `made_by` with the same shape; source data has `made_by: None`.
    """
    from .errors import CommandError  # noqa: PLC0415
    from .state import sha256_file  # noqa: PLC0415

    with read_ledger(pipeline) as ledger:
        root = ledger.root
        url = stores.is_url(os.fspath(path))
        rel = stores.normalise(os.fspath(path)) if url else Path(os.path.relpath(Path(path).absolute(), root)).as_posix()

        def made(rel_path: str, seen: frozenset[str]) -> dict[str, Any] | None:
            info = ledger.lineage(rel_path)
            if info is None or rel_path in seen:
                return None
            for item in info["inputs"]:
                item["made_by"] = made(item["path"], seen | {rel_path})
            return info

        info = made(rel, frozenset())
    if info is None:
        raise CommandError(f"{rel}: no successful run recorded this file as an output (source data, or never "
                           "made by a step of this pipeline)")
    info["path"] = rel
    if url:  # the object's identity in its store now (its ETag), against the one recorded
        now = stores.identity(rel, load_config(root).storage)
        info["current_matches"] = now is not None and now[0] == info["sha256"]
        return info
    full = root / rel
    info["current_matches"] = full.is_file() and sha256_file(full) == info["sha256"]
    return info


def schedule(pipeline: str | os.PathLike = ".", cron: str | None = None, *, install: bool = False,
             systemd: bool = False) -> "Schedule":
    """How to run the pipeline on a schedule (`cron`, else `schedule:` of nbflow.yaml).

    The crontab line, or with `systemd` a timer and service unit pair; `install`
    adds the line to the user's crontab (or writes and enables the units).
    """
    from . import scheduling  # noqa: PLC0415

    graph = build_graph(pipeline)
    source = "--cron"
    if cron is None:
        source = f"'schedule:' in {graph.root / 'nbflow.yaml'}"
        cron = graph.config.schedule
        if not cron:
            raise PipelineError(f'no schedule for {graph.root}: give one with --cron "0 6 * * *" or set '
                                f"`schedule: \"0 6 * * *\"` in {graph.root / 'nbflow.yaml'}")
    expression, upcoming = scheduling.next_times(cron, source)
    layout = graph.layout
    layout.state_dir.mkdir(exist_ok=True)  # the log's folder must exist before the first scheduled run
    line = scheduling.cron_line(expression, graph.root, layout.cron_log)
    units = scheduling.systemd_units(expression, graph.root, layout.cron_log) if systemd else None
    warning = None
    if install and units:
        scheduling.install_systemd(units)
    elif install:
        scheduling.install(line, graph.root)
        warning = scheduling.no_cron_daemon()
    return scheduling.Schedule(expression, line, upcoming, layout.cron_log, install, warning, units)


@contextmanager
def read_ledger(pipeline: str | os.PathLike = ".") -> Iterator["Ledger"]:
    """The ledger of an existing pipeline folder, opened to read (empty if the pipeline never ran)."""
    from .state import Ledger  # noqa: PLC0415

    ledger = Ledger(StateLayout(_existing_folder(pipeline)).state_dir, create=False)
    try:
        yield ledger
    finally:
        ledger.close()


def clean(pipeline: str | os.PathLike = ".", keep: int = 10, *, left_behind: bool = False,
          grid: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Remove the executed notebooks of all but the `keep` newest runs, earlier attempts included.

    The ledger keeps the runs' records. Returns the run ids whose notebooks
    were removed and those kept: `{"removed": [...], "kept": [...]}`.

    With `left_behind`, removes instead (and only) the outputs that
    `Pipeline(pipeline, grid).left_behind()` lists: those of grid instances
    no longer in the grid. Returns them: `{"left_behind": [{"step", "path", "why"}]}`.
    """
    import shutil  # noqa: PLC0415

    from .errors import StateError  # noqa: PLC0415
    from .state import RunLock  # noqa: PLC0415

    if left_behind:
        return _clean_left_behind(Pipeline(pipeline, grid))

    if keep < 1:
        raise PipelineError(Problem(f"keep must be at least 1, not {keep}: the newest run's notebooks are the "
                                    "ones `latest/` and the report point to"))
    layout = StateLayout(_existing_folder(pipeline))
    if not layout.state_dir.is_dir():
        raise PipelineError(Problem(f"{layout.root} has no {STATE_DIR}/ folder: not a pipeline that has run, "
                                    "nothing to clean"))
    lock = RunLock(layout.state_dir)
    lock.acquire("clean")
    try:
        run_ids = sorted({p.name for p in _folders(layout.runs_dir)} | {p.name for p in _folders(layout.attempts_dir)})
        removed, kept = run_ids[:-keep], run_ids[-keep:]
        for run_id in removed:
            # earlier attempts of a run: attempts/<run_id>/ (see StateLayout.attempt)
            for folder in (layout.run_dir(run_id), layout.attempts_dir / run_id):
                try:
                    shutil.rmtree(folder)
                except FileNotFoundError:
                    pass
                except OSError as e:
                    raise StateError(f"cannot remove {folder}: {e.strerror}; check that {layout.state_dir} is "
                                     "writable") from None
    finally:
        lock.release()
    return {"removed": removed, "kept": kept}


def _clean_left_behind(pipeline: Pipeline) -> dict[str, Any]:
    import shutil  # noqa: PLC0415

    from .errors import StateError  # noqa: PLC0415
    from .state import RunLock  # noqa: PLC0415

    lock = RunLock(pipeline._graph.state_dir)
    lock.acquire("clean")
    try:
        found = pipeline.left_behind()  # under the lock: no run writes an instance meanwhile
        for item in found:
            path = pipeline.root / item["path"]
            try:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
            except FileNotFoundError:
                pass
            except OSError as e:
                raise StateError(f"cannot remove {path}: {e.strerror}") from None
    finally:
        lock.release()
    return {"left_behind": found}


def repair(pipeline: str | os.PathLike = ".") -> dict[str, Any]:
    """Move a damaged run ledger aside, so that the next run starts a new one (and runs every step once).

    Checks the ledger first (PRAGMA integrity_check) and moves nothing when it
    is sound. Returns `{"ledger", "damage" (None when sound or absent), "moved"}`.
    """
    from .errors import LedgerDamaged  # noqa: PLC0415
    from .state import Ledger, RunLock, set_ledger_aside  # noqa: PLC0415

    layout = StateLayout(_existing_folder(pipeline))
    report: dict[str, Any] = {"ledger": str(layout.ledger), "damage": None, "moved": []}
    if not layout.ledger.exists():
        return report
    lock = RunLock(layout.state_dir)
    lock.acquire("repair")
    try:
        try:
            ledger = Ledger(layout.state_dir, create=False)
            try:
                ledger.check(thorough=True)
            finally:
                ledger.close()
        except LedgerDamaged as e:
            report["damage"] = e.detail
            report["moved"] = [str(p) for p in set_ledger_aside(layout.state_dir)]
    finally:
        lock.release()
    return report


def _existing_folder(pipeline: str | os.PathLike) -> Path:
    root = Path(pipeline).absolute()
    if not root.is_dir():
        raise PipelineError(Problem(f"pipeline folder {str(root)!r} does not exist or is not a folder"))
    return root


def _folders(parent: Path) -> list[Path]:
    return [p for p in parent.iterdir() if p.is_dir()] if parent.is_dir() else []


def _require_steps(graph: Graph) -> None:
    """A folder without a step is not a pipeline: `run` and `status` both say so (exit 2)."""
    if not graph.steps:
        seen = f" ({len(graph.not_steps)} notebook(s) without one)" if graph.not_steps else ""
        raise PipelineError(Problem(f"no steps in {graph.root}: no notebook there has a cell tagged "
                                    f"'parameters'{seen}; check the folder, or tag each step's parameters cell"))


def _in_jupyter() -> bool:
    import sys  # noqa: PLC0415

    if "IPython" not in sys.modules:
        return False
    from IPython import get_ipython  # noqa: PLC0415

    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None
