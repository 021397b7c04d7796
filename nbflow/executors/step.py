"""Execute one attempt of one step: a fresh kernel, the cells, the executed copy.

Owns: driving the cells one by one (`cells.CellRunner`, emitting CellStarted/CellFinished), the
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

from .. import executed
from ..events import CellFinished, CellStarted, StepStarted, StepStatus
from ..events import StepError as _StepError
from ..notebook import load_notebook_json
from . import Emit, StepOutcome, StepTask

if TYPE_CHECKING:
    from ..kernels import KernelPool, StartedKernel

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_ARROW = re.compile(r"^-+>\s*(\d+)", re.MULTILINE)
# The variables every kernel of a step attempt and whatever it starts inherit (set by the Runner).
_STEP_IDENTITY = ("NBFLOW_RUN_ID", "NBFLOW_STEP", "NBFLOW_PIPELINE")
_SECRET_PREFIX = "NBFLOW_SECRET_"
# Shorter secret values are not masked: masking "1" or "eu" would garble every message.
_MIN_SECRET_LENGTH = 4


async def execute_step(task: StepTask, emit: Emit, pool: "KernelPool") -> StepOutcome:
    from .cells import CellExecutionError, CellRunner, CellTimeoutError, DeadKernelError  # noqa: PLC0415

    from ..kernels import KernelRequest, KernelStartError  # noqa: PLC0415

    started_at = time.time()
    before = {path: _identity(path) for _, path in task.outputs}  # to tell a fresh write from a stale file
    root = Path(task.root)
    executed_path = Path(task.executed)
    rel_executed = executed_path.relative_to(root).as_posix()
    source = load_notebook_json(Path(task.source), task.rel_source)
    assert isinstance(source, dict)
    nb, numbers = executed.prepare(
        source, task.parameters, parameters_cell=task.parameters_cell, kernel=task.kernel,
        language=task.language, input_path=task.rel_source, output_path=rel_executed)
    code_cells = [i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code" and c["source"].strip()]
    total = len(code_cells)
    emit(StepStarted(task.step, task.attempt, rel_executed, total, started_at, task.reasons))

    # Every error of this attempt masks the step's secrets, before it is bounded (so no cut leaves a part of one).
    StepError = functools.partial(_StepError, secrets=_secrets(task.env))  # noqa: N806
    error: _StepError | None = None
    status = StepStatus.SUCCEEDED
    current: int | None = None  # index (in nb["cells"]) of the cell running now
    last_done: int | None = None
    kernel = None

    def number(i: int | None) -> int | None:
        return None if i is None else (numbers[i] or None)

    def where(i: int | None) -> str:
        if i is None:
            return ""
        n = numbers[i]
        return " in the injected parameters cell" if n == 0 else f" in cell {n}"

    step_timer = asyncio.timeout(task.timeout)
    try:
        async with step_timer:
            request = KernelRequest(task.kernel, task.cwd, task.env)
            kernel = await pool.acquire(task.step, request)
            runner = CellRunner(kernel.km, kernel.kc, timeout=task.cell_timeout)
            for position, i in enumerate(code_cells, start=1):
                cell = nb["cells"][i]
                current = i
                emit(CellStarted(task.step, numbers[i], position, total))
                t0 = time.time()
                executed.mark_cell(cell, "running", start=t0)
                ok = False
                try:
                    await runner.execute_cell(cell, execution_count=runner.cells_executed + 1)
                    ok = True
                finally:
                    t1 = time.time()
                    executed.mark_cell(cell, "completed" if ok else "failed", start=t0, end=t1, exception=not ok)
                    emit(CellFinished(task.step, numbers[i], position, total, t1 - t0, ok))
                last_done = i
            current = None
    except KernelStartError as e:
        status, error = StepStatus.FAILED, StepError("kernel_start", "KernelStartError", str(e))
    except CellTimeoutError:
        status = StepStatus.FAILED
        error = StepError("timeout", "CellTimeoutError",
                          f"cell timed out after {task.cell_timeout:g} s (cell_timeout)", number(current),
                          _first_line(nb, current))
    except CellExecutionError as e:
        status = StepStatus.FAILED
        # The kernel's traceback, from the cell's error output. e.traceback (nbclient's message) holds
        # everything the cell printed as well (30 MB, once): only when the error output went elsewhere
        # (into an Output widget) is it used, and then StepError keeps its end.
        kernel_tb = _kernel_traceback(nb["cells"][current]) if current is not None else ""
        tb = _ANSI.sub("", kernel_tb or e.traceback)
        error = StepError("exception", e.ename or "Error", _ANSI.sub("", e.evalue or ""), number(current),
                          _failing_line(nb, current, tb), tb)
    except DeadKernelError:
        # a kernel that dies while the run is being cancelled or timed out counts as that:
        # ask the task and the step timer whether it was our own cancel or timeout.
        me = asyncio.current_task()
        if me is not None and me.cancelling():
            status = StepStatus.CANCELLED
            error = StepError("cancelled", "Cancelled", f"run cancelled{where(current)}", number(current))
        elif step_timer.expired():
            status = StepStatus.FAILED
            error = StepError("timeout", "StepTimeout", f"timed out after {task.timeout:g} s{where(current)}",
                              number(current), _first_line(nb, current))
        else:
            status = StepStatus.FAILED
            last = f"; the last cell that completed was cell {numbers[last_done]}" if last_done is not None else ""
            error = StepError("kernel_died", "DeadKernelError",
                              f"kernel died{where(current)}{last} (crash, os._exit, or killed for memory?)",
                              number(current), _first_line(nb, current))
    except TimeoutError:
        status = StepStatus.FAILED
        error = StepError("timeout", "StepTimeout", f"timed out after {task.timeout:g} s{where(current)}",
                          number(current), _first_line(nb, current))
    except asyncio.CancelledError:
        status = StepStatus.CANCELLED
        error = StepError("cancelled", "Cancelled", f"run cancelled{where(current)}", number(current))
    except Exception as e:  # noqa: BLE001 - any other failure still saves the notebook
        status = StepStatus.FAILED
        error = StepError("exception", type(e).__name__, str(e), number(current), _first_line(nb, current))

    if status == StepStatus.SUCCEEDED:
        missing = [label for label, path in task.outputs if not os.path.exists(path)]
        odd = [f"{label} is {kind}" for label, path in task.outputs if (kind := _odd_kind(path))]
        stale = [label for label, path in task.outputs
                 if label not in missing and before[path] is not None and _identity(path) == before[path]]
        if odd:
            status = StepStatus.FAILED
            error = StepError("missing_output", "MissingOutput",
                              "declared output " + ", ".join(odd) + ", not a regular file or folder; nbflow "
                              "hashes outputs to know whether they changed: write a file or a folder there")
        elif missing:
            status = StepStatus.FAILED
            error = StepError("missing_output", "MissingOutput",
                              "declared output" + ("s " if len(missing) > 1 else " ") + ", ".join(missing)
                              + " was not written by the notebook; write it, or remove it from `outputs`")
        elif stale:
            status = StepStatus.FAILED
            error = StepError("missing_output", "MissingOutput",
                              "declared output" + ("s " if len(stale) > 1 else " ") + ", ".join(stale)
                              + " was not written by this run (the file on disk is from before it); write it "
                              "in the notebook, or remove it from `outputs`")
    if current is not None and status != StepStatus.SUCCEEDED:
        executed.mark_cell(nb["cells"][current], "failed" if status == StepStatus.FAILED else "cancelled",
                           end=time.time(), exception=True)
    banner = None if status == StepStatus.SUCCEEDED else (error.summary() if error else "failed")
    executed.finish(nb, started_at, failed_cell=current if error and error.kind != "missing_output" else None,
                    banner=banner)
    notebook: str | None = None
    try:
        executed.write_atomic(nb, executed_path)
        notebook = rel_executed
        if status == StepStatus.FAILED and task.attempt <= task.retries:
            # a retry may follow and overwrite <step>.ipynb: this attempt keeps its own copy
            kept = Path(task.attempt_copy)
            kept.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(executed_path, kept)
            notebook = kept.relative_to(root).as_posix()
        executed.write_atomic(nb, Path(task.latest))
    except OSError as e:
        if error is None:
            status = StepStatus.FAILED
            error = StepError("exception", "OSError", f"cannot save the executed notebook {rel_executed}: {e}")
    finally:
        if kernel is not None:
            await asyncio.shield(_stop_and_reap(kernel, task.env))
    return StepOutcome(task.step, task.attempt, status, started_at, time.time() - started_at, notebook, error,
                       kernel.mode if kernel is not None else None)


async def _stop_and_reap(kernel: StartedKernel, env: dict[str, str]) -> None:
    """Stop the kernel (its process group), then kill what the step started outside that group.

    A child in its own session (`start_new_session=True`, `setsid`, a daemon
    that double-forks) survives the kernel's process group; it still carries the
    step's NBFLOW_RUN_ID, NBFLOW_STEP and NBFLOW_PIPELINE. The scan reads every
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


def _identity(path: str) -> tuple | None:
    """What changes whenever a file or a folder is written or replaced; None if absent.

    (inode, size, mtime_ns) of a file; of a folder, that of every entry below
    it (a file rewritten in place inside it does not change the folder's own mtime).
    """
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
