"""The Runner: runs a plan on an executor and emits events. It never prints.

Owns: the order of execution (graphlib's prepare / get_ready / done), at most
`jobs` steps at a time, kernel prestart hints, retries with exponential
backoff, fail-fast, not_run for dependents of a failure, the runtime freshness
re-check (a step whose upstream reran with identical outputs is skipped),
cancellation, and the RunResult. Everything that shows or stores what happens
is a listener.
"""

from __future__ import annotations

import contextlib
import graphlib
import heapq
import logging
import os
import queue
import signal
import threading
import time
from dataclasses import replace
from typing import Any, Iterable, Iterator

from . import stores
from .errors import StateError
from .grid import folded, partition
from .events import (Event, Listener, RunFinished, RunResult, RunStarted, RunStatus, StepCancelled, StepFailed,
                     StepNotRun, StepResult, StepSkipped, StepStatus, StepSucceeded)
from .executors import Executor, StepOutcome, StepTask
from .layout import StateLayout, new_run_id
from .imports import missing_module_hint
from .params import jsonable
from .plan import Plan, kernel_of
from .settings import RunSettings
from .state import Ledger, assess, fingerprint
from .state import redact as _redact

log = logging.getLogger("nbflow")


# failures another attempt would meet the same way: no kernel for it, a worker that cannot see its files,
# a cluster whose scheduler is gone
_NOT_RETRIED = ("kernel_start", "not_here", "scheduler_lost")


def _make_partition_folders(task: StepTask) -> None:
    """An instance's partition folders exist before it runs: nbflow chose them, the notebook did not."""
    for label, path in task.outputs:
        if "://" in path or label.startswith("value "):
            continue
        try:  # the folder the output goes in (a folder output itself is the notebook's to make)
            os.makedirs(os.path.dirname(path), exist_ok=True)
        except OSError:
            pass  # the notebook's own attempt will name the problem


