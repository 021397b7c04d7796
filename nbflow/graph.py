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
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from .config import CONFIG_NAME, Config, load_config
from .errors import PipelineError, Problem, did_you_mean
from .layout import STATE_DIR, StateLayout
from .notebook import NOTEBOOK_SUFFIXES, NotAStep, Step, is_percent_script, read_step
from .params import EnvRef, ValueRef, coerce, is_secret_name, plain_value, secret_env_var, secret_from_environment

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
    produced: frozenset[Path] = frozenset()  # input paths that some step writes (or writes inside)

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

    def python_path(self) -> tuple[Path, ...]:
        """Folders put first on every step's `sys.path`: `pythonpath:` of nbflow.yaml, else the project root."""
        if self.config.pythonpath is not None:
            return tuple(Path(os.path.normpath(self.root / p)) for p in self.config.pythonpath)
        root = project_root(self.root)
        return (root,) if root is not None else ()

    def environment(self, name: str) -> dict[str, str]:
        """The variables nbflow.yaml's `env:` sets for a step, `$VAR` taken from nbflow's own environment."""
        env = {}
        for var, text in self.config.for_step(name).env.items():
            try:
                env[var] = string.Template(text).substitute(os.environ)
            except KeyError as e:
                raise PipelineError(Problem(f"'env.{var}' refers to ${e.args[0]}, which is not set in nbflow's "
                                            "environment; set it, or write $$ for a literal $", file="nbflow.yaml",
                                            step=name)) from None
            except ValueError:
                raise PipelineError(Problem(f"'env.{var}': {text!r} has a $ that starts no variable name; write "
                                            "$$ for a literal $", file="nbflow.yaml", step=name)) from None
        return env

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
        values = {self.value_path(v) for v in self.value_producers}
        return [ref for ref in self.inputs_of(name) if ref.path not in self.produced and ref.path not in values]


def project_root(folder: Path) -> Path | None:
    """The nearest folder at or above `folder` that holds `.git` or `pyproject.toml`: the project's root."""
    for candidate in (folder, *folder.parents):
        if (candidate / ".git").exists() or (candidate / "pyproject.toml").is_file():
            return candidate
    return None


def other_pipelines(root: Path, nested: list[Path]) -> list[Problem]:
    """A folder that is not a pipeline yet but lies inside one, or holds one: never a second ledger unsaid.

    A folder is a pipeline once it has `nbflow.yaml` or `_nbflow/` (as a git
    repository has `.git`). Running a folder inside a pipeline, or a folder
    around one, would start a second ledger for the same notebooks.
    """
    if (root / CONFIG_NAME).exists() or (root / STATE_DIR).is_dir():
        return []
    make_own = f"or create {root / CONFIG_NAME} (it may be empty) to make {root} a pipeline of its own"
    home = Path.home()
    for above in root.parents:
        if above == above.parent or above == home.parent:
            break  # never the file system's root or the folder of home folders: a stray _nbflow/ there is no project
        if (above / STATE_DIR).is_dir() or (above / CONFIG_NAME).exists():
            return [Problem(f"{root} is inside the pipeline {above} (it has {STATE_DIR}/ or {CONFIG_NAME}); run "
                            f"`nbflow run {above}` (name steps to run only some), {make_own}")]
        if (above / ".git").exists() or (above / "pyproject.toml").is_file():
            break  # a project's root: pipelines of other projects above it are none of its business
    if nested:  # found by `discover`, which walks the folder anyway
        inner = nested[0]
        return [Problem(f"{inner} below {root} is a pipeline already (it has {STATE_DIR}/); run "
                        f"`nbflow run {inner}`, {make_own}")]
    return []


