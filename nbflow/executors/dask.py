"""The dask executor: each step runs as a task on a dask.distributed cluster.

Owns: connecting to a cluster (or starting a LocalCluster with one
single-threaded worker process per job), shipping StepTasks to workers,
relaying the events a worker emits back to the Runner (a dask Queue), and
cancelling: a cluster-wide dask Event that every running step watches, so its
kernel is stopped and its notebook saved on the worker. Workers must see the
pipeline folder at the same path (one machine, or a shared file system).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import uuid

from typing import TYPE_CHECKING

from ..errors import PipelineError
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
                self._emit(event)

    def submit(self, task: StepTask, emit: Emit) -> "concurrent.futures.Future[StepOutcome]":
        self._emit = emit
        result: concurrent.futures.Future[StepOutcome] = concurrent.futures.Future()
        future = self.client.submit(run_on_worker, task, self.topic, pure=False,
                                    key=f"nbflow-{task.step}-{task.attempt}-{uuid.uuid4().hex[:8]}")

        def done(f) -> None:
            try:
                result.set_result(f.result())
            except BaseException as e:  # noqa: BLE001 - handed to the Runner
                result.set_exception(e)

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


def run_on_worker(task: StepTask, topic: str) -> StepOutcome:
    """Runs inside a dask worker: one step on a fresh kernel, events published to `topic`."""
    distributed = _import_distributed()
    from ..kernels import KernelPool  # noqa: PLC0415
    from .step import execute_step  # noqa: PLC0415

    events = distributed.Queue(topic)
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
