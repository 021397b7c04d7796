"""What happened during a run: past-tense, frozen, plain data.

Owns: the event types the Runner emits, the status enums, and the result of
a run. Imports nothing from nbflow: every other module may import it.
Listeners (widget, terminal, ledger, alerts) receive these and nothing else.
"""

from __future__ import annotations

import enum
from dataclasses import InitVar, dataclass, field
from typing import Any, Callable


class StepStatus(enum.StrEnum):
    """Where a step of a run is; equal to its value ("succeeded" == StepStatus.SUCCEEDED)."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"
    NOT_RUN = "not_run"
    CANCELLED = "cancelled"


class RunStatus(enum.StrEnum):
    """How a run ended (or that it goes on)."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"  # nbflow itself died; noticed by the next run
    SKIPPED = "skipped"  # a scheduled run that found the previous one still running


#: Bounds of the texts a StepError keeps: it reaches the ledger, --json, the log, the report, the
#: widget and the banner of the executed notebook, which keeps the full output of the failing cell.
MAX_EVALUE = 2_000
MAX_TRACEBACK = 8_000
MAX_SOURCE_LINE = 300
#: What a known secret is replaced with.
MASK = "***"


@dataclass(frozen=True)
class StepError:
    """Why a step failed, with where: survives pickling, goes into JSON and the ledger.

    Bounded on creation: `evalue` keeps its start, `traceback` its end (the
    kernel's traceback, not the cell's printed output), `source_line` one
    line; each cut says so. Values given as `secrets` are replaced by ***
    before anything is cut, so no part of one survives a cut.
    """

    kind: str  # "exception", "timeout", "kernel_died", "missing_output", "kernel_start", "cancelled"
    ename: str
    evalue: str
    cell: int | None = None  # 1-based cell number in the source notebook (finds the cell; not shown to users)
    source_line: str | None = None  # the failing line of that cell, when known
    traceback: str = ""
    execution_count: int | None = None  # n of the failing cell's In [n] in the executed notebook: what users see
    secrets: InitVar[tuple[str, ...]] = ()  # values to mask; not kept

    def __post_init__(self, secrets: tuple[str, ...]) -> None:
        masked = masker(secrets)
        object.__setattr__(self, "evalue", _head(masked(self.evalue), MAX_EVALUE))
        object.__setattr__(self, "traceback", _tail(masked(self.traceback), MAX_TRACEBACK))
        if self.source_line is not None:
            line = (masked(self.source_line).splitlines() or [""])[0]
            object.__setattr__(self, "source_line", line if len(line) <= MAX_SOURCE_LINE
                               else line[: MAX_SOURCE_LINE - 1] + "…")

    @property
    def where(self) -> str:
        """The failing cell as the user sees it: 'In [4]'; '' when no cell failed (see `cell_label`)."""
        return cell_label(self.execution_count, self.cell)

    def summary(self) -> str:
        where = self.where
        where = f" ({where})" if where and where not in self.evalue else ""
        return f"{self.ename}: {self.evalue}{where}" if self.evalue else f"{self.ename}{where}"

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "ename": self.ename, "evalue": self.evalue, "cell": self.cell,
                "execution_count": self.execution_count, "source_line": self.source_line,
                "message": self.summary()}


def cell_label(execution_count: int | None, cell: int | None = None) -> str:
    """How a cell of a step is named to users, the one place that decides it: 'In [4]'.

    `execution_count` is the n of the In [n] that Jupyter shows beside the cell in the
    executed notebook (the injected parameters cell counted, markdown not), the number
    the widget, the terminal, the log, the report, the banner and `nbflow show` all
    use. A failure recorded before nbflow kept that number has only `cell`, the cell's
    place in the source notebook (markdown counted): it reads 'cell 4'.
    """
    if execution_count:
        return f"In [{execution_count}]"
    return f"cell {cell}" if cell else ""


def masker(secrets: tuple[str, ...] | list[str]) -> Callable[[str], str]:
    """A function that replaces each of `secrets` in a text by ***, the longer ones first (one inside another)."""
    longest_first = sorted(filter(None, secrets), key=len, reverse=True)

    def masked(text: str) -> str:
        for secret in longest_first:
            text = text.replace(secret, MASK)
        return text

    return masked


