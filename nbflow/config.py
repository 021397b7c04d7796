"""Read and validate `nbflow.yaml`, the optional settings file of a pipeline.

Owns: the schema of the file, its defaults, and error messages that give the
line and the key (with a did-you-mean for unknown keys). Must not know about
notebooks or the graph: `graph.py` checks step names and parameters against
the notebooks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import PipelineError, Problem, did_you_mean

CONFIG_NAME = "nbflow.yaml"

_STEP_KEYS: dict[str, tuple[type, ...]] = {
    "kernel": (str,),
    "retries": (int,),
    "retry_delay": (int, float),
    "timeout": (int, float, type(None)),
    "cell_timeout": (int, float, type(None)),
}
_TOP_KEYS: dict[str, tuple[type, ...]] = {
    "include": (list,),
    "exclude": (list,),
    "defaults": (dict,),
    "steps": (dict,),
    "secrets": (list,),
    "on_failure": (str, type(None)),
    "on_success": (str, type(None)),
    "schedule": (str, type(None)),
    "executor": (str,),
    "jobs": (int, type(None)),
    "forkserver": (bool,),
}
_TYPE_WORDS = {int: "an integer", float: "a number", str: "a string", list: "a list",
               dict: "a mapping", bool: "true or false", type(None): "null"}


def _bound_broken(key: str, value: Any) -> str | None:
    """What a number of the right type must be, when it is out of bounds (None when it is fine)."""
    if value is None:
        return None
    if key == "jobs" and not value >= 1:
        return "at least 1"
    if key == "retries" and not value >= 0:
        return "at least 0"
    if key == "retry_delay" and not 0 <= value < math.inf:  # `not`: NaN is out of bounds too
        return f"a number of seconds, at least 0, not {value!r}"
    if key in ("timeout", "cell_timeout") and not value > 0:
        return f"more than 0 seconds, or null for no limit, not {value!r}"
    return None


@dataclass(frozen=True)
class StepSettings:
    kernel: str | None = None  # None: the notebook's own kernelspec
    retries: int = 0
    retry_delay: float = 1.0
    timeout: float | None = None
    cell_timeout: float | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    explicit: frozenset[str] = frozenset()  # keys written in the file, to overlay on defaults


@dataclass(frozen=True)
class Config:
    path: Path | None = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    defaults: StepSettings = StepSettings()
    steps: dict[str, StepSettings] = field(default_factory=dict)
    step_lines: dict[str, int] = field(default_factory=dict)
    secrets: tuple[str, ...] = ()
    on_failure: str | None = None
    on_success: str | None = None
    schedule: str | None = None
    executor: str = "local"
    jobs: int | None = None
    forkserver: bool = True

    def for_step(self, name: str) -> StepSettings:
        """Defaults overlaid with the step's own settings."""
        own = self.steps.get(name)
        if own is None:
            return self.defaults
        merged = {key: getattr(own if key in own.explicit else self.defaults, key) for key in _STEP_KEYS}
        return StepSettings(**merged, parameters=dict(own.parameters), explicit=own.explicit)


def load_config(folder: Path) -> Config:
    """Read `<folder>/nbflow.yaml`; an absent file gives the defaults."""
    path = Path(folder) / CONFIG_NAME
    if not path.exists():
        return Config()
    import yaml  # noqa: PLC0415 - only when the file exists

    rel = CONFIG_NAME
    try:
        text = path.read_text(encoding="utf-8")
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except UnicodeDecodeError:
        raise PipelineError(Problem("not UTF-8 text", file=rel)) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark else None
        what = getattr(e, "problem", None) or str(e)
        raise PipelineError(Problem(f"YAML syntax error: {what}", file=rel, line=line)) from None
    if data is None:
        return Config(path=path)
    problems: list[Problem] = []
    if not isinstance(data, dict):
        raise PipelineError(Problem("must be a mapping of settings (key: value)", file=rel, line=1))

    def line_of(*keys: str) -> int | None:
        current = node
        line = None
        for key in keys:
            if current is None or not hasattr(current, "value") or not isinstance(current.value, list):
                break
            for k, v in current.value:
                if getattr(k, "value", None) == key:
                    line = k.start_mark.line + 1
                    current = v
                    break
            else:
                break
        return line

    def check(mapping: dict, schema: dict[str, tuple[type, ...]], prefix: tuple[str, ...]) -> dict:
        good = {}
        for key, value in mapping.items():
            dotted = ".".join(prefix + (str(key),))
            if key not in schema:
                problems.append(Problem(
                    f"unknown key {dotted!r}{did_you_mean(str(key), schema)}",
                    file=rel, line=line_of(*prefix, str(key))))
                continue
            types = schema[key]
            if isinstance(value, bool) and bool not in types:
                ok = False
            else:
                ok = isinstance(value, types)
            if not ok:
                wanted = " or ".join(_TYPE_WORDS.get(t, t.__name__) for t in types)
                problems.append(Problem(
                    f"{dotted!r} must be {wanted}, not {value!r}", file=rel, line=line_of(*prefix, str(key))))
                continue
            bound = _bound_broken(key, value)
            if bound:
                problems.append(Problem(f"{dotted!r} must be {bound}", file=rel, line=line_of(*prefix, str(key))))
                continue
            good[key] = value
        return good

    top = check(data, _TOP_KEYS, ())
    for key in ("include", "exclude", "secrets"):
        if key in top and not all(isinstance(x, str) for x in top[key]):
            problems.append(Problem(f"{key!r} must be a list of strings", file=rel, line=line_of(key)))
            top.pop(key)
    if top.get("executor", "local") not in ("local", "dask"):
        problems.append(Problem(f"'executor' must be 'local' or 'dask', not {top['executor']!r}",
                                file=rel, line=line_of("executor")))
    if top.get("schedule"):
        from croniter import croniter  # noqa: PLC0415

        if not croniter.is_valid(top["schedule"]):
            problems.append(Problem(f"'schedule' is not a valid cron expression: {top['schedule']!r}",
                                    file=rel, line=line_of("schedule")))

    def settings(raw: dict, prefix: tuple[str, ...], allow_parameters: bool) -> StepSettings:
        schema = dict(_STEP_KEYS)
        if allow_parameters:
            schema["parameters"] = (dict,)
        good = check(raw, schema, prefix)
        return StepSettings(**good, explicit=frozenset(good))

    defaults = settings(top.get("defaults", {}), ("defaults",), False)
    steps: dict[str, StepSettings] = {}
    step_lines: dict[str, int] = {}
    for name, raw in top.get("steps", {}).items():
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            problems.append(Problem(f"'steps.{name}' must be a mapping of settings",
                                    file=rel, line=line_of("steps", str(name))))
            continue
        steps[str(name)] = settings(raw, ("steps", str(name)), True)
        step_lines[str(name)] = line_of("steps", str(name)) or 0
    if problems:
        raise PipelineError(problems)
    return Config(
        path=path,
        include=tuple(top.get("include", ())),
        exclude=tuple(top.get("exclude", ())),
        defaults=defaults,
        steps=steps,
        step_lines=step_lines,
        secrets=tuple(top.get("secrets", ())),
        on_failure=top.get("on_failure"),
        on_success=top.get("on_success"),
        schedule=top.get("schedule"),
        executor=top.get("executor", "local"),
        jobs=top.get("jobs"),
        forkserver=top.get("forkserver", True),
    )
