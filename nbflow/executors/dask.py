"""The dask executor: each step runs as a task on a dask.distributed cluster.

Owns: connecting to a cluster (or starting a LocalCluster with one
single-threaded worker process per job), shipping StepTasks to workers,
relaying the events a worker emits back to the Runner (a dask Queue), and
cancelling: a cluster-wide dask Event that every running step watches, so its
kernel is stopped and its notebook saved on the worker.

Workers need not see the pipeline folder: the task carries the notebook's
JSON, the worker runs it in a scratch copy of the pipeline's layout (in the
notebook's own folder when the worker sees the pipeline), and the executed
notebooks (a partial one too) come back to the driver, which writes them
under `_nbflow/`. A step that declares local paths runs only on a worker that
sees the same pipeline folder; elsewhere it fails before its kernel starts.
A worker lost mid-step costs an attempt: dask runs the task again on another
worker, and the relay records the lost attempt as failed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
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
        try:
            self.topic = f"nbflow-{uuid.uuid4().hex}"
            self.cancel_event = distributed.Event(f"{self.topic}-cancel", client=self.client)
            self._events = distributed.Queue(self.topic, client=self.client)
        except BaseException:
            self._shutdown()
            raise
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
        future = self.client.submit(run_on_worker, task, notebook, self.topic, pure=False,
                                    key=f"nbflow-{task.step}-{task.attempt}-{uuid.uuid4().hex[:8]}")

        def done(f) -> None:
            try:
                outcome, files = f.result()
                with self._lock:
                    runs = self._started.pop(task.step, (1, 0.0, ""))[0]
                for rel, text in files.items():  # the executed notebooks, written where the driver keeps them
                    target = Path(task.root) / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_text(text, encoding="utf-8")
                result.set_result(replace(outcome, attempt=outcome.attempt + runs - 1) if runs > 1 else outcome)
            except BaseException as e:  # noqa: BLE001 - handed to the Runner
                result.set_exception(_said(e))

        future.add_done_callback(done)
        return result

    def prestart(self, task: StepTask) -> None:
        """Workers start their kernel when the task arrives (the fork server makes that fast)."""

    def cancel(self) -> None:
        self.cancel_event.set()

    def close(self) -> None:
        self._closing.set()
        self._events.put(None)
        self._relay.join(timeout=5)
        self._shutdown()

    def _shutdown(self) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()


def _said(e: BaseException) -> BaseException:
    """What a lost scheduler or a task lost on every worker means, for the step's error."""
    name = type(e).__name__
    if name == "KilledWorker":
        return RuntimeError(f"the step's task was lost with every dask worker that ran it ({e})")
    if name in ("CancelledError", "CommClosedError", "StreamClosedError") or isinstance(e, OSError):
        return RuntimeError(f"lost the dask scheduler ({name}: {e}); the run stops, nothing on the driver is lost")
    return e


def run_on_worker(task: StepTask, notebook: str, topic: str) -> tuple[StepOutcome, dict[str, str]]:
    """Runs inside a dask worker: one step on a fresh kernel, events published to `topic`.

    Returns the outcome and the executed notebooks written (path relative to
    the pipeline folder -> JSON text) for the driver to keep.
    """
    distributed = _import_distributed()
    events = distributed.Queue(topic)
    sees_pipeline = _same_notebook(task.source, notebook)
    local = [path for _, path in (*task.outputs, *task.inputs) if "://" not in path]
    if local and not sees_pipeline:
        from .step import blocked_outcome  # noqa: PLC0415

        shown = ", ".join(sorted({os.path.relpath(p, task.cwd) for p in local}))
        message = (f"this dask worker ({_worker_name(distributed)}) does not see the pipeline folder {task.root}, and "
                   f"the step declares local paths: {shown}; declare them as URLs (s3://..., gs://...) or give "
                   "the workers the pipeline folder at the same path (a shared file system)")
        return blocked_outcome(task, events.put, message), {}
    scratch = Path(tempfile.mkdtemp(prefix="nbflow-task-"))
    try:
        moved = _in_scratch(task, notebook, scratch, sees_pipeline)
        outcome = _run(distributed, moved, events, topic)
        files = {}
        for path in (moved.executed, moved.latest, moved.attempt_copy):
            if os.path.isfile(path):
                files[Path(path).relative_to(scratch).as_posix()] = Path(path).read_text(encoding="utf-8")
        return replace(outcome, worker=_worker_name(distributed)), files
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _worker_name(distributed) -> str:
    try:
        worker = distributed.get_worker()
    except ValueError:
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


def _run(distributed, task: StepTask, events, topic: str) -> StepOutcome:
    from ..kernels import KernelPool  # noqa: PLC0415
    from .step import execute_step  # noqa: PLC0415

    cancel = distributed.Event(f"{topic}-cancel")

    async def main() -> StepOutcome:
        pool = KernelPool(max_prestarted=0, use_forkserver=task.use_forkserver, forkserver_off=task.forkserver_off)
        step = asyncio.ensure_future(execute_step(task, events.put, pool))

        async def watch() -> None:
            while not step.done():
                if await asyncio.to_thread(cancel.wait, 0.5):
                    step.cancel()
                    return

        watcher = asyncio.ensure_future(watch())
        try:
            return await step
        finally:
            watcher.cancel()
            await pool.close()

    return asyncio.run(main())