def discover(root: Path, config: Config, nested: list[Path] | None = None) -> list[Path]:
    """Every notebook file of the pipeline folder (sorted), after include/exclude.

    Folders below `root` that hold a state folder of their own are added to `nested`.
    """
    found: list[Path] = []
    for folder, dirs, files in os.walk(root):
        if nested is not None and folder != str(root) and STATE_DIR in dirs:
            nested.append(Path(folder))
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
    nested: list[Path] = []
    steps, not_steps = _read_steps(root, config, problems, nested)
    problems[:0] = other_pipelines(root, nested)
    producers, value_producers = _producers(root, steps, problems)
    upstream, produced = _edges(root, steps, producers, value_producers, problems)
    problems += [lost_step_problem(nb, f"step {reader!r} reads {relative_to(path, root)}, which it writes")
                 for nb, reader, path in _read_from_not_steps(steps, not_steps)]
    _check_config(config, steps, problems)
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
                 upstream=upstream, order=order, value_producers=value_producers, produced=frozenset(produced))


def _read_steps(root: Path, config: Config, problems: list[Problem], nested: list[Path]
                ) -> tuple[dict[str, Step], list[NotAStep]]:
    steps: dict[str, Step] = {}
    not_steps: list[NotAStep] = []
    for path in discover(root, config, nested):
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
    return steps, not_steps


def _producers(root: Path, steps: dict[str, Step], problems: list[Problem]
               ) -> tuple[dict[Path, str], dict[str, str]]:
    """Who writes each output path and publishes each value; one producer each, none inside `_nbflow/`."""
    producers: dict[Path, str] = {}
    value_producers: dict[str, str] = {}
    state_dir = Path(os.path.realpath(root / STATE_DIR))
    for name, step in steps.items():
        for label, path in step.output_paths():
            real = Path(os.path.realpath(path))  # a symlink must not lead an output into the ledger's folder
            if real == state_dir or state_dir in real.parents:
                via = f" (through a symlink, it is {real})" if real != path else ""
                problems.append(Problem(f"output {label!r} is inside {STATE_DIR}/{via}, which nbflow owns; write it "
                                        "elsewhere", file=step.rel_path, step=name))
            other = producers.setdefault(path, name)
            if other != name:
                problems.append(Problem(
                    f"steps {other!r} and {name!r} both write {relative_to(path, root)}; a file must have one "
                    "producer", file=step.rel_path, step=name))
        for value in step.publishes:
            other = value_producers.setdefault(value, name)
            if other != name:
                problems.append(Problem(f"steps {other!r} and {name!r} both publish value {value!r}",
                                        file=step.rel_path, step=name))
    return producers, value_producers


def _edges(root: Path, steps: dict[str, Step], producers: dict[Path, str], value_producers: dict[str, str],
           problems: list[Problem]) -> tuple[dict[str, tuple[str, ...]], set[Path]]:
    """Each step's upstream steps, and the input paths that some step produces.

    B depends on A when B reads a path A writes, a path inside a folder A
    writes, or declares a folder input (`"metrics/"`) that A writes inside.
    """
    upstream: dict[str, tuple[str, ...]] = {}
    produced: set[Path] = set()
    for name, step in steps.items():
        ups = set()
        for label, path in step.input_paths():
            writers = {producers[p] for p in (path, *path.parents) if p in producers}
            if is_folder_path(label):
                writers |= {w for p, w in producers.items() if path in p.parents}
            if name in writers:
                problems.append(Problem(f"reads {relative_to(path, root)}, which it also writes", file=step.rel_path))
                writers.discard(name)
            if writers:
                produced.add(path)
            ups |= writers
        for value in step.consumes:
            if value in value_producers:
                ups.add(value_producers[value])
            else:
                problems.append(Problem(
                    f"consumes value {value!r} but no step publishes it"
                    f"{did_you_mean(value, value_producers)}", file=step.rel_path, step=name))
        upstream[name] = tuple(sorted(ups))
    return upstream, produced


def _read_from_not_steps(steps: dict[str, Step], not_steps: list[NotAStep]) -> list[tuple[NotAStep, str, Path]]:
    """Notebooks that are not steps but declare outputs a step reads: (notebook, reader, path)."""
    found = []
    for nb in not_steps:
        for _, out in nb.output_paths():
            reader = next((name for name, step in steps.items() for label, path in step.input_paths()
                           if path == out or out in path.parents or (is_folder_path(label) and path in out.parents)),
                          None)
            if reader is not None:
                found.append((nb, reader, out))
                break
    return found


