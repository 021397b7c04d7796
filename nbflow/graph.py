"""Steps -> the pipeline graph, validated all at once.

Owns: discovering the notebooks of a pipeline folder, the edges (B depends on
A when B reads a path A writes, or consumes a value A publishes), and every
check that can be made before a kernel starts. Problems are collected and
raised together as one PipelineError (exit code 2). Must not read the ledger
or execute anything.
"""

from __future__ import annotations

import fnmatch
import graphlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from .config import Config, load_config
from .errors import PipelineError, Problem, did_you_mean
from .layout import STATE_DIR, StateLayout
from .notebook import NOTEBOOK_SUFFIXES, NotAStep, Step, is_percent_script, read_step
from .params import EnvRef, ValueRef, coerce, is_secret_name

_SKIP_DIRS = {STATE_DIR, ".ipynb_checkpoints", "__pycache__", "node_modules"}


@dataclass(frozen=True)
class FileRef:
    """A file a step reads or writes: how the step names it, and where it is."""

    label: str  # as declared ("../data/x.csv") or "value best_month"
    path: Path  # absolute, normalised


@dataclass(frozen=True)
class Graph:
    root: Path
    config: Config
    steps: dict[str, Step]
    not_steps: tuple[NotAStep, ...]
    upstream: dict[str, tuple[str, ...]]
    order: tuple[str, ...]  # a topological order, ties broken by name
    value_producers: dict[str, str] = field(default_factory=dict)

    @property
    def layout(self) -> StateLayout:
        return StateLayout(self.root)

    @property
    def state_dir(self) -> Path:
        return self.layout.state_dir

    def value_path(self, name: str) -> Path:
        return self.layout.value(name)

    def inputs_of(self, name: str) -> list[FileRef]:
        step = self.steps[name]
        refs = [FileRef(label, path) for label, path in step.input_paths()]
        refs += [FileRef(f"value {v}", self.value_path(v)) for v in step.consumes]
        return refs

    def outputs_of(self, name: str) -> list[FileRef]:
        step = self.steps[name]
        refs = [FileRef(label, path) for label, path in step.output_paths()]
        refs += [FileRef(f"value {v}", self.value_path(v)) for v in step.publishes]
        return refs

    def ancestors(self, names: Iterable[str]) -> set[str]:
        seen: set[str] = set()
        todo = list(names)
        while todo:
            for up in self.upstream[todo.pop()]:
                if up not in seen:
                    seen.add(up)
                    todo.append(up)
        return seen

    def descendants(self, names: Iterable[str]) -> set[str]:
        down: dict[str, list[str]] = {s: [] for s in self.steps}
        for s, ups in self.upstream.items():
            for u in ups:
                down[u].append(s)
        seen: set[str] = set()
        todo = list(names)
        while todo:
            for d in down[todo.pop()]:
                if d not in seen:
                    seen.add(d)
                    todo.append(d)
        return seen

    def source_inputs(self, name: str) -> list[FileRef]:
        """Inputs of a step that no step produces: they must exist before the run."""
        produced = {ref.path for s in self.steps for ref in self.outputs_of(s)}
        return [ref for ref in self.inputs_of(name) if ref.path not in produced]


def discover(root: Path, config: Config) -> list[Path]:
    """Every notebook file of the pipeline folder (sorted), after include/exclude."""
    found: list[Path] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("."))
        for f in sorted(files):
            if f.startswith(".") or not f.endswith(NOTEBOOK_SUFFIXES):
                continue
            path = Path(folder) / f
            if f.endswith(".py") and not is_percent_script(path):
                continue
            rel = path.relative_to(root).as_posix()
            if config.include and not any(fnmatch.fnmatch(rel, pat) for pat in config.include):
                continue
            if any(fnmatch.fnmatch(rel, pat) for pat in config.exclude):
                continue
            found.append(path)
    return found


