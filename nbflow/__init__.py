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
    "run", "Pipeline", "history", "clean", "repair", "glue", "load_value", "RunHandle",
    "NbflowError", "PipelineError", "StepFailed", "LedgerDamaged", "StepStatus", "RunStatus", "RunResult",
]

_LAZY = {
    "run": "api", "Pipeline": "api", "history": "api", "clean": "api", "repair": "api", "RunHandle": "api",
    "glue": "values", "load_value": "values",
    "NbflowError": "errors", "PipelineError": "errors", "StepFailed": "errors", "LedgerDamaged": "errors",
    "StepStatus": "events", "RunStatus": "events", "RunResult": "events",
}

if TYPE_CHECKING:
    from .api import Pipeline, RunHandle, clean, history, repair, run
    from .errors import LedgerDamaged, NbflowError, PipelineError, StepFailed
    from .events import RunResult, RunStatus, StepStatus
    from .values import glue, load_value


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
