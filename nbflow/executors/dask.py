"""The dask executor: each step runs as a task on a dask.distributed cluster.

Owns: connecting to a cluster (or starting a LocalCluster with one
single-threaded worker process per job), shipping StepTasks to workers,
relaying the events a worker emits back to the Runner (a dask Queue), and
cancelling: a cluster-wide dask Event that every running step watches, so its
kernel is stopped and its notebook saved on the worker.

On a worker, the steps of a run share one kernel pool (one fork server and a
warm fork per worker thread, as the local executor's), released when the run
ends. Workers need not see the pipeline folder: the task carries the notebook's
JSON, the worker runs it in a scratch copy of the pipeline's layout (in the
notebook's own folder when the worker sees the pipeline), and the executed
notebooks (a partial one too) come back to the driver, which writes them
under `_nbflow/`. A step that declares local paths runs only on a worker that
sees the same pipeline folder; elsewhere it fails before its kernel starts.
A worker lost mid-step costs an attempt: dask runs the task again on another
worker, and the relay records the lost attempt as failed. The scheduler lost
mid-run fails the steps running then, and those submitted after, naming its
address (the run ends `failed`, what finished is kept); a worker stops its
step's kernel when it closes, as it does when it loses its scheduler.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path

from typing import TYPE_CHECKING

from ..errors import PipelineError
from ..events import StepError, StepFailed, StepStarted, StepStatus
from . import Emit, StepOutcome, StepTask

if TYPE_CHECKING:
    from ..settings import RunSettings


def _import_distributed():
    try:
        import distributed  # noqa: PLC0415
    except ImportError:
        raise PipelineError("the dask executor needs dask.distributed: pip install 'nbflow[dask]'") from None
    return distributed


class DaskExecutor:
    def __init__(self, settings: "RunSettings"):
        jobs, address = settings.jobs, settings.dask_address
        distributed = _import_distributed()
        self.cluster = None
        if address:
            try:
                self.client = distributed.Client(address, timeout="10s")
            except OSError as e:
                raise PipelineError(f"cannot reach the dask scheduler at {address}: {e}; check --dask-address") \
                    from None
        else:
            self.cluster = distributed.LocalCluster(n_workers=jobs, threads_per_worker=1, processes=True,
                                                    dashboard_address=":0", silence_logs=40)
            self.client = distributed.Client(self.cluster)
        self.address = address or self.client.scheduler.address
        try:
            self.topic = f"nbflow-{uuid.uuid4().hex}"
            self.cancel_event = distributed.Event(f"{self.topic}-cancel", client=self.client)
            self._events = distributed.Queue(self.topic, client=self.client)
        except BaseException:
            self._shutdown()
            raise
        try:  # the workers' fork servers boot now, while the driver gets ready, as the local executor's does
            self.client.run(_start_run_kernels, self.topic, settings.forkserver, settings.forkserver_off)
        except Exception:  # noqa: BLE001, S110 - a worker that could not: its first task of the run starts its pool
            pass
        self._emit: Emit | None = None
        self._started: dict[str, tuple[int, float, str]] = {}  # step -> (times started, when, notebook)
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._relay = threading.Thread(target=self._relay_events, name="nbflow-dask-events", daemon=True)
        self._relay.start()

    def _relay_events(self) -> None:
        while True:
            try:
                event = self._events.get()  # blocking: polling with a timeout makes the scheduler log errors
            except Exception:  # noqa: BLE001 - the client is closing
                return
            if event is None or self._closing.is_set():
                return
            if self._emit is not None:
                self._emit(self._renumbered(event))

    def _renumbered(self, event):
        """A step started again without an outcome: its worker was lost; that attempt failed, this is the next."""
        if not hasattr(event, "step") or not hasattr(event, "attempt"):
            return event
        with self._lock:
            known = self._started.get(event.step)
            if isinstance(event, StepStarted):
                if known is not None and self._emit is not None:
                    lost = StepError("worker_lost", "WorkerLost", "the dask worker running this step was lost "
                                     "(killed, out of memory, or its machine went away); dask runs it again on "
                                     "another worker")
                    self._emit(StepFailed(event.step, event.attempt + known[0] - 1, time.time() - known[1],
                                          None, lost, True, 0.0, {}, known[1]))
                runs = (known[0] + 1) if known else 1
                self._started[event.step] = (runs, event.started_at, event.notebook)
                known = self._started[event.step]
            if known is None or known[0] == 1:
                return event
            return replace(event, attempt=event.attempt + known[0] - 1)

    def submit(self, task: StepTask, emit: Emit) -> "concurrent.futures.Future[StepOutcome]":
        self._emit = emit
        result: concurrent.futures.Future[StepOutcome] = concurrent.futures.Future()
        notebook = Path(task.source).read_text(encoding="utf-8")
        with self._lock:
            self._started.pop(task.step, None)
        lost = self._lost(task, None) if self._scheduler_lost() else None
        if lost is not None:  # the steps after the one that saw it go: each fails at once, none waits
            result.set_result(lost)
            return result
        future = self.client.submit(run_on_worker, task, notebook, self.topic, pure=False,
                                    key=f"nbflow-{task.step}-{task.attempt}-{uuid.uuid4().hex[:8]}")

        def done(f) -> None:
            try:
                try:
                    outcome, files = f.result()
                except BaseException as e:  # noqa: BLE001 - a lost scheduler or task is the step's failure
                    lost = self._lost(task, e)
                    if lost is None:
                        raise
                    result.set_result(lost)
                    return
                with self._lock:
                    runs = self._started.pop(task.step, (1, 0.0, ""))[0]
                for rel, text in files.items():  # the executed notebooks, written where the driver keeps them
                    target = Path(task.root) / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_text(text, encoding="utf-8")
                result.set_result(replace(outcome, attempt=outcome.attempt + runs - 1) if runs > 1 else outcome)
            except BaseException as e:  # noqa: BLE001 - handed to the Runner
                result.set_exception(e)

        future.add_done_callback(done)
        return result

    def _scheduler_lost(self) -> bool:
        """The client is no longer connected: the scheduler stopped, or its machine or the network went away."""
        return self.client.status not in ("running", "newly-created")

    def _lost(self, task: StepTask, error: BaseException | None) -> StepOutcome | None:
        """The failed outcome of a task dask lost (with its scheduler, or with every worker that ran it).

        None for any other error. The scheduler's loss cancels every future of the client; the step's kernel
        on the worker is stopped by the worker (see `_run`), its partial notebook stays there.
        """
        name = type(error).__name__
        if name == "KilledWorker":
            lost = StepError("worker_lost", "KilledWorker",
                             f"the step's task was lost with every dask worker that ran it ({error})")
        elif error is None or self._scheduler_lost() or "connection" in str(getattr(error, "reason", "")):
            said = getattr(error, "reason", None) or (str(error).splitlines() or [""])[0]  # a future's: why cancelled
            cause = "" if error is None else f" ({name}: {said})"
            lost = StepError("scheduler_lost", "SchedulerLost",
                             f"lost the connection to the dask scheduler at {self.address}{cause}: it stopped, or "
                             "its machine or the network went away; the step's kernel on the worker is stopped, "
                             "the steps that finished are kept; start the scheduler again (check --dask-address) "
                             "and run again")
        else:
            return None
        with self._lock:
            runs, started, _ = self._started.pop(task.step, (1, 0.0, ""))
        now = time.time()
        return StepOutcome(task.step, task.attempt + runs - 1, StepStatus.FAILED, started or now,
                           now - started if started else 0.0, None, lost)

    def prestart(self, task: StepTask) -> None:
        """Each worker keeps a warm fork for the run from the start (`_start_run_kernels`): no hint is needed."""

    def cancel(self) -> None:
        if self._scheduler_lost():  # nothing to tell: the workers close, and stop their steps' kernels
            return
        try:
            self.cancel_event.set()
        except Exception:  # noqa: BLE001, S110 - lost just now: the same
            pass

    def close(self) -> None:
        self._closing.set()
        if not self._scheduler_lost():  # else the relay's get has failed already, and a put would wait to connect
            try:
                # every step has ended: wakes the workers' watchers still waiting on the event (for up to 0.5 s),
                # whose wait the scheduler would else log as a cancelled-task traceback when the cluster closes
                self.cancel_event.set()
                self._events.put(None)
                self.client.run(_close_run_kernels, self.topic)  # each worker's pool of the run: fork server, warm fork
            except Exception:  # noqa: BLE001, S110 - lost just now: the workers close, and their pools with them
                pass
            self._relay.join(timeout=5)
        self._shutdown()

    def _shutdown(self) -> None:
        if self._scheduler_lost():
            # closing stops the client's attempts to reconnect, which distributed logs as an error with a
            # traceback (a CancelledError); the loss is each lost step's error already
            client_log = logging.getLogger("distributed.client")
            client_log.addFilter(_not_a_cancelled_reconnect)
            try:
                self.client.close()
            finally:
                client_log.removeFilter(_not_a_cancelled_reconnect)
        else:
            self.client.close()
        if self.cluster is not None:
            self.cluster.close()


def _not_a_cancelled_reconnect(record: logging.LogRecord) -> bool:
    return not (record.exc_info and isinstance(record.exc_info[1], asyncio.CancelledError))


def run_on_worker(task: StepTask, notebook: str, topic: str) -> tuple[StepOutcome, dict[str, str]]:
    """Runs inside a dask worker: one step on a fresh kernel, events published to `topic`.

    Returns the outcome and the executed notebooks written (path relative to
    the pipeline folder -> JSON text) for the driver to keep.
    """
    distributed = _import_distributed()
    queue = distributed.Queue(topic)
    worker = _this_worker(distributed)

    def events(event) -> None:
        if _worker_runs(worker):  # a closing worker has lost its scheduler: nobody to tell, and a put would wait
            queue.put(event)

    sees_pipeline = _same_notebook(task.source, notebook)
    local = [path for _, path in (*task.outputs, *task.inputs) if "://" not in path]
    if local and not sees_pipeline:
        from .step import blocked_outcome  # noqa: PLC0415

        shown = ", ".join(sorted({os.path.relpath(p, task.cwd) for p in local}))
        message = (f"this dask worker ({_worker_name(distributed)}) does not see the pipeline folder {task.root}, and "
                   f"the step declares local paths: {shown}; declare them as URLs (s3://..., gs://...) or give "
                   "the workers the pipeline folder at the same path (a shared file system)")
        return blocked_outcome(task, events, message), {}
    scratch = Path(tempfile.mkdtemp(prefix="nbflow-task-"))
    try:
        moved = _in_scratch(task, notebook, scratch, sees_pipeline)
        kernels = _RunKernels.take(topic, task.use_forkserver, task.forkserver_off, worker)
        try:
            outcome = _run(distributed, moved, events, topic, worker, kernels)
        finally:
            _RunKernels.give_back(topic, kernels)
        if not _worker_runs(worker):  # the worker closes (its scheduler is gone): no driver will release the pool;
            _RunKernels.release(topic, kernels)  # the last of its tasks to end does (the others still use it)
        files = {}
        for path in (moved.executed, moved.latest, moved.attempt_copy):
            if os.path.isfile(path):
                files[Path(path).relative_to(scratch).as_posix()] = Path(path).read_text(encoding="utf-8")
        return replace(outcome, worker=_worker_name(distributed)), files
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _this_worker(distributed):
    try:
        return distributed.get_worker()
    except ValueError:  # not in a worker (called directly)
        return None


def _worker_runs(worker) -> bool:
    """False once the worker closes: it does when it loses its scheduler (and when it is told to)."""
    from distributed.worker import WORKER_ANY_RUNNING  # noqa: PLC0415

    return worker is None or worker.status in WORKER_ANY_RUNNING


def _worker_name(distributed) -> str:
    worker = _this_worker(distributed)
    if worker is None:
        return "?"
    return str(worker.name if worker.name is not None else worker.address)


def _same_notebook(path: str, text: str) -> bool:
    try:
        return Path(path).read_text(encoding="utf-8") == text
    except OSError:
        return False


def _in_scratch(task: StepTask, notebook: str, scratch: Path, sees_pipeline: bool) -> StepTask:
    """The task with every file nbflow writes moved under `scratch` (the same layout as under the pipeline)."""
    root = Path(task.root)

    def moved(path: str) -> str:
        return str(scratch / Path(path).relative_to(root))

    source = Path(moved(task.source))
    source.parent.mkdir(parents=True, exist_ok=True)
    source.write_text(notebook, encoding="utf-8")
    return replace(task, source=str(source), root=str(scratch), executed=moved(task.executed),
                   latest=moved(task.latest), attempt_copy=moved(task.attempt_copy),
                   cwd=task.cwd if sees_pipeline else str(source.parent))


class _RunKernels:
    """The kernel pool of one run on this worker, on an event loop of its own (as the local executor's).

    Its fork server boots once per run and worker, not once per step, and it keeps a warm fork per worker
    thread, so a step's kernel is ready when its task arrives. The driver releases it when the run ends
    (`DaskExecutor.close`); a worker that closes first releases it itself, and one that dies takes it along
    (the fork server kills its kernels when the worker's end of its pipe closes). A pool that no task has
    used for IDLE_RELEASE_S goes too: its driver may have been killed (a later task makes a new one).
    """

    IDLE_RELEASE_S = 30.0
    _runs: dict[str, "_RunKernels"] = {}
    _lock = threading.Lock()

    def __init__(self, use_forkserver: bool, forkserver_off: str | None, warm: int):
        from ..kernels import KernelPool  # noqa: PLC0415

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._serve, name="nbflow-worker-kernels", daemon=True)
        self.thread.start()

        async def make() -> KernelPool:
            pool = KernelPool(max_prestarted=warm, use_forkserver=use_forkserver, forkserver_off=forkserver_off)
            pool.keep_warm(warm)
            return pool

        self.pool = self.call(make()).result()
        self.active = 0  # tasks running on it
        self._idle: threading.Timer | None = None
        self.closed = threading.Event()

    @classmethod
    def start(cls, topic: str, use_forkserver: bool, forkserver_off: str | None, worker) -> None:
        with cls._lock:
            cls._of(topic, use_forkserver, forkserver_off, worker)

    @classmethod
    def take(cls, topic: str, use_forkserver: bool, forkserver_off: str | None, worker) -> "_RunKernels":
        with cls._lock:
            kernels = cls._of(topic, use_forkserver, forkserver_off, worker)
            kernels.active += 1
            kernels._disarm()
            return kernels

    @classmethod
    def give_back(cls, topic: str, kernels: "_RunKernels") -> None:
        with cls._lock:
            kernels.active -= 1
            if not kernels.active and cls._runs.get(topic) is kernels:
                kernels._arm(topic)

    @classmethod
    def release(cls, topic: str, only: "_RunKernels | None" = None) -> None:
        """Close the run's pool (`only`: if it is still that one and idle)."""
        with cls._lock:
            kernels = cls._runs.get(topic)
            if kernels is None or only is not None and (kernels is not only or kernels.active):
                return
            del cls._runs[topic]
            kernels._disarm()
        kernels.close()

    @classmethod
    def _of(cls, topic: str, use_forkserver: bool, forkserver_off: str | None, worker) -> "_RunKernels":
        """(Under the lock.) The run's pool, made if needed, to be released if unused."""
        if topic not in cls._runs:
            made = cls._runs[topic] = cls(use_forkserver, forkserver_off, max(1, getattr(worker, "nthreads", 1)))
            made._arm(topic)
        return cls._runs[topic]

    def _arm(self, topic: str) -> None:
        self._disarm()
        self._idle = threading.Timer(self.IDLE_RELEASE_S, _RunKernels.release, args=(topic, self))
        self._idle.daemon = True
        self._idle.start()

    def _disarm(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def call(self, coro) -> "concurrent.futures.Future":
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        try:
            self.call(self.pool.close()).result(timeout=30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)
            self.loop.close()
            self.closed.set()


async def _start_run_kernels(topic: str, use_forkserver: bool, forkserver_off: str | None,
                             dask_worker=None) -> None:
    """Run by the driver on every worker (`Client.run`) when the run starts."""
    await asyncio.to_thread(_RunKernels.start, topic, use_forkserver, forkserver_off, dask_worker)


async def _close_run_kernels(topic: str) -> None:
    """Run by the driver on every worker (`Client.run`) when the run ends."""
    await asyncio.to_thread(_RunKernels.release, topic)


def _run(distributed, task: StepTask, events, topic: str, worker, kernels: _RunKernels) -> StepOutcome:
    """The step on the run's kernel pool; stopped when the driver cancels or this worker closes.

    A worker closes when it loses its scheduler: the result could reach nobody, so the step is stopped
    then (its kernel too), and the task ends (dask waits for it before the worker process exits).
    """
    from .step import execute_step  # noqa: PLC0415

    cancel = distributed.Event(f"{topic}-cancel")

    async def main() -> StepOutcome:
        step = asyncio.ensure_future(execute_step(task, events, kernels.pool))

        async def cancelled_by_the_driver() -> None:
            while not step.done():
                try:
                    if await asyncio.to_thread(cancel.wait, 0.5):
                        step.cancel()
                        return
                except Exception:  # noqa: BLE001 - the scheduler cannot be asked: the worker closes (below)
                    await asyncio.sleep(0.5)

        async def worker_closing() -> None:
            while not step.done():
                if not _worker_runs(worker):
                    step.cancel()
                    return
                await asyncio.sleep(0.2)

        watchers = [asyncio.ensure_future(cancelled_by_the_driver()), asyncio.ensure_future(worker_closing())]
        try:
            return await step
        finally:
            for watcher in watchers:
                watcher.cancel()

    return kernels.call(main()).result()