def _head(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    note = " [... {:,} more characters cut; the executed notebook has all of them]"
    keep = limit - len(note.format(len(text)))
    return text[:keep] + note.format(len(text) - keep)


def _tail(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    note = "[{:,} characters cut here; the executed notebook has the full output]\n"
    keep = limit - len(note.format(len(text)))
    return note.format(len(text) - keep) + text[-keep:]


@dataclass(frozen=True)
class FileRecord:
    label: str  # as declared by the step
    path: str  # relative to the pipeline folder
    sha256: str
    size: int


@dataclass(frozen=True)
class PlannedStep:
    name: str
    action: str  # "run" or "skip"
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class Event:
    pass


@dataclass(frozen=True)
class RunStarted(Event):
    run_id: str
    root: str
    started_at: float
    plan: tuple[PlannedStep, ...]
    parameters: dict[str, Any] = field(default_factory=dict)  # redacted overrides as given
    audit: dict[str, Any] = field(default_factory=dict)  # who ran what, with what (see audit.py)


@dataclass(frozen=True)
class StepSkipped(Event):
    step: str
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class StepStarted(Event):
    step: str
    attempt: int
    notebook: str  # executed copy, relative to the pipeline folder
    total_cells: int
    started_at: float
    reasons: tuple[str, ...] = ()


@dataclass(frozen=True)
class CellStarted(Event):
    step: str
    cell: int  # 1-based cell number in the source notebook (0: the injected parameters)
    index: int  # 1-based among the code cells that run
    total: int
    execution_count: int | None = None  # the n of its In [n] in the executed notebook (None: not executed)
    source_line: str = ""  # its first line of code (comments left out)


#: What a CellOutput keeps of the text printed since the last one: its end.
MAX_OUTPUT_TEXT = 2_000


@dataclass(frozen=True)
class CellOutput(Event):
    """What the running cell of a step printed (stdout or stderr) since the last CellOutput of that stream.

    For live views, not a record: the executed notebook keeps all of it. The
    executor coalesces a cell's stream messages (cells.CellRunner: at most one
    event per stream every ~0.1 s) and bounds what it holds, so a cell printing
    30 MB sends a few events of a few KB. Values given as `secrets` are replaced
    by *** first; then only the last MAX_OUTPUT_TEXT characters are kept, and
    `cut` says the text does not start where the previous one ended.
    """

    step: str
    stream: str  # "stdout" or "stderr"
    text: str
    cut: bool = False
    secrets: InitVar[tuple[str, ...]] = ()  # values to mask; not kept

    def __post_init__(self, secrets: tuple[str, ...]) -> None:
        text = masker(secrets)(self.text) if secrets else self.text
        if len(text) > MAX_OUTPUT_TEXT:
            text = text[-MAX_OUTPUT_TEXT:]
            object.__setattr__(self, "cut", True)
        object.__setattr__(self, "text", text)


@dataclass(frozen=True)
class CellFinished(Event):
    step: str
    cell: int
    index: int
    total: int
    duration_s: float
    ok: bool


@dataclass(frozen=True)
class StepSucceeded(Event):
    step: str
    attempt: int
    duration_s: float
    notebook: str
    fingerprint: str
    fingerprint_parts: dict[str, Any]
    parameters: dict[str, Any]
    inputs: tuple[FileRecord, ...]
    outputs: tuple[FileRecord, ...]
    started_at: float = 0.0
    worker: str | None = None  # the dask worker it ran on (None: this machine)


@dataclass(frozen=True)
class StepFailed(Event):
    step: str
    attempt: int
    duration_s: float
    notebook: str | None
    error: StepError
    will_retry: bool = False
    retry_in_s: float = 0.0
    parameters: dict[str, Any] = field(default_factory=dict)
    started_at: float = 0.0


@dataclass(frozen=True)
class StepCancelled(Event):
    step: str
    attempt: int
    duration_s: float
    notebook: str | None
    started_at: float = 0.0


@dataclass(frozen=True)
class StepNotRun(Event):
    step: str
    because: str  # the upstream step that failed or was cancelled


@dataclass(frozen=True)
class StepResult:
    name: str
    status: StepStatus
    attempts: int = 0
    duration_s: float | None = None
    notebook: str | None = None
    error: StepError | None = None
    reasons: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status.value, "attempts": self.attempts,
                "duration_s": None if self.duration_s is None else round(self.duration_s, 3),
                "notebook": self.notebook,
                "error": self.error.to_json() if self.error else None}


@dataclass(frozen=True)
class RunResult:
    run_id: str
    root: str
    status: RunStatus
    steps: dict[str, StepResult]
    started_at: float
    finished_at: float

    @property
    def ok(self) -> bool:
        return self.status == RunStatus.SUCCEEDED

    def check(self) -> "RunResult":
        """Raise RunFailed (exit code 1) unless every step succeeded or was fresh; for scripts and CI."""
        if not self.ok:
            from .errors import RunFailed  # noqa: PLC0415 - errors imports nothing of nbflow either

            raise RunFailed(self)
        return self

    @property
    def duration_s(self) -> float:
        return self.finished_at - self.started_at

    def to_json(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "status": self.status.value,
                "steps": [s.to_json() for s in self.steps.values()]}

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for s in self.steps.values():
            counts[s.status.value] = counts.get(s.status.value, 0) + 1
        return counts


@dataclass(frozen=True)
class RunFinished(Event):
    result: RunResult


@dataclass(frozen=True)
class WatchCycleStarted(Event):
    """A watch (`nbflow run --watch`, `nbflow.watch`) starts a cycle: a run of what went stale."""

    number: int  # 1 for the first cycle, which runs what is stale when the watch starts
    changed: tuple[str, ...]  # what changed since the last cycle (relative to the pipeline folder)
    started_at: float


@dataclass(frozen=True)
class WatchCycleFinished(Event):
    number: int
    changed: tuple[str, ...]
    result: RunResult | None  # None when the cycle could not run: `error` says why
    error: str | None
    watching: int  # files and folders the watch follows now

    @property
    def reran(self) -> tuple[str, ...]:
        """The steps this cycle ran (whatever their outcome)."""
        if self.result is None:
            return ()
        return tuple(name for name, step in self.result.steps.items()
                     if step.status in (StepStatus.SUCCEEDED, StepStatus.FAILED)
                     or (step.status == StepStatus.CANCELLED and step.attempts > 0))


@dataclass(frozen=True)
class WatchStopped(Event):
    """The watch ended (Ctrl-C, Stop, `.stop()`); `error` when it ended by an error of its own."""

    cycles: int
    error: str | None = None


Listener = Callable[[Event], None]

__all__ = [
    "StepStatus", "RunStatus", "StepError", "cell_label", "masker", "FileRecord", "PlannedStep", "Event",
    "RunStarted", "StepSkipped", "StepStarted", "CellStarted", "CellOutput", "CellFinished", "StepSucceeded",
    "StepFailed", "StepCancelled", "StepNotRun",
    "StepResult", "RunResult", "RunFinished", "WatchCycleStarted", "WatchCycleFinished", "WatchStopped", "Listener",
]
