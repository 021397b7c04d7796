"""Plain one-line-per-event logs, for when stdout is not a terminal (CI, cron, files).

Owns: the text of each event as one line with a timestamp. A listener; never
called by the Runner directly.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from ..events import (CellFinished, Event, RunFinished, RunStarted, StepCancelled, StepFailed, StepNotRun,
                      StepSkipped, StepStarted, StepSucceeded, WatchCycleFinished, WatchCycleStarted, WatchStopped)
from .view import cycle_cause, cycle_outcome, format_duration, not_run_note

# why a failed step has no executed notebook, when that is the nature of its failure
_NO_NOTEBOOK = {"kernel_start": "", "not_here": "",  # no kernel ever ran its cells
                "worker_lost": "\n    (its executed notebook was on the lost worker)",
                "scheduler_lost": "\n    (its executed notebook stayed on the worker)"}


def describe(event: Event) -> str | None:
    """One line for an event, or None for events too fine-grained for a log."""
    if isinstance(event, RunStarted):
        runs = sum(1 for p in event.plan if p.action == "run")
        return f"run {event.run_id}: {len(event.plan)} steps, {runs} to run"
    if isinstance(event, StepSkipped):
        return f"{event.step}: skipped ({'; '.join(event.reasons)})"
    if isinstance(event, StepStarted):
        why = f" because {'; '.join(event.reasons)}" if event.reasons and event.attempt == 1 else ""
        attempt = f" (attempt {event.attempt})" if event.attempt > 1 else ""
        return f"{event.step}: started{attempt}{why}"
    if isinstance(event, StepSucceeded):
        return f"{event.step}: succeeded in {format_duration(event.duration_s)} -> {event.notebook}"
    if isinstance(event, StepFailed):
        retry = f"; retry in {event.retry_in_s:g} s" if event.will_retry else ""
        where = f"\n    at: {event.error.source_line}" if event.error.source_line else ""
        kept = f"\n    notebook: {event.notebook}" if event.notebook else _NO_NOTEBOOK.get(
            event.error.kind, "\n    (the executed notebook could not be saved)")
        return (f"{event.step}: FAILED after {format_duration(event.duration_s)}: {event.error.summary()}{retry}"
                f"{where}{kept}")
    if isinstance(event, StepCancelled):
        return f"{event.step}: cancelled" + (f" -> {event.notebook}" if event.notebook else "")
    if isinstance(event, StepNotRun):
        return f"{event.step}: not run ({not_run_note(event.because)})"
    if isinstance(event, RunFinished):
        r = event.result
        counts = ", ".join(f"{n} {s}" for s, n in sorted(r.counts().items()))
        return f"run {r.run_id}: {r.status.value} in {format_duration(r.duration_s)} ({counts})"
    if isinstance(event, CellFinished):
        return None
    return None


class LogListener:
    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stdout

    def __call__(self, event: Event) -> None:
        line = describe(event)
        if line is not None:
            self.stream.write(f"{time.strftime('%H:%M:%S')} {line}\n")
            self.stream.flush()


class WatchLog(LogListener):
    """Watch mode off a terminal: a line when a cycle starts (what changed) and ends (what reran), and the
    run's lines in between, fresh steps left out."""

    def __call__(self, event: Event) -> None:
        if isinstance(event, WatchCycleStarted):
            line: str | None = f"cycle {event.number}: {cycle_cause(event.changed)}"
        elif isinstance(event, WatchCycleFinished):
            line = (f"cycle {event.number}: {cycle_outcome(event)[0]}\n"
                    f"watching {event.watching} files and folders for changes")
        elif isinstance(event, WatchStopped):
            line = f"watch stopped after {event.cycles} cycle(s)" + (f": {event.error}" if event.error else "")
        elif isinstance(event, StepSkipped):
            line = None
        else:
            line = describe(event)
        if line is not None:
            self.stream.write(f"{time.strftime('%H:%M:%S')} {line}\n")
            self.stream.flush()
