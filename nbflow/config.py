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
    "pythonpath": (list, type(None)),
    "env": (dict,),
    "fingerprint": (dict,),
    "openlineage": (bool, dict),
    "storage": (dict,),
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
    env: dict[str, str] = field(default_factory=dict)  # the step's own; Config.for_step adds the pipeline's
    explicit: frozenset[str] = frozenset()  # keys written in the file, to overlay on defaults
    grid: dict[str, Any] | None = None  # key -> list of values, as read (graph.py checks it); None: no grid


@dataclass(frozen=True)
class Config:
    path: Path | None = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    defaults: StepSettings = StepSettings()
    steps: dict[str, StepSettings] = field(default_factory=dict)
    step_lines: dict[str, int] = field(default_factory=dict)
    grid_lines: dict[str, dict[str, int]] = field(default_factory=dict)  # step -> grid key ("": `grid:`) -> line
    secrets: tuple[str, ...] = ()
    on_failure: str | None = None
    on_success: str | None = None
    schedule: str | None = None
    executor: str = "local"
    jobs: int | None = None
    forkserver: bool = True
    pythonpath: tuple[str, ...] | None = None  # folders relative to the pipeline folder; None: the project root
    env: dict[str, str] = field(default_factory=dict)  # for every step; `$VAR` takes the caller's VAR
    fingerprint_packages: bool = False  # `fingerprint: {packages: true}`: package versions count too
    # `openlineage: true` or {namespace, transport}: lineage events (ui/openlineage.py); None: not in the file
    openlineage: bool | dict[str, Any] | None = None
    # `storage: {s3: {endpoint_url: ...}}`: fsspec options per protocol for declared URLs (stores.py); no credentials
    storage: dict[str, dict[str, Any]] = field(default_factory=dict)
    # for_step's answers by settings name: asked several times for each of thousands of grid instances
    _merged: dict[str, StepSettings] = field(default_factory=dict, init=False, repr=False, compare=False)

    def for_step(self, name: str) -> StepSettings:
        """Defaults overlaid with the step's own settings; the pipeline's `env` under the step's.

        An instance of a grid (`train[alpha=0.1]`) has the settings of its step (`train`).
        """
        key = name if name in self.steps else name.partition("[")[0]
        merged = self._merged.get(key)
        if merged is None:
            own = self.steps.get(key) or StepSettings()
            values = {k: getattr(own if k in own.explicit else self.defaults, k) for k in _STEP_KEYS}
            merged = self._merged[key] = StepSettings(**values, parameters=own.parameters, env={**self.env, **own.env},
                                                      explicit=own.explicit)
        return merged


def load_config(folder: Path) -> Config:
    """Read `<folder>/nbflow.yaml`; an absent file gives the defaults."""
    path = Path(folder) / CONFIG_NAME
    if not path.exists():
        return Config()
    import yaml  # noqa: PLC0415 - only when the file exists

    try:
        text = path.read_text(encoding="utf-8")
        node, data = _parse(yaml, text)
    except UnicodeDecodeError:
        raise PipelineError(Problem("not UTF-8 text", file=CONFIG_NAME)) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        what = getattr(e, "problem", None) or str(e)
        raise PipelineError(Problem(f"YAML syntax error: {what}", file=CONFIG_NAME,
                                    line=mark.line + 1 if mark else None)) from None
    if data is None:
        return Config(path=path)
    if not isinstance(data, dict):
        raise PipelineError(Problem("must be a mapping of settings (key: value)", file=CONFIG_NAME, line=1))
    reader = _Reader(node)
    config = reader.config(path, data)
    if reader.problems:
        raise PipelineError(reader.problems)
    return config


