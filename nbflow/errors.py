"""The one exception hierarchy of nbflow.

Owns: every error a user can see, each knowing its exit code and carrying
data (file, line, step) instead of only a formatted string. Must not import
anything heavy: the CLI imports this on every start.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Iterable


class NbflowError(Exception):
    """Base class of every error nbflow raises on purpose."""

    exit_code = 1


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a pipeline, found before any kernel starts."""

    message: str
    file: str | None = None
    line: int | None = None
    step: str | None = None

    def __str__(self) -> str:
        where = self.file or ""
        if where and self.line:
            where = f"{where}:{self.line}"
        return f"{where}: {self.message}" if where else self.message


class PipelineError(NbflowError):
    """The pipeline or the command is invalid (exit code 2). Holds every problem found."""

    exit_code = 2

    def __init__(self, problems: Iterable[Problem] | Problem | str):
        if isinstance(problems, str):
            problems = [Problem(problems)]
        elif isinstance(problems, Problem):
            problems = [problems]
        self.problems: list[Problem] = list(problems)
        super().__init__(self._format())

    def _format(self) -> str:
        if len(self.problems) == 1:
            return str(self.problems[0])
        lines = [f"{len(self.problems)} problems:"]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)

    def __reduce__(self):  # survive pickling (dask workers, background threads)
        return (type(self), (self.problems,))


class CommandError(NbflowError):
    """The command names something that does not exist (a run id, a file): exit code 2."""

    exit_code = 2


class RunFailed(NbflowError):
    """A run ended with a failed step or was cancelled (exit code 1): `RunResult.check()` raises it.

    `.result` is the RunResult; the message names each step that did not succeed and why.
    """

    exit_code = 1

    def __init__(self, result):
        self.result = result
        bad = [f"{name}: {step.status}" + (f" ({step.error.summary()})" if step.error else "")
               for name, step in result.steps.items() if step.status in ("failed", "not_run", "cancelled")]
        super().__init__(f"run {result.run_id} {result.status}: " + "; ".join(bad))

    def __reduce__(self):
        return (type(self), (self.result,))


class PipelineLocked(NbflowError):
    """Another nbflow run of the same pipeline is in progress (exit code 1)."""

    exit_code = 1


class StateError(NbflowError):
    """The `_nbflow/` folder cannot be written (read-only, disk full)."""

    exit_code = 1


class LedgerDamaged(StateError):
    """The run ledger's file is damaged (not an sqlite database, or malformed pages).

    Carries the ledger's path, what sqlite said and the pipeline folder, so
    that the message can name the command that moves the file aside.
    """

    def __init__(self, ledger: str, detail: str, pipeline: str):
        import shlex  # noqa: PLC0415 - only when the ledger is damaged

        self.ledger, self.detail, self.pipeline = ledger, detail, pipeline
        super().__init__(
            f"the run ledger {ledger} is damaged ({detail}); the executed notebooks in _nbflow/runs/ are not "
            f"affected. Move the damaged file aside with `nbflow repair {shlex.quote(pipeline)}`: the next run "
            "then starts a new ledger and runs every step once")

    def __reduce__(self):  # survive pickling (dask workers, background threads)
        return (type(self), (self.ledger, self.detail, self.pipeline))


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return ' (did you mean 'x'?)' when a close match exists, else ''."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
