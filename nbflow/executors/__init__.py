"""Executors: where a step's notebook runs.

Owns: the plain data handed to an executor (`StepTask`) and returned by it
(`StepOutcome`), the `Executor` interface the Runner drives, and choosing an
executor by name. The Runner decides what runs and when; an executor only runs
what it is given and reports events through the `emit` callback.
"""

from __future__ import annotations

import concurrent.futures
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol

from ..events import Event, StepError, StepStatus

if TYPE_CHECKING:
    from ..settings import RunSettings


@dataclass(frozen=True)
class StepTask:
    """Everything needed to execute one attempt of one step; picklable."""

    step: str
    run_id: str
    attempt: int
    source: str  # absolute path of the source notebook
    rel_source: str  # relative to the pipeline folder
    cwd: str  # the notebook's folder: the kernel's working directory
    root: str  # the pipeline folder
    executed: str  # absolute path of the executed copy to write
    latest: str  # absolute path of _nbflow/latest/<step>.ipynb
    attempt_copy: str  # absolute path where this attempt's notebook is kept when a retry follows
    parameters: dict[str, Any]
    parameters_cell: int
    kernel: str
    language: str
    outputs: tuple[tuple[str, str], ...]  # (label, absolute path or normalised URL)
    env: dict[str, str] = field(default_factory=dict)
    timeout: float | None = None
    cell_timeout: float | None = None
    retries: int = 0  # how many times the Runner may retry this step after a failure
    use_forkserver: bool = True  # RunSettings.forkserver
    forkserver_off: str | None = None  # what turned it off
    reasons: tuple[str, ...] = ()
    storage: dict[str, dict[str, Any]] = field(default_factory=dict)  # nbflow.yaml's `storage:`, for URL outputs
    inputs: tuple[tuple[str, str], ...] = ()  # (label, absolute path or normalised URL): a worker checks it sees them


@dataclass(frozen=True)
class StepOutcome:
    step: str
    attempt: int
    status: StepStatus  # SUCCEEDED, FAILED or CANCELLED
    started_at: float
    duration_s: float
    notebook: str | None  # relative to the pipeline folder; None if nothing could be written
    error: StepError | None = None
    kernel_mode: str | None = None
    worker: str | None = None  # the dask worker it ran on; None on this machine


Emit = Callable[[Event], None]


class Executor(Protocol):
    def submit(self, task: StepTask, emit: Emit) -> "concurrent.futures.Future[StepOutcome]": ...

    def prestart(self, task: StepTask) -> None: ...

    def cancel(self) -> None: ...

    def close(self) -> None: ...


def make_executor(settings: "RunSettings") -> Executor:
    if settings.executor == "local":
        from .local import LocalExecutor  # noqa: PLC0415

        return LocalExecutor(settings)
    if settings.executor == "dask":
        from .dask import DaskExecutor  # noqa: PLC0415

        return DaskExecutor(settings)
    raise ValueError(f"unknown executor {settings.executor!r}; use 'local' or 'dask'")
