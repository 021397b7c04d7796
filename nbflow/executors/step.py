"""Execute one attempt of one step: a fresh kernel, the cells, the executed copy.

Owns: driving the cells one by one (`cells.CellRunner`, emitting CellStarted/CellOutput/CellFinished), the
step timeout, cancellation, turning every way a step can end (exception, cell
timeout, step timeout, dead kernel, missing output, cancel) into a StepOutcome
whose error holds the kernel's traceback (not the cell's printed output) with
the step's secrets masked, always saving the executed notebook before the
kernel is stopped, and then killing whatever the step started that still runs
(found by the environment it inherited: `nbflow.reaper`), so nothing of a step
outlives it. Shared by every executor. Must not touch the ledger.
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
import shutil
import stat
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .. import executed, stores
from ..errors import PipelineError
from ..events import CellFinished, CellOutput, CellStarted, StepStarted, StepStatus, cell_label, masker
from ..events import StepError as _StepError
from ..notebook import load_notebook_json
from . import Emit, StepOutcome, StepTask

if TYPE_CHECKING:
    from ..kernels import KernelPool, StartedKernel

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_ARROW = re.compile(r"^-+>\s*(\d+)", re.MULTILINE)
# The variables every kernel of a step attempt and whatever it starts inherit (set by the Runner).
# what an attempt's kernel and everything it starts carry; the attempt too, so that reaping one attempt (in the
# background, once its outcome is in) never touches the next, which a dask retry may run on another worker
_STEP_IDENTITY = ("NBFLOW_RUN_ID", "NBFLOW_STEP", "NBFLOW_PIPELINE", "NBFLOW_ATTEMPT")
_SECRET_PREFIX = "NBFLOW_SECRET_"
# Shorter secret values are not masked: masking "1" or "eu" would garble every message.
_MIN_SECRET_LENGTH = 4


async def execute_step(task: StepTask, emit: Emit, pool: "KernelPool") -> StepOutcome:
    """Run one attempt of a step: its cells on a fresh kernel; always save the executed notebook.

    The kernel is stopped (and what the step started outside it reaped) by the pool in the background once
    the notebook is saved: the outcome, and the next step, do not wait for it (:meth:`KernelPool.stop_later`).
    """
    attempt = _Attempt(task, emit)
    try:
        await attempt.run_cells(pool)
    except BaseException as e:  # noqa: BLE001 - every way a step ends becomes its outcome (cancel included)
        if not isinstance(e, Exception | asyncio.CancelledError):
            raise
        attempt.failed_with(e)
    attempt.check_outputs()
    notebook = None
    try:
        notebook = attempt.save()
    finally:
        if attempt.kernel is not None:
            pool.stop_later(task.step, _stop_and_reap(attempt.kernel, task.env))
    return attempt.outcome(notebook)


def blocked_outcome(task: StepTask, emit: Emit, message: str) -> StepOutcome:
    """An attempt that cannot run where it is (a worker without the step's files): failed before any kernel."""
    started = time.time()
    emit(StepStarted(task.step, task.attempt, "", 0, started, task.reasons))
    return StepOutcome(task.step, task.attempt, StepStatus.FAILED, started, time.time() - started, None,
                       _StepError("not_here", "StepNotRunnableHere", message))


class _Attempt:
    """One attempt of one step: the executed notebook being filled, the cell it is in, how it ended."""

    def __init__(self, task: StepTask, emit: Emit):
        self.task, self.emit = task, emit
        self.started_at = time.time()
        # a fresh write vs a stale file (an object's ETag: a URL output is asked of its store)
        self.before = {path: _identity(path, task.storage, quiet=True) for _, path in task.outputs}
        self.executed_path = Path(task.executed)
        self.rel_executed = self.executed_path.relative_to(Path(task.root)).as_posix()
        source = load_notebook_json(Path(task.source), task.rel_source)
        assert isinstance(source, dict)
        self.nb, self.numbers = executed.prepare(
            source, task.parameters, parameters_cell=task.parameters_cell, kernel=task.kernel,
            language=task.language, input_path=task.rel_source, output_path=self.rel_executed)
        self.code_cells = [i for i, c in enumerate(self.nb["cells"]) if c["cell_type"] == "code"
                           and c["source"].strip()]
        # Every error of this attempt masks the step's secrets before it is bounded (no cut leaves part of one).
        self.secrets = _secrets(task.env)
        self.error_of = functools.partial(_StepError, secrets=self.secrets)
        self.mask = masker(self.secrets)
        self.counts: dict[int, int | None] = {}  # index (in nb["cells"]) -> the n of its In [n]
        self.status = StepStatus.SUCCEEDED
        self.error: _StepError | None = None
        self.current: int | None = None  # index (in nb["cells"]) of the cell running now
        self.last_done: int | None = None
        self.kernel: StartedKernel | None = None
        self.step_timer = asyncio.timeout(task.timeout)
        emit(StepStarted(task.step, task.attempt, self.rel_executed, len(self.code_cells), self.started_at,
                         task.reasons))

    async def run_cells(self, pool: "KernelPool") -> None:
        from ..kernels import KernelRequest  # noqa: PLC0415
        from .cells import CellRunner  # noqa: PLC0415

        task, total = self.task, len(self.code_cells)
        async with self.step_timer:
            self.kernel = await pool.acquire(task.step, KernelRequest(task.kernel, task.cwd, task.env))
            runner = CellRunner(self.kernel.km, self.kernel.kc, timeout=task.cell_timeout, on_output=self._printed)
            for position, i in enumerate(self.code_cells, start=1):
                _raise_if_cancel_requested()
                cell = self.nb["cells"][i]
                self.current = i
                count = self.counts[i] = runner.next_execution_count(cell)
                line = self.mask(first_code_line(cell["source"])) if self.numbers[i] else ""
                self.emit(CellStarted(task.step, self.numbers[i], position, total, count, line))
                t0 = time.time()
                executed.mark_cell(cell, "running", start=t0)
                ok = False
                try:
                    await runner.execute_cell(cell, execution_count=count)
                    ok = True
                finally:
                    t1 = time.time()
                    executed.mark_cell(cell, "completed" if ok else "failed", start=t0, end=t1, exception=not ok)
                    self.emit(CellFinished(task.step, self.numbers[i], position, total, t1 - t0, ok))
                self.last_done = i
            self.current = None

    def _printed(self, stream: str, text: str, cut: bool) -> None:
        """What the running cell printed (coalesced by the CellRunner), for live views, secrets masked."""
        self.emit(CellOutput(self.task.step, stream, text, cut, secrets=self.secrets))

    def _number(self) -> int | None:
        return None if self.current is None else (self.numbers[self.current] or None)

    def _count(self) -> int | None:
        """The n of the In [n] of the cell running now."""
        return None if self.current is None else self.counts.get(self.current)

    def _where(self) -> str:
        """' at In [3]', where the attempt is now, as the executed notebook numbers it."""
        if self.current is None:
            return ""
        label = cell_label(self._count(), self._number())
        injected = " (the injected parameters)" if self.numbers[self.current] == 0 else ""
        return f" at {label}{injected}" if label else " in the injected parameters cell"

    def failed_with(self, e: BaseException) -> None:
        """Say how the attempt ended, from what stopped it."""
        from ..kernels import KernelStartError  # noqa: PLC0415
        from .cells import CellExecutionError, CellTimeoutError, DeadKernelError  # noqa: PLC0415

        task, nb, cell, number = self.task, self.nb, self.current, self._number()
        error_of = functools.partial(self.error_of, execution_count=self._count())
        self.status = StepStatus.FAILED
        me = asyncio.current_task()
        if isinstance(e, asyncio.CancelledError) or (isinstance(e, DeadKernelError) and me and me.cancelling()):
            # a kernel that dies while the run is being cancelled counts as the cancel
            self.status = StepStatus.CANCELLED
            self.error = error_of("cancelled", "Cancelled", f"run cancelled{self._where()}", number)
        elif isinstance(e, KernelStartError):
            self.error = self.error_of("kernel_start", "KernelStartError", str(e))
        elif isinstance(e, CellTimeoutError):
            self.error = error_of("timeout", "CellTimeoutError",
                                  f"cell timed out after {task.cell_timeout:g} s (cell_timeout)", number,
                                  _first_line(nb, cell))
        elif isinstance(e, CellExecutionError):
            # The kernel's traceback, from the cell's error output. e.traceback (nbclient's message) holds
            # everything the cell printed as well (30 MB, once): only when the error output went elsewhere
            # (into an Output widget) is it used, and then StepError keeps its end.
            kernel_tb = _kernel_traceback(nb["cells"][cell]) if cell is not None else ""
            tb = _ANSI.sub("", kernel_tb or e.traceback)
            self.error = error_of("exception", e.ename or "Error", _ANSI.sub("", e.evalue or ""), number,
                                  _failing_line(nb, cell, tb), tb)
        elif isinstance(e, TimeoutError) or (isinstance(e, DeadKernelError) and self.step_timer.expired()):
            # the step timer kills the kernel: dying then is the timeout
            self.error = error_of("timeout", "StepTimeout", f"timed out after {task.timeout:g} s{self._where()}",
                                  number, _first_line(nb, cell))
        elif isinstance(e, DeadKernelError):
            last = (f"; the last cell that completed was "
                    f"{cell_label(self.counts.get(self.last_done), self.numbers[self.last_done])}"
                    if self.last_done is not None else "")
            self.error = error_of("kernel_died", "DeadKernelError",
                                  f"kernel died{self._where()}{last} (crash, os._exit, or killed for memory?)",
                                  number, _first_line(nb, cell))
        else:  # any other failure still saves the notebook
            self.error = error_of("exception", type(e).__name__, str(e), number, _first_line(nb, cell))

    def check_outputs(self) -> None:
        """A step that ran through fails when a declared output is missing, odd, or from before the run."""
        if self.status != StepStatus.SUCCEEDED:
            return
        outputs, storage = self.task.outputs, self.task.storage
        try:
            now = {path: _identity(path, storage) for _, path in outputs}
        except PipelineError as e:
            self.status, self.error = StepStatus.FAILED, self.error_of(
                "missing_output", "MissingOutput", "cannot check the declared outputs: " + str(e).strip())
            return
        missing = [label for label, path in outputs if now[path] is None]
        odd = [f"{label} is {kind}" for label, path in outputs if (kind := _odd_kind(path))]
        stale = [label for label, path in outputs
                 if label not in missing and self.before[path] is not None and now[path] == self.before[path]]
        message = None
        if odd:
            message = ("declared output " + ", ".join(odd) + ", not a regular file or folder; nbflow hashes "
                       "outputs to know whether they changed: write a file or a folder there")
        elif missing:
            message = ("declared output" + ("s " if len(missing) > 1 else " ") + ", ".join(missing)
                       + " was not written by the notebook; write it, or remove it from `outputs`")
        elif stale:
            message = ("declared output" + ("s " if len(stale) > 1 else " ") + ", ".join(stale)
                       + " was not written by this run (the file on disk is from before it); write it in the "
                       "notebook, or remove it from `outputs`")
        if message:
            self.status, self.error = StepStatus.FAILED, self.error_of("missing_output", "MissingOutput", message)

    def save(self) -> str | None:
        """Write the executed notebook (banner and marks on failure), a retry's own copy, and latest/."""
        nb, error = self.nb, self.error
        if self.current is not None and self.status != StepStatus.SUCCEEDED:
            executed.mark_cell(nb["cells"][self.current], "failed" if self.status == StepStatus.FAILED
                               else "cancelled", end=time.time(), exception=True)
        banner = None if self.status == StepStatus.SUCCEEDED else (error.summary() if error else "failed")
        executed.finish(nb, self.started_at, banner=banner,
                        failed_cell=self.current if error and error.kind != "missing_output" else None)
        try:
            executed.write_atomic(nb, self.executed_path)
            notebook = self.rel_executed
            if self.status == StepStatus.FAILED and self.task.attempt <= self.task.retries:
                # a retry may follow and overwrite <step>.ipynb: this attempt keeps its own copy
                kept = Path(self.task.attempt_copy)
                kept.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(self.executed_path, kept)
                notebook = kept.relative_to(Path(self.task.root)).as_posix()
            executed.write_atomic(nb, Path(self.task.latest))
            return notebook
        except OSError as e:
            if self.error is None:
                self.status = StepStatus.FAILED
                self.error = self.error_of("exception", "OSError",
                                           f"cannot save the executed notebook {self.rel_executed}: {e}")
            return None

    def outcome(self, notebook: str | None) -> StepOutcome:
        return StepOutcome(self.task.step, self.task.attempt, self.status, self.started_at,
                           time.time() - self.started_at, notebook, self.error,
                           self.kernel.mode if self.kernel is not None else None)


def _raise_if_cancel_requested() -> None:
    """A cancel the code awaited on the way swallowed (a library catching the CancelledError it threw in,
    e.g. while a warm kernel is connected) is still a cancel: the task remembers it was asked."""
    me = asyncio.current_task()
    if me is not None and me.cancelling():
        raise asyncio.CancelledError


async def _stop_and_reap(kernel: StartedKernel, env: dict[str, str]) -> None:
    """Stop the kernel (its process group), then kill what the step started outside that group.

    A child in its own session (`start_new_session=True`, `setsid`, a daemon
    that double-forks) survives the kernel's process group; it still carries the
    attempt's NBFLOW_RUN_ID, NBFLOW_STEP, NBFLOW_PIPELINE and NBFLOW_ATTEMPT. The scan reads every
    process's environment (~0.2 ms for 80 processes, ~9 ms for 1,000), so it
    runs off the event loop, which drives the other steps' cells meanwhile.
    """
    await kernel.stop()
    identity = {name: env[name] for name in _STEP_IDENTITY if env.get(name)}
    if len(identity) == len(_STEP_IDENTITY):
        from ..reaper import kill_processes  # noqa: PLC0415

        await asyncio.get_running_loop().run_in_executor(None, kill_processes, [identity])


def _secrets(env: dict[str, str]) -> tuple[str, ...]:
    """The values of the step's secrets (its kernel gets them as NBFLOW_SECRET_<NAME>)."""
    return tuple(value for name, value in env.items()
                 if name.startswith(_SECRET_PREFIX) and len(value) >= _MIN_SECRET_LENGTH)


def _kernel_traceback(cell: dict) -> str:
    """The traceback of the cell's error output: what the kernel reported, without what the cell printed."""
    for output in reversed(cell.get("outputs", [])):
        if output.get("output_type") == "error":
            return "\n".join(output.get("traceback") or [f"{output.get('ename')}: {output.get('evalue')}"])
    return ""


def first_code_line(source: str) -> str:
    """The first line of a cell's code, comments and blank lines left out: what shows the cell running."""
    for line in source.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            return line.strip()
    return ""


def _first_line(nb, i: int | None) -> str | None:
    if i is None:
        return None
    lines = [ln for ln in nb["cells"][i]["source"].splitlines() if ln.strip()]
    return lines[0] if lines else None


def _failing_line(nb, i: int | None, traceback: str) -> str | None:
    """The line of the cell the traceback points at (IPython marks it with '---->')."""
    if i is None:
        return None
    source_lines = nb["cells"][i]["source"].splitlines()
    cell_part = traceback.split("Traceback", 1)[-1]
    found = _ARROW.findall(cell_part.split("\nFile ", 1)[0]) or _ARROW.findall(cell_part)
    if found:
        n = int(found[0])
        if 1 <= n <= len(source_lines):
            return source_lines[n - 1].strip()
    return _first_line(nb, i)


def _identity(path: str, storage: dict | None = None, quiet: bool = False) -> tuple | None:
    """What changes whenever a file or a folder is written or replaced; None if absent.

    (inode, size, mtime_ns) of a file; of a folder, that of every entry below
    it (a file rewritten in place inside it does not change the folder's own mtime).
    Of a URL, its identity in the store (stores.identity: ETag and size); a store
    that cannot be asked raises PipelineError, or gives None when `quiet`.
    """
    if stores.is_url(path):
        try:
            return stores.identity(path, storage)
        except PipelineError:
            if quiet:
                return None
            raise
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode):
        return st.st_ino, st.st_size, st.st_mtime_ns
    entries = []
    for folder, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files) + dirs:
            try:
                inner = os.stat(os.path.join(folder, name))
            except OSError:
                continue
            entries.append((os.path.relpath(os.path.join(folder, name), path), inner.st_ino, inner.st_size,
                            inner.st_mtime_ns))
    return tuple(entries)


def _odd_kind(path: str) -> str | None:
    """'a FIFO' for a path that exists but is neither a regular file nor a folder (reading it could hang)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    return "a FIFO" if stat.S_ISFIFO(mode) else "a device or socket"