def lost_step_problem(nb: NotAStep, why: str) -> Problem:
    """A notebook that must be a step but has no `parameters` cell: the run would use stale data silently."""
    cell = f"cell {nb.declaring_cell}" if nb.declaring_cell else "its parameters cell"
    return Problem(
        f"has no cell tagged 'parameters', so it is not a step, but {why}; restore the tag on {cell} (in Jupyter: "
        f"select the cell, open the property inspector (gear icon), add the tag parameters), or leave it out "
        f"of the pipeline with `exclude: [\"{nb.rel_path}\"]` in nbflow.yaml", file=nb.rel_path, step=nb.name)


def is_folder_path(declared: str) -> bool:
    """A declared path ending in `/` is a folder: it is hashed as a whole, and read as everything inside it."""
    return declared.endswith(("/", os.sep))


def _check_config(config: Config, steps: dict[str, Step], problems: list[Problem]) -> None:
    """nbflow.yaml names only steps, parameters and secrets that exist."""
    for name in config.steps:
        if name not in steps:
            problems.append(Problem(f"'steps.{name}' names no step{did_you_mean(name, steps)}",
                                    file=str(config.path.name if config.path else "nbflow.yaml"),
                                    line=config.step_lines.get(name)))
            continue
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


def _stable_order(sorter: graphlib.TopologicalSorter) -> list[str]:
    sorter.prepare()
    order: list[str] = []
    while sorter.is_active():
        ready = sorted(sorter.get_ready())
        order += ready
        sorter.done(*ready)
    return order


def relative_to(path: Path, root: Path) -> str:
    """`path` as seen from the pipeline folder `root` (posix; with `..` when outside it)."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return Path(os.path.relpath(path, root)).as_posix()


def select_steps(graph: Graph, names: Iterable[str], *, only: bool = False) -> list[str]:
    """The named steps and every step they need (`only`: just the named ones), in graph order.

    Unknown names are errors.
    """
    names = list(names)
    if not names:
        return list(graph.order)
    problems = [Problem(f"no step named {n!r}{did_you_mean(n, graph.steps)}; steps: {', '.join(graph.order)}")
                for n in names if n not in graph.steps]
    if problems:
        raise PipelineError(problems)
    wanted = set(names) if only else set(names) | graph.ancestors(names)
    return [s for s in graph.order if s in wanted]


def resolve_parameters(graph: Graph, overrides: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Effective parameters of every step: notebook defaults < nbflow.yaml < `NAME` < `STEP.NAME`.

    Values given from Python or YAML become plain literals (or are refused),
    `-p` text is coerced to the default's type. A secret (declared in
    `secrets:` or named like one) may also come from its environment variable
    (below nbflow.yaml) and becomes an EnvRef holding its value; consumed
    values become ValueRef. Raises PipelineError listing every unknown name and
    badly typed value.
    """
    problems: list[Problem] = []
    global_over, step_over = _split_overrides(graph, dict(overrides or {}), problems)
    result = {name: _step_parameters(graph, name, global_over, step_over.get(name, {}), problems)
              for name in graph.steps}
    if problems:
        raise PipelineError(problems)
    return result


