"""nbflow: a folder of Jupyter notebooks becomes a pipeline.

    import nbflow
    result = nbflow.run("notebooks")          # in Jupyter: a live status widget
    nbflow.Pipeline("notebooks").status()
    nbflow.history("notebooks")               # a pandas DataFrame

Importing nbflow is cheap: everything heavy is imported when first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .version import __version__

__all__ = [
    "run", "start", "watch", "Pipeline", "RunHandle", "WatchHandle", "history", "show", "lineage", "schedule",
    "clean", "repair",
    "glue", "load_value",
    "NbflowError", "PipelineError", "RunFailed", "PipelineLocked", "LedgerDamaged",
    "StepStatus", "RunStatus", "RunResult", "StepResult", "StepError",
]

_LAZY = {
    **dict.fromkeys(["run", "start", "watch", "Pipeline", "RunHandle", "history", "show", "lineage", "schedule",
                     "clean", "repair"], "api"),
    "WatchHandle": "watcher",
    **dict.fromkeys(["glue", "load_value"], "values"),
    **dict.fromkeys(["NbflowError", "PipelineError", "RunFailed", "PipelineLocked", "LedgerDamaged"], "errors"),
    **dict.fromkeys(["StepStatus", "RunStatus", "RunResult", "StepResult", "StepError"], "events"),
}

if TYPE_CHECKING:
    from .api import Pipeline, RunHandle, clean, history, lineage, repair, run, schedule, show, start, watch
    from .errors import LedgerDamaged, NbflowError, PipelineError, PipelineLocked, RunFailed
    from .events import RunResult, RunStatus, StepError, StepResult, StepStatus
    from .values import glue, load_value
    from .watcher import WatchHandle


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'nbflow' has no attribute {name!r}")
    import importlib  # noqa: PLC0415

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))
