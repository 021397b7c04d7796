"""The local executor: steps run concurrently on this machine, one asyncio loop.

Owns: the event-loop thread that drives every running step (kernels are
separate processes, so one loop is enough to keep N kernels busy), the kernel
pool shared by the steps of a run (or of every cycle of a watch), which keeps
warm forks ready from the moment the executor exists, prestart hints, and
cancelling every running step. Must not decide what runs: the Runner does.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading

from typing import TYPE_CHECKING

from . import Emit, StepOutcome, StepTask
from .step import execute_step

if TYPE_CHECKING:
    from ..settings import RunSettings


_MAX_WARM = 4


class LocalExecutor:
    def __init__(self, settings: "RunSettings"):
        from ..kernels import KernelPool  # noqa: PLC0415

        self.jobs = settings.jobs
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self._tasks: set[asyncio.Task] = set()
        self._cancelling = False  # set on the loop's thread by cancel()
        self._thread = threading.Thread(target=self._serve, name="nbflow-executor", daemon=True)
        self._thread.start()
        self.pool: KernelPool = self._call(self._make_pool(KernelPool)).result()

    async def _make_pool(self, pool_class):
        pool = pool_class(max_prestarted=max(1, self.jobs), use_forkserver=self.settings.forkserver,
                          forkserver_off=self.settings.forkserver_off)
        # as many warm forks as steps may start at once (a few at most), started right after this returns:
        # the fork server boots while the run gets ready, and every step, the first one too, finds a kernel
        # started before it asked
        asyncio.get_running_loop().call_soon(pool.keep_warm, max(1, min(self.jobs, _MAX_WARM)))
        return pool

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def _call(self, coro) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def submit(self, task: StepTask, emit: Emit) -> "concurrent.futures.Future[StepOutcome]":
        async def tracked() -> StepOutcome:
            me = asyncio.current_task()
            assert me is not None
            self._tasks.add(me)
            if self._cancelling:  # submitted just before the cancel reached the loop: cancelled all the same
                me.cancel()
            try:
                return await execute_step(task, emit, self.pool)
            finally:
                self._tasks.discard(me)

        return self._call(tracked())

    def prestart(self, task: StepTask) -> None:
        from ..kernels import KernelRequest  # noqa: PLC0415

        request = KernelRequest(task.kernel, task.cwd, task.env)
        self.loop.call_soon_threadsafe(self.pool.prestart, task.step, request)

    def cancel(self) -> None:
        def cancel_all() -> None:
            # A step submitted before this call but not started on the loop yet is not in _tasks: the flag
            # makes it cancel itself when it starts (else it would run to its end: a lost interrupt).
            self._cancelling = True
            for t in list(self._tasks):
                t.cancel()

        self.loop.call_soon_threadsafe(cancel_all)

    def close(self) -> None:
        if self.loop.is_closed():
            return
        try:
            self._call(self.pool.close()).result(timeout=30)
            self._call(_cancel_leftover_tasks()).result(timeout=10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
            self.loop.close()


async def _cancel_leftover_tasks() -> None:
    """Cancel the helper tasks a cancelled cell can leave behind (a kernel-alive poller).

    Else closing the loop prints "Task was destroyed but it is pending!" after a Ctrl-C.
    """
    leftovers = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for t in leftovers:
        t.cancel()
    await asyncio.gather(*leftovers, return_exceptions=True)
