"""nbflow's cell executor as a papermill engine: `papermill in.ipynb out.ipynb --engine nbflow`.

Owns: `NbflowEngine` (the `papermill.engine` entry point `nbflow`), the kernels
its calls run on (one process-wide KernelPool with its fork server, driven by an
event loop in a thread of its own, so that a loop of `execute_notebook` calls
pays one fork-server boot; stopped at interpreter exit or by `shutdown()`), and
saying how a cell ended the way papermill's own engine (nbclient) says it.

Papermill does everything else as it does with its default engine: reading the
notebook, the injected-parameters cell, its metadata, the error banner,
PapermillExecutionError. What the engine changes is how cells run: on a
fork-server kernel, through `executors.cells.CellRunner`, calling the
manager's `cell_start` / `cell_exception` / `cell_complete` hooks without the
save papermill makes in each (the notebook is saved when execution starts and
ends, on an error, and every `autosave_cell_every` seconds between cells).

papermill loads this module whenever it is imported in an environment where
nbflow is installed, whichever engine is used: importing it does no work.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import os
import threading
import time
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar, cast

from papermill.engines import Engine
from papermill.exceptions import PapermillException

if TYPE_CHECKING:
    from .executors.cells import CellRunner
    from .kernels import KernelPool, KernelRequest, StartedKernel

__all__ = ["NbflowEngine", "shutdown"]

_T = TypeVar("_T")

# Engine keywords papermill passes on its own, or that this engine honours.
_TAKEN = {"input_path", "execution_timeout", "timeout", "start_timeout", "log_output", "stdout_file", "stderr_file"}
# How long stopping the pool (and its fork server) may take at exit or in shutdown().
_CLOSE_TIMEOUT = 10.0
# How long a cancelled call (Ctrl-C) may take to stop its kernel before the interrupt is raised.
_CANCEL_TIMEOUT = 10.0
# How long a cell that timed out has, once interrupted, to report where it was.
_INTERRUPT_GRACE = 2.0
# The pool's key of the kernel started ahead of time for the next call.
_NEXT = "next execute_notebook call"


class NbflowEngine(Engine):  # type: ignore[misc]
    """Runs a papermill notebook on a fork-server kernel with nbflow's cell executor."""

    @classmethod
    def execute_managed_notebook(cls, nb_man: Any, kernel_name: str, log_output: bool = False,
                                 stdout_file: Any = None, stderr_file: Any = None, start_timeout: float = 60,
                                 execution_timeout: float | None = None, **kwargs: Any) -> Any:
        """Execute `nb_man.nb` in place, as papermill's NBClientEngine does; returns the notebook."""
        from .kernels import KernelRequest  # noqa: PLC0415

        unknown = sorted(set(kwargs) - _TAKEN)
        if unknown:
            raise PapermillException(
                f"the nbflow engine does not take {', '.join(unknown)} (options of nbclient, papermill's default "
                "engine); leave them out, or run with the default engine")
        timeout = execution_timeout or kwargs.get("timeout")
        # papermill has changed into `cwd` for this call; the kernel starts there, with this environment
        # (all of it: a kernel started ahead of time for this call is used only if nothing differs)
        request = KernelRequest(kernel_name, os.getcwd(), dict(os.environ))
        outputs = _OutputLog(nb_man, log_output, stdout_file, stderr_file)
        service = _service()
        service.run(_execute(service.pool, nb_man, request, timeout=timeout, start_timeout=start_timeout,
                             outputs=outputs))
        return nb_man.nb


def shutdown() -> None:
    """Stop the engine's kernels and fork server now (they are stopped at interpreter exit anyway).

    The next notebook the engine runs starts a new fork server.
    """
    global _shared
    with _shared_lock:
        service, _shared = _shared, None
    if service is not None:
        service.close()


# --------------------------------------------------------------------------
# Executing one notebook
# --------------------------------------------------------------------------


async def _execute(pool: KernelPool, nb_man: Any, request: KernelRequest, *, timeout: float | None,
                   start_timeout: float, outputs: _OutputLog) -> None:
    """Every cell of the notebook in order, until one raises; then the kernel's language_info."""
    import nbclient.exceptions  # noqa: PLC0415 - papermill has imported it already

    from .executors.cells import CellExecutionError, CellRunner, CellTimeoutError, DeadKernelError  # noqa: PLC0415

    try:
        kernel = await asyncio.wait_for(pool.acquire(_NEXT, request), start_timeout)
    except TimeoutError:
        raise RuntimeError(f"Kernel didn't respond in {start_timeout:g} seconds") from None
    nb = nb_man.nb
    try:
        runner = CellRunner(kernel.km, kernel.kc, timeout=timeout)
        for index, cell in enumerate(nb.cells):
            with _unsaved(nb_man):
                nb_man.cell_start(cell, index)
            try:
                if cell.cell_type == "code":
                    await runner.execute_cell(cell)
            except CellExecutionError as error:
                nb_man.cell_exception(nb.cells[index], cell_index=index, exception=error)
                break
            except CellTimeoutError:
                await _interrupt(kernel, runner, cell)
                raise nbclient.exceptions.CellTimeoutError.error_from_timeout_and_cell(
                    "Cell execution timed out", cast(int, timeout), cell) from None
            except DeadKernelError:
                raise nbclient.exceptions.DeadKernelError("Kernel died") from None
            finally:
                with _unsaved(nb_man):
                    nb_man.cell_complete(nb.cells[index], cell_index=index)
                outputs.cell_done(cell)
        reply = await kernel.kc.kernel_info(reply=True, timeout=start_timeout)
        if "language_info" in reply["content"]:
            nb.metadata["language_info"] = reply["content"]["language_info"]
    finally:
        _as_nodes(nb)
        await kernel.stop()
    if kernel.mode == "forkserver":
        # The next call most likely wants the same kernel: fork it now (cheap), while papermill writes this
        # notebook. A call with another kernel, directory or environment gets a new one (and this one is stopped).
        pool.prestart(_NEXT, request)