def build_graph(root: str | os.PathLike, config: Config | None = None,
                collect: list[Problem] | None = None) -> Graph:
    """Read every notebook of `root` and build the validated graph.

    Raises PipelineError listing every problem found (malformed notebooks,
    non-literal declarations, duplicate producers, cycles, bad nbflow.yaml).
    With `collect`, problems are appended to it instead and a best-effort
    graph of the readable steps is returned, so that later checks (missing
    inputs, kernels, parameters) can be reported together with these.
    """
    root = Path(root).absolute()
    if not root.is_dir():
        raise PipelineError(Problem(f"pipeline folder {str(root)!r} does not exist or is not a folder"))
    problems: list[Problem] = []
    if config is None:
        try:
            config = load_config(root)
        except PipelineError as e:
            problems += e.problems
            config = Config()
    steps: dict[str, Step] = {}
    not_steps: list[NotAStep] = []
    for path in discover(root, config):
        try:
            item = read_step(path, root)
        except PipelineError as e:
            problems += e.problems
            continue
        if isinstance(item, NotAStep):
            not_steps.append(item)
        elif item.name in steps:
            problems.append(Problem(
                f"two notebooks make step {item.name!r} ({steps[item.name].rel_path} and {item.rel_path}); "
                "rename one", file=item.rel_path))
        else:
            steps[item.name] = item

    producers: dict[Path, str] = {}
    value_producers: dict[str, str] = {}
    state_dir = root / STATE_DIR
    for name, step in steps.items():
        for label, path in step.output_paths():
            if path == state_dir or state_dir in path.parents:
                problems.append(Problem(f"output {label!r} is inside {STATE_DIR}/, which nbflow owns; "
                                        "write it elsewhere", file=step.rel_path, step=name))
            other = producers.setdefault(path, name)
            if other != name:
                problems.append(Problem(
                    f"steps {other!r} and {name!r} both write {_rel(path, root)}; a file must have one "
                    "producer", file=step.rel_path, step=name))
        for value in step.publishes:
            other = value_producers.setdefault(value, name)
            if other != name:
                problems.append(Problem(f"steps {other!r} and {name!r} both publish value {value!r}",
                                        file=step.rel_path, step=name))

    upstream: dict[str, tuple[str, ...]] = {}
    for name, step in steps.items():
        ups = set()
        for _, path in step.input_paths():
            if path in producers and producers[path] != name:
                ups.add(producers[path])
            elif producers.get(path) == name:
                problems.append(Problem(f"reads {_rel(path, root)}, which it also writes", file=step.rel_path))
        for value in step.consumes:
            if value in value_producers:
                ups.add(value_producers[value])
            else:
                problems.append(Problem(
                    f"consumes value {value!r} but no step publishes it"
                    f"{did_you_mean(value, value_producers)}", file=step.rel_path, step=name))
        upstream[name] = tuple(sorted(ups))

    for name in config.steps:
        if name not in steps:
            problems.append(Problem(f"'steps.{name}' names no step{did_you_mean(name, steps)}",
                                    file=str(config.path.name if config.path else "nbflow.yaml"),
                                    line=config.step_lines.get(name)))
        else:
            for pname in config.steps[name].parameters:
                if pname not in steps[name].parameters:
                    problems.append(Problem(
                        f"'steps.{name}.parameters.{pname}': step {name!r} has no parameter {pname!r}"
                        f"{did_you_mean(pname, steps[name].parameters)}",
                        file="nbflow.yaml", line=config.step_lines.get(name)))
    all_params = {p for s in steps.values() for p in s.parameters}
    for secret in config.secrets:
        if secret not in all_params:
            problems.append(Problem(f"'secrets' lists {secret!r}, which is no step's parameter"
                                    f"{did_you_mean(secret, all_params)}", file="nbflow.yaml"))

    order: tuple[str, ...] = tuple(sorted(steps))
    sorter = graphlib.TopologicalSorter({n: upstream.get(n, ()) for n in sorted(steps)})
    try:
        order = tuple(_stable_order(sorter))
    except graphlib.CycleError as e:
        cycle = list(e.args[1])  # each step is followed by one that reads what it writes
        problems.append(Problem("cycle: " + " -> ".join(cycle) + "; a step cannot depend on its own outputs",
                                file=steps[cycle[0]].rel_path if cycle[0] in steps else None))
    if problems:
        if collect is None:
            raise PipelineError(problems)
        collect.extend(problems)
    return Graph(root=root, config=config, steps=dict(sorted(steps.items())), not_steps=tuple(not_steps),
                 upstream=upstream, order=order, value_producers=value_producers)


def _stable_order(sorter: graphlib.TopologicalSorter) -> list[str]:
    sorter.prepare()
    order: list[str] = []
    while sorter.is_active():
        ready = sorted(sorter.get_ready())
        order += ready
        sorter.done(*ready)
    return order


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return os.path.relpath(path, root)


def select_steps(graph: Graph, names: Iterable[str]) -> list[str]:
    """The named steps and every step they need, in graph order. Unknown names are errors."""
    names = list(names)
    if not names:
        return list(graph.order)
    problems = [Problem(f"no step named {n!r}{did_you_mean(n, graph.steps)}; steps: {', '.join(graph.order)}")
                for n in names if n not in graph.steps]
    if problems:
        raise PipelineError(problems)
    wanted = set(names) | graph.ancestors(names)
    return [s for s in graph.order if s in wanted]