def _parse(yaml: Any, text: str) -> tuple[Any, Any]:
    """The document's node (for line numbers) and its data, parsed once, with libyaml where it is installed
    (a grid of 2,000 values: 7 ms instead of 0.4 s)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)(text)
    try:
        node = loader.get_single_node()
        return node, (loader.construct_document(node) if node is not None else None)
    finally:
        loader.dispose()


class _Reader:
    """Checks the parsed file against the schema, collecting every problem with its line."""

    def __init__(self, node: Any):
        self.node = node
        self.problems: list[Problem] = []

    def problem(self, message: str, *keys: str) -> None:
        self.problems.append(Problem(message, file=CONFIG_NAME, line=self.line_of(*keys)))

    def line_of(self, *keys: str) -> int | None:
        current, line = self.node, None
        for key in keys:
            if current is None or not hasattr(current, "value") or not isinstance(current.value, list):
                break
            for k, v in current.value:
                if getattr(k, "value", None) == key:
                    line, current = k.start_mark.line + 1, v
                    break
            else:
                break
        return line

    def check(self, mapping: dict, schema: dict[str, tuple[type, ...]], prefix: tuple[str, ...]) -> dict:
        good = {}
        for key, value in mapping.items():
            where = prefix + (str(key),)
            dotted = ".".join(where)
            if key not in schema:
                self.problem(f"unknown key {dotted!r}{did_you_mean(str(key), schema)}", *where)
                continue
            types = schema[key]
            if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
                wanted = " or ".join(_TYPE_WORDS.get(t, t.__name__) for t in types)
                self.problem(f"{dotted!r} must be {wanted}, not {value!r}", *where)
                continue
            bound = _bound_broken(key, value)
            if bound:
                self.problem(f"{dotted!r} must be {bound}", *where)
                continue
            if key == "env" and isinstance(value, dict) and not self.variables(value, where):
                continue
            good[key] = value
        return good

    def variables(self, env: dict, where: tuple[str, ...]) -> bool:
        """`env:` maps variable names to strings (numbers are written as text)."""
        bad = [k for k, v in env.items() if not isinstance(k, str) or not k.isidentifier()
               or not isinstance(v, (str, int, float)) or isinstance(v, bool)]
        for k in bad:
            self.problem(f"'{'.'.join(where)}.{k}': a variable needs a name (letters, digits, _) and a string value",
                         *where)
        return not bad

    def settings(self, raw: dict, prefix: tuple[str, ...], step: bool) -> StepSettings:
        schema = dict(_STEP_KEYS)
        if step:
            schema.update(parameters=(dict,), env=(dict,), grid=(dict,))
        good = self.check(raw, schema, prefix)
        env = {k: str(v) for k, v in good.pop("env", {}).items()}
        grid = {str(k): v for k, v in good.pop("grid").items()} if "grid" in good else None
        return StepSettings(**good, env=env, grid=grid, explicit=frozenset(good))

    def config(self, path: Path, data: dict) -> Config:
        top = self.check(data, _TOP_KEYS, ())
        for key in ("include", "exclude", "secrets", "pythonpath"):
            if top.get(key) is not None and not all(isinstance(x, str) for x in top[key]):
                self.problem(f"{key!r} must be a list of strings", key)
                top.pop(key)
        if top.get("executor", "local") not in ("local", "dask"):
            self.problem(f"'executor' must be 'local' or 'dask', not {top['executor']!r}", "executor")
        if top.get("schedule"):
            from croniter import croniter  # noqa: PLC0415

            if not croniter.is_valid(top["schedule"]):
                self.problem(f"'schedule' is not a valid cron expression: {top['schedule']!r}", "schedule")
        defaults = self.settings(top.get("defaults", {}), ("defaults",), False)
        steps: dict[str, StepSettings] = {}
        step_lines: dict[str, int] = {}
        grid_lines: dict[str, dict[str, int]] = {}
        for name, raw in top.get("steps", {}).items():
            if not isinstance(raw if raw is not None else {}, dict):
                self.problem(f"'steps.{name}' must be a mapping of settings", "steps", str(name))
                continue
            steps[str(name)] = self.settings(raw or {}, ("steps", str(name)), True)
            step_lines[str(name)] = self.line_of("steps", str(name)) or 0
            if steps[str(name)].grid is not None:
                grid_line = self.line_of("steps", str(name), "grid") or step_lines[str(name)]
                grid_lines[str(name)] = {"": grid_line, **{key: self.line_of("steps", str(name), "grid", key)
                                                           or grid_line for key in steps[str(name)].grid or {}}}
        pythonpath = top.get("pythonpath")
        return Config(
            path=path,
            include=tuple(top.get("include", ())),
            exclude=tuple(top.get("exclude", ())),
            defaults=defaults,
            steps=steps,
            step_lines=step_lines,
            grid_lines=grid_lines,
            secrets=tuple(top.get("secrets", ())),
            on_failure=top.get("on_failure"),
            on_success=top.get("on_success"),
            schedule=top.get("schedule"),
            executor=top.get("executor", "local"),
            jobs=top.get("jobs"),
            forkserver=top.get("forkserver", True),
            pythonpath=None if pythonpath is None else tuple(pythonpath),
            env={k: str(v) for k, v in top.get("env", {}).items()},
            fingerprint_packages=self.fingerprint_options(top.get("fingerprint", {})),
            openlineage=self.openlineage_options(top.get("openlineage")),
            storage=self.storage_options(top.get("storage", {})),
        )

    def storage_options(self, raw: dict) -> dict[str, dict[str, Any]]:
        """`storage:` per protocol: options handed to fsspec (endpoint, region, anonymous access), never secrets."""
        from .stores import credential_options  # noqa: PLC0415

        storage: dict[str, dict[str, Any]] = {}
        for protocol, options in raw.items():
            if not isinstance(options, dict):
                self.problem(f"'storage.{protocol}' must be a mapping of fsspec options, like {{endpoint_url: ...}}",
                             "storage", str(protocol))
                continue
            secret = credential_options(options)
            for keys in secret:
                self.problem(f"'storage.{protocol}.{'.'.join(keys)}' is a credential; credentials come only from "
                             "the environment or the store's own config files, never from nbflow.yaml",
                             "storage", str(protocol), *keys)
            if secret:
                continue
            storage[str(protocol).lower()] = dict(options)
        return storage

    def fingerprint_options(self, raw: dict) -> bool:
        good = self.check(raw, {"packages": (bool,)}, ("fingerprint",))
        return bool(good.get("packages", False))

    def openlineage_options(self, raw: bool | dict | None) -> bool | dict[str, Any] | None:
        """`openlineage: true`, or its settings: the jobs' `namespace`, the client's `transport`."""
        if not isinstance(raw, dict):
            return raw
        return self.check(raw, {"namespace": (str,), "transport": (dict,)}, ("openlineage",))