async def _interrupt(kernel: StartedKernel, runner: CellRunner, cell: Any) -> None:
    """Interrupt a cell that timed out and record what it says (the KeyboardInterrupt: where it was stuck).

    nbclient does the same, as it interrupts the kernel on the way to shutting
    it down while still recording the cell's outputs.
    """
    from queue import Empty  # noqa: PLC0415

    await kernel.interrupt()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _INTERRUPT_GRACE
    timing = cell["metadata"].setdefault("execution", {})
    while (left := deadline - loop.time()) > 0:
        try:
            message = await kernel.kc.get_iopub_msg(timeout=left)
        except Empty:
            return
        # the only request running is the cell's: its messages are the ones answering an execute_request
        if message["parent_header"].get("msg_type") == "execute_request" and runner._on_iopub(cell, message, timing):
            return


@contextmanager
def _unsaved(nb_man: Any) -> Iterator[None]:
    """Papermill's cell hooks each save the notebook: not while they run here."""
    path, nb_man.output_path = nb_man.output_path, None
    try:
        yield
    finally:
        nb_man.output_path = path


def _as_nodes(nb: Any) -> None:
    """CellRunner records outputs as plain dicts; papermill reads them as NotebookNodes (`output.ename`).

    Converted once at the end: until then, a display update from a later cell
    changes the very dicts that earlier cells hold.
    """
    from nbformat import from_dict  # noqa: PLC0415

    for cell in nb.cells:
        if cell.get("cell_type") != "code":
            continue
        cell["outputs"] = [from_dict(output) for output in cell.get("outputs", [])]
        if "execution" in cell.get("metadata", {}):
            cell["metadata"]["execution"] = from_dict(cell["metadata"]["execution"])


class _OutputLog:
    """What papermill does with a cell's outputs besides keeping them: log them, copy streams to files, autosave.

    Papermill's engine does it for each output as it arrives; here it is done
    when the cell ends, and the autosave is checked between cells.
    """

    def __init__(self, nb_man: Any, log_output: bool, stdout_file: Any, stderr_file: Any) -> None:
        self.nb_man = nb_man
        self.log_output = log_output
        self.files = {"stdout": stdout_file, "stderr": stderr_file}
        self.last_save = time.monotonic()  # papermill saved the notebook as execution started

    def cell_done(self, cell: Any) -> None:
        if self.log_output or any(self.files.values()):
            for output in cell.get("outputs", []):
                self._log(output)
        every = self.nb_man.autosave_cell_every
        if every and self.nb_man.output_path and time.monotonic() - self.last_save >= every:
            from nbformat import from_dict  # noqa: PLC0415
            from papermill.iorw import write_ipynb  # noqa: PLC0415

            write_ipynb(from_dict(self.nb_man.nb), self.nb_man.output_path)  # a copy: see _as_nodes
            self.last_save = time.monotonic()

    def _log(self, output: dict) -> None:
        from papermill.log import logger  # noqa: PLC0415

        if output["output_type"] == "stream":
            text = output["text"]
            if self.log_output:
                (logger.info if output["name"] == "stdout" else logger.warning)(text)
            file = self.files.get(output["name"])
            if file:
                file.write(text)
                file.flush()
        elif self.log_output and "text/plain" in output.get("data", {}):
            logger.info(output["data"]["text/plain"])


# --------------------------------------------------------------------------
# The kernels every call shares
# --------------------------------------------------------------------------


class _KernelService:
    """A KernelPool (with its fork server) on an event loop in a daemon thread, for every call of this process.

    Calls from any thread run on that one loop (the pool's rule), each on a
    kernel of its own. Closed at interpreter exit, which also stops the kernels
    of calls still running in other threads.
    """

    def __init__(self) -> None:
        from .config import Config  # noqa: PLC0415
        from .kernels import KernelPool  # noqa: PLC0415
        from .settings import resolve  # noqa: PLC0415

        settings = resolve(Config())  # NBFLOW_FORKSERVER=0 turns the fork server off here too
        self.pid = os.getpid()
        self.pool = KernelPool(max_prestarted=1, use_forkserver=settings.forkserver,
                               forkserver_off=settings.forkserver_off)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="nbflow-papermill-engine", daemon=True)
        self.thread.start()

    def run(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        """Run `coroutine` on the loop and wait for it; Ctrl-C cancels it (its kernel is stopped) and is raised."""
        finished = threading.Event()

        async def tracked() -> _T:
            try:
                return await coroutine
            finally:
                finished.set()

        future: concurrent.futures.Future[_T] = asyncio.run_coroutine_threadsafe(tracked(), self.loop)
        try:
            return future.result()
        except KeyboardInterrupt:
            future.cancel()
            finished.wait(_CANCEL_TIMEOUT)
            raise

    def close(self) -> None:
        if not self.thread.is_alive():
            return
        try:
            asyncio.run_coroutine_threadsafe(self.pool.close(), self.loop).result(_CLOSE_TIMEOUT)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(_CLOSE_TIMEOUT)
            if not self.thread.is_alive():
                self.loop.close()


_shared: _KernelService | None = None
_shared_lock = threading.Lock()


def _service() -> _KernelService:
    """The process's kernel service, started on first use (again in a child forked after that)."""
    global _shared
    with _shared_lock:
        if _shared is None or _shared.pid != os.getpid():
            _shared = _KernelService()
            atexit.unregister(shutdown)
            atexit.register(shutdown)
        return _shared