def _split_overrides(graph: Graph, overrides: dict[str, Any], problems: list[Problem]
                     ) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """`NAME` overrides (for every step that has NAME) and `STEP.NAME` overrides, checked against the steps."""
    global_over: dict[str, Any] = {}
    step_over: dict[str, dict[str, Any]] = {}
    all_params = sorted({p for s in graph.steps.values() for p in s.parameters})
    for key, value in overrides.items():
        step_name, dot, pname = key.rpartition(".")
        step = graph.steps.get(step_name) if dot else None
        if step is not None:
            if pname not in step.parameters:
                problems.append(Problem(f"-p {key}: step {step_name!r} has no parameter {pname!r}"
                                        f"{did_you_mean(pname, step.parameters)}", file=step.rel_path))
            elif pname in step.consumes:
                problems.append(_consumed_override(graph, key, step_name, pname))
            else:
                step_over.setdefault(step_name, {})[pname] = value
        elif key in all_params:
            having = [n for n, s in graph.steps.items() if key in s.parameters]
            if all(key in graph.steps[n].consumes for n in having):
                problems.append(_consumed_override(graph, key, having[0], key))
            else:
                global_over[key] = value
        elif dot:
            problems.append(Problem(f"-p {key}: no step named {step_name!r}{did_you_mean(step_name, graph.steps)}"))
        else:
            hint = did_you_mean(key, all_params)
            problems.append(Problem(f"-p {key}: no step has a parameter {key!r}{hint}"
                                    + ("" if hint else f"; parameters: {', '.join(all_params) or 'none'}")))
    return global_over, step_over


def _consumed_override(graph: Graph, key: str, step_name: str, pname: str) -> Problem:
    producer = graph.value_producers.get(pname, "?")
    return Problem(f"-p {key}: step {step_name!r} consumes {pname!r} from step {producer!r}, so a run always "
                   f"gives it the published value; override a parameter of {producer!r} instead, or remove "
                   f"{pname!r} from `consumes`", file=graph.steps[step_name].rel_path, step=step_name)


def _step_parameters(graph: Graph, name: str, global_over: dict[str, Any], own_over: dict[str, Any],
                     problems: list[Problem]) -> dict[str, Any]:
    """What is injected into one step: only the parameters given a value from outside the notebook."""
    step = graph.steps[name]
    yaml_params = graph.config.steps.get(name, _EMPTY).parameters
    chosen = {**yaml_params, **{k: v for k, v in global_over.items() if k in step.parameters}, **own_over}
    values: dict[str, Any] = {}
    for pname, param in step.parameters.items():
        if pname in step.consumes:
            rel = os.path.relpath(graph.value_path(pname), step.folder)
            values[pname] = ValueRef(Path(rel).as_posix())
            continue
        secret = is_secret(graph, pname)
        value = chosen.get(pname, secret_from_environment(pname) if secret else None)
        if pname not in chosen and value is None:
            continue  # the notebook's own default stays; nothing injected
        from_yaml = pname in yaml_params and chosen.get(pname) is yaml_params[pname]
        where = (f"'steps.{name}.parameters.{pname}'" if from_yaml else f"step {name!r}, parameter {pname!r}")
        try:
            value = plain_value(value)
        except TypeError as e:
            problems.append(Problem(f"{where}: {e}", file="nbflow.yaml" if from_yaml else step.rel_path,
                                    line=graph.config.step_lines.get(name) if from_yaml else param.line, step=name))
            continue
        if from_yaml and not _same_kind(value, param):
            problems.append(Problem(
                f"{where} must be {param.type_name} like the default {param.source} in {step.rel_path}, not "
                f"{'a ' + type(value).__name__ if secret else repr(value)}", file="nbflow.yaml",
                line=graph.config.step_lines.get(name), step=name))
            continue
        try:
            value = coerce(value, param, secret=secret)
        except ValueError as e:
            problems.append(Problem(f"{where}: {e}", file=step.rel_path, line=param.line, step=name))
            continue
        values[pname] = EnvRef.holding(secret_env_var(pname), value) if secret else value
    return values


def is_secret(graph: Graph, name: str) -> bool:
    """A parameter is a secret when nbflow.yaml declares it in `secrets:` or its name says so."""
    return name in graph.config.secrets or is_secret_name(name)


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


def secret_environment(parameters: Mapping[str, Any]) -> dict[str, str]:
    """The environment a step's kernel needs: each secret's value under its variable. Never written."""
    return {v.var: v.text for v in parameters.values() if isinstance(v, EnvRef)}


class _Empty:
    parameters: dict[str, Any] = {}


_EMPTY = _Empty()