def resolve_parameters(graph: Graph, overrides: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Effective parameters of every step: notebook defaults < nbflow.yaml < `NAME` < `STEP.NAME`.

    Secrets become EnvRef, consumed values ValueRef. Raises PipelineError
    listing every unknown name and badly typed value.
    """
    overrides = dict(overrides or {})
    problems: list[Problem] = []
    global_over: dict[str, Any] = {}
    step_over: dict[str, dict[str, Any]] = {}
    all_params = sorted({p for s in graph.steps.values() for p in s.parameters})
    for key, value in overrides.items():
        step_name, dot, pname = key.rpartition(".")
        if dot and step_name in graph.steps:
            if pname not in graph.steps[step_name].parameters:
                problems.append(Problem(
                    f"-p {key}: step {step_name!r} has no parameter {pname!r}"
                    f"{did_you_mean(pname, graph.steps[step_name].parameters)}",
                    file=graph.steps[step_name].rel_path))
                continue
            step_over.setdefault(step_name, {})[pname] = value
        elif key in all_params:
            global_over[key] = value
        elif dot and key not in all_params:
            problems.append(Problem(f"-p {key}: no step named {step_name!r}{did_you_mean(step_name, graph.steps)}"
                                    if step_name not in graph.steps else f"-p {key}: unknown parameter"))
        else:
            hint = did_you_mean(key, all_params)
            problems.append(Problem(f"-p {key}: no step has a parameter {key!r}{hint}"
                                    + ("" if hint else f"; parameters: {', '.join(all_params) or 'none'}")))
    declared_secrets = set(graph.config.secrets)
    result: dict[str, dict[str, Any]] = {}
    for name, step in graph.steps.items():
        values: dict[str, Any] = {}
        chosen = {**graph.config.steps.get(name, _EMPTY).parameters,
                  **{k: v for k, v in global_over.items() if k in step.parameters},
                  **step_over.get(name, {})}
        for pname, param in step.parameters.items():
            if pname in step.consumes:
                rel = os.path.relpath(graph.value_path(pname), step.folder)
                values[pname] = ValueRef(Path(rel).as_posix())
                continue
            if pname in declared_secrets or (is_secret_name(pname) and pname in chosen):
                values[pname] = EnvRef(secret_env_var(pname))
                continue
            if pname not in chosen:
                continue  # the notebook's own default stays; nothing injected
            yaml_params = graph.config.steps.get(name, _EMPTY).parameters
            if pname in yaml_params and chosen[pname] is yaml_params[pname] and not _same_kind(chosen[pname], param):
                problems.append(Problem(
                    f"'steps.{name}.parameters.{pname}' must be {param.type_name} like the default "
                    f"{param.source} in {step.rel_path}, not {chosen[pname]!r}", file="nbflow.yaml",
                    line=graph.config.step_lines.get(name), step=name))
                continue
            try:
                values[pname] = coerce(chosen[pname], param)
            except ValueError as e:
                problems.append(Problem(f"step {name!r}, parameter {pname!r}: {e}", file=step.rel_path,
                                        line=param.line, step=name))
        result[name] = values
    if problems:
        raise PipelineError(problems)
    return result


def _same_kind(value: Any, param: Any) -> bool:
    """A value from nbflow.yaml fits a parameter whose default is a literal of some type."""
    kind = param.type_name
    if kind in ("NoneType", "expression") or value is None:
        return True
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "tuple":
        return isinstance(value, (list, tuple))
    return type(value).__name__ == kind


def secret_env_var(name: str) -> str:
    return f"NBFLOW_SECRET_{name.upper()}"


def secret_values(graph: Graph, overrides: Mapping[str, Any] | None) -> dict[str, dict[str, str]]:
    """Per step, the environment its kernel needs: each secret's value under its variable.

    A secret's value comes from `-p` (step-scoped first), nbflow.yaml, or the
    variable already set in nbflow's own environment; it is never written.
    """
    overrides = overrides or {}
    result: dict[str, dict[str, str]] = {}
    for name, step in graph.steps.items():
        env: dict[str, str] = {}
        for pname, param in step.parameters.items():
            if pname not in graph.config.secrets and not is_secret_name(pname):
                continue
            var = secret_env_var(pname)
            for source in (overrides.get(f"{name}.{pname}"), overrides.get(pname),
                           graph.config.steps.get(name, _EMPTY).parameters.get(pname), os.environ.get(var)):
                if source is not None:
                    env[var] = str(source)
                    break
            else:
                if pname in graph.config.secrets:
                    env[var] = "" if param.default is None else str(param.default)
        result[name] = env
    return result


class _Empty:
    parameters: dict[str, Any] = {}


_EMPTY = _Empty()