class Runner:
    """Runs a Plan. `listeners` see every event in order, on the Runner's thread."""

    def __init__(self, plan: Plan, ledger: Ledger, executor: Executor, *, listeners: Iterable[Listener] = (),
                 recorder: Listener | None = None, settings: RunSettings | None = None, run_id: str | None = None,
                 audit: dict[str, Any] | None = None):
        self.plan = plan
        self.graph = plan.graph
        self.ledger = ledger
        self.executor = executor
        self.listeners = list(listeners)
        self.recorder = recorder
        self.settings = settings or RunSettings(jobs=1, executor="local")
        self.jobs = self.settings.jobs
        self.fail_fast = self.settings.fail_fast
        self.run_id = run_id or new_run_id()
        self.audit = audit or {}
        self._inbox: queue.Queue = queue.Queue()
        self._cancelled = threading.Event()
        self._running: dict[str, StepTask] = {}  # submitted to the executor, outcome not yet received
        self.results: dict[str, StepResult] = {}

    # -- called from any thread ------------------------------------------------------
    def cancel(self) -> None:
        """Stop the run: running kernels are stopped, notebooks saved, the run is `cancelled`."""
        if not self._cancelled.is_set():
            self._cancelled.set()
            self.executor.cancel()
            self._inbox.put(("cancel", None))

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    # -- the run ---------------------------------------------------------------------
    def emit(self, event: Event) -> None:
        if self.recorder is not None:
            self.recorder(event)  # the ledger: its failure (disk full) stops the run
        for listener in self.listeners:
            try:
                listener(event)
            except Exception:  # noqa: BLE001 - a display bug must not stop a pipeline
                log.exception("listener %r failed on %s", listener, type(event).__name__)

    def run(self) -> RunResult:
        started = time.time()
        planned = {p.name: p for p in self.plan.steps}
        self.results = {name: StepResult(name, StepStatus.PENDING, reasons=p.reasons) for name, p in planned.items()}
        self.emit(RunStarted(self.run_id, str(self.graph.root), started, self.plan.steps,
                             _redact(dict(self.plan.overrides), set(self.graph.config.secrets)), self.audit))
        error: Exception | None = None
        try:
            self._loop(planned)
        except KeyboardInterrupt:
            with self._interrupts_deferred():
                self.cancel()
                self._drain_after_error()
        except Exception as e:  # noqa: BLE001 - the ledger cannot be written, or anything else: end the run, then raise
            error = e
            with self._interrupts_deferred():
                self.cancel()
                self._drain_after_error()
        with self._interrupts_deferred():  # the run's end is recorded whatever Ctrl-C comes now
            return self._finish_run(started, error)

    def _finish_run(self, started: float, error: Exception | None) -> RunResult:
        status = RunStatus.SUCCEEDED
        if error is not None and not isinstance(error, StateError):
            status = RunStatus.FAILED  # not left `running` in the ledger; the error is raised below
        elif self.cancelled:
            status = RunStatus.CANCELLED
        elif any(r.status in (StepStatus.FAILED, StepStatus.NOT_RUN, StepStatus.CANCELLED)
                 for r in self.results.values()):
            status = RunStatus.FAILED
        result = RunResult(self.run_id, str(self.graph.root), status, dict(self.results), started, time.time())
        try:
            self.emit(RunFinished(result))
        except StateError as e:
            error = error or e
        if error is not None:
            raise error
        return result

    @contextlib.contextmanager
    def _interrupts_deferred(self) -> Iterator[None]:
        """While the run winds down, Ctrl-C (SIGINT in the main thread) cancels instead of raising.

        A KeyboardInterrupt that lands while the notebooks are saved and the
        ledger is written would leave the run half recorded; the first Ctrl-C
        already cancelled it, and the wind-down is bounded by the steps' own
        cancellation.
        """
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.signal(signal.SIGINT, lambda *_: self.cancel())
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def _loop(self, planned: dict[str, Any]) -> None:
        self._planned = planned
        position = {name: i for i, name in enumerate(self.graph.order)}.__getitem__  # a grid in its own order
        self._sorter = graphlib.TopologicalSorter(
            {n: [u for u in self.graph.upstream[n] if u in planned] for n in planned})
        self._sorter.prepare()
        self._retry_at: list[tuple[float, str, StepTask]] = []
        self._failed_any = False
        self._parts: dict[str, dict] = {}
        ready: list[str] = []
        while self._sorter.is_active() or self._running or self._retry_at:
            ready = self._decide_without_running(ready)  # waiting for a free slot: a cancel or --fail-fast stops them
            ready += self._still_stale(self._decide_without_running(sorted(self._sorter.get_ready(), key=position)))
            if self.cancelled and (ready or self._retry_at):
                for name in ready + [n for _, n, _ in self._retry_at]:
                    self.emit(StepCancelled(name, 0, 0.0, None))
                    self._settle(name, replace(self.results[name], status=StepStatus.CANCELLED))
                ready, self._retry_at = [], []
                continue
            while ready and len(self._running) < self.jobs:
                self._submit(self._task(ready.pop(0), attempt=1))
            self._prestart(ready)
            if self._running or self._retry_at:
                self._wait_for_news()

    def _settle(self, name: str, result: StepResult) -> None:
        self.results[name] = result
        self._sorter.done(name)

    def _decide_without_running(self, names: list[str]) -> list[str]:
        """Settle the steps that are cancelled, not run, or planned as fresh; return the others."""
        blocking = (StepStatus.FAILED, StepStatus.NOT_RUN, StepStatus.CANCELLED)
        to_run: list[str] = []
        for name in names:
            bad = [u for u in self.graph.upstream[name] if u in self.results and self.results[u].status in blocking]
            if self.cancelled:
                self.emit(StepCancelled(name, 0, 0.0, None))
                self._settle(name, replace(self.results[name], status=StepStatus.CANCELLED))
            elif bad or (self.fail_fast and self._failed_any):
                self.emit(StepNotRun(name, bad[0] if bad else "--fail-fast"))
                self._settle(name, replace(self.results[name], status=StepStatus.NOT_RUN))
            elif self._planned[name].action == "skip":
                self.emit(StepSkipped(name, self._planned[name].reasons))
                self._settle(name, replace(self.results[name], status=StepStatus.SKIPPED))
            else:
                to_run.append(name)
        return to_run

    def _still_stale(self, names: list[str]) -> list[str]:
        """Assess again now that the upstream ran: a step whose inputs came out byte-identical is skipped."""
        stale: list[str] = []
        for name in names:
            fresh = assess(self.graph, name, self.plan.parameters[name], self.ledger, (),
                           kernel_of(self.graph, name))
            if name not in self.plan.forced and fresh.fresh:
                reran = tuple(u for u in self.graph.upstream[name]
                              if u in self.results and self.results[u].status == StepStatus.SUCCEEDED)
                reasons = (f"upstream {', '.join(folded(reran))} reran, inputs unchanged",) if reran else ("fresh",)
                self.emit(StepSkipped(name, reasons))
                self._settle(name, replace(self.results[name], status=StepStatus.SKIPPED, reasons=reasons))
                continue
            self._parts[name] = fresh.parts
            stale.append(name)
        return stale

    def _wait_for_news(self) -> None:
        """Wait for an event or a finished step (or the next retry's time), and handle it."""
        timeout = max(0.0, self._retry_at[0][0] - time.time()) if self._retry_at else None
        try:
            kind, payload = self._inbox.get(timeout=timeout)
        except queue.Empty:
            kind, payload = "tick", None
        if kind == "event":
            self.emit(payload)
        elif kind == "done":
            outcome: StepOutcome = payload
            task = self._running.pop(outcome.step)
            self._failed_any |= self._finish(outcome, task)
        while self._retry_at and self._retry_at[0][0] <= time.time() and len(self._running) < self.jobs:
            _, name, task = heapq.heappop(self._retry_at)
            if not self.cancelled:
                self._submit(task)

    def _finish(self, outcome: StepOutcome, task: StepTask) -> bool:
        """Record how an attempt ended: success, cancel, a retry to schedule, or a failure. True for a failure."""
        name = outcome.step
        prev = self.results[name]
        if outcome.status == StepStatus.SUCCEEDED:
            storage = self.graph.config.storage
            inputs = self.ledger.file_records(self.graph.inputs_of(name), storage)
            outputs = self.ledger.file_records(self.graph.outputs_of(name), storage)
            parts = self._parts[name]
            self.emit(StepSucceeded(name, outcome.attempt, outcome.duration_s, outcome.notebook or "",
                                    fingerprint(parts), parts, jsonable(self.plan.parameters[name]),
                                    inputs, outputs, outcome.started_at, outcome.worker))
            self._settle(name, StepResult(name, StepStatus.SUCCEEDED, outcome.attempt, outcome.duration_s,
                                    outcome.notebook, None, prev.reasons))
            return False
        if outcome.status == StepStatus.CANCELLED:
            self.emit(StepCancelled(name, outcome.attempt, outcome.duration_s, outcome.notebook, outcome.started_at))
            self._settle(name, StepResult(name, StepStatus.CANCELLED, outcome.attempt, outcome.duration_s,
                                    outcome.notebook, outcome.error, prev.reasons))
            return False
        settings = self.graph.config.for_step(name)
        assert outcome.error is not None
        error = outcome.error
        if error.ename == "ModuleNotFoundError":
            step = self.graph.steps[name]
            hint = missing_module_hint(error.evalue, step.folder, self.graph.root)
            if hint:
                error = replace(error, evalue=error.evalue + hint)
                outcome = replace(outcome, error=error)
        will_retry = (outcome.attempt <= settings.retries and not self.cancelled
                      and error.kind not in _NOT_RETRIED)
        delay = settings.retry_delay * (2 ** (outcome.attempt - 1)) if will_retry else 0.0
        self.emit(StepFailed(name, outcome.attempt, outcome.duration_s, outcome.notebook, error,
                             will_retry, delay, jsonable(self.plan.parameters[name]), outcome.started_at))
        if will_retry:
            heapq.heappush(self._retry_at, (time.time() + delay, name, self._task(name, outcome.attempt + 1)))
            self.results[name] = replace(prev, status=StepStatus.RUNNING, attempts=outcome.attempt,
                                         error=outcome.error)
            return False
        self._settle(name, StepResult(name, StepStatus.FAILED, outcome.attempt, outcome.duration_s, outcome.notebook,
                                outcome.error, prev.reasons))
        return True

    def _submit(self, task: StepTask) -> None:
        self._running[task.step] = task
        if self.graph.steps[task.step].grid:
            _make_partition_folders(task)
        self.results[task.step] = replace(self.results[task.step], status=StepStatus.RUNNING, attempts=task.attempt)

        def emit(event: Event) -> None:
            self._inbox.put(("event", event))

        future = self.executor.submit(task, emit)

        def done(f) -> None:
            try:
                outcome = f.result()
            except BaseException as e:  # noqa: BLE001 - an executor bug still ends the step
                from .events import StepError  # noqa: PLC0415

                outcome = StepOutcome(task.step, task.attempt, StepStatus.FAILED, time.time(), 0.0, None,
                                      StepError("exception", type(e).__name__, f"executor error: {e}"))
            self._inbox.put(("done", outcome))

        future.add_done_callback(done)

    def _prestart(self, ready: list[str]) -> None:
        """Ask for kernels for the steps that start next: those waiting for a free slot, then those that will be
        ready once what runs now finishes. (A pool that keeps warm forks needs no hint for a kernel it can fork:
        it starts the next one whenever one is taken.)"""
        running = self._running
        soon = [n for n in self.plan.to_run
                if self.results[n].status == StepStatus.PENDING and n not in ready
                and all(u in running or self.results.get(u, StepResult(u, StepStatus.SUCCEEDED)).status
                        in (StepStatus.SUCCEEDED, StepStatus.SKIPPED) for u in self.graph.upstream[n])
                and any(u in running for u in self.graph.upstream[n])]
        for name in (ready + soon)[: self.jobs]:
            self.executor.prestart(self._task(name, attempt=1))

    def _task(self, name: str, attempt: int) -> StepTask:
        graph = self.graph
        step = graph.steps[name]
        settings = graph.config.for_step(name)
        layout = StateLayout(graph.root)
        # `storage:` reaches the step's own fsspec (pandas, pyarrow) as fsspec's configuration variables
        env = {**stores.fsspec_env(graph.config.storage), **self.plan.env.get(name, {}),
               "NBFLOW_VALUES_DIR": str(layout.values_dir),
               "NBFLOW_PYTHONPATH": os.pathsep.join(str(p) for p in graph.python_path()),
               "NBFLOW_RUN_ID": self.run_id, "NBFLOW_STEP": name, "NBFLOW_PIPELINE": str(graph.root),
               "NBFLOW_ATTEMPT": str(attempt)}
        if step.grid:  # nbflow.glue in an instance publishes under its partition folders
            env["NBFLOW_GRID_PARTITION"] = partition(step.grid)
        return StepTask(
            step=name, run_id=self.run_id, attempt=attempt, source=str(step.path), rel_source=step.rel_path,
            cwd=str(step.folder), root=str(graph.root), executed=str(layout.executed(self.run_id, name)),
            latest=str(layout.latest(name)), attempt_copy=str(layout.attempt(self.run_id, name, attempt)),
            parameters=self.plan.parameters[name],
            parameters_cell=step.parameters_cell, kernel=kernel_of(graph, name), language=step.language,
            outputs=tuple((ref.label, str(ref.path)) for ref in graph.outputs_of(name)), env=env,
            inputs=tuple((ref.label, str(ref.path)) for ref in graph.inputs_of(name)),
            timeout=settings.timeout, cell_timeout=settings.cell_timeout, retries=settings.retries,
            use_forkserver=self.settings.forkserver, forkserver_off=self.settings.forkserver_off,
            reasons=self.results[name].reasons, storage=graph.config.storage)

    def _drain_after_error(self) -> None:
        """After a cancel caused by an error, wait for running steps to save their notebooks."""
        deadline = time.time() + 60
        pending = set(self._running)  # submitted and not yet done (a step waiting to retry is not)
        while pending and time.time() < deadline:
            try:
                kind, payload = self._inbox.get(timeout=1)
            except queue.Empty:
                continue
            if kind == "event":
                self._emit_after_error(payload)
            elif kind == "done":
                pending.discard(payload.step)
                self._emit_after_error(StepCancelled(payload.step, payload.attempt, payload.duration_s,
                                                     payload.notebook, payload.started_at))
                self.results[payload.step] = replace(self.results[payload.step], status=StepStatus.CANCELLED,
                                                     notebook=payload.notebook, duration_s=payload.duration_s,
                                                     error=payload.error)
        for name, r in self.results.items():
            if r.status in (StepStatus.PENDING, StepStatus.RUNNING):
                self._emit_after_error(StepCancelled(name, 0, 0.0, None))
                self.results[name] = replace(r, status=StepStatus.CANCELLED)

    def _emit_after_error(self, event: Event) -> None:
        try:
            self.emit(event)
        except StateError:
            pass  # the ledger cannot be written: the next run records this one as interrupted
