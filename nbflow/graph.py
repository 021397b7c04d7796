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

from . import stores
from .config import CONFIG_NAME, Config, load_config
from .errors import PipelineError, Problem, did_you_mean
from .grid import (MAX_NAME_BYTES, Grid, LeftBehind, expand, format_value, injected_outputs, instance_name,
                   parse_selection, partition, partitioned, value_problem)
from .grid import left_behind as _left_behind
from .layout import STATE_DIR, StateLayout
from .notebook import NOTEBOOK_SUFFIXES, NotAStep, Step, is_folder_path, is_percent_script, read_step
from .params import (EnvRef, ValueRef, coerce, is_secret_parameter, plain_value, secret_env_var,
                     secret_from_environment)

_SKIP_DIRS = {STATE_DIR, ".ipynb_checkpoints", "__pycache__", "node_modules"}


@dataclass(frozen=True)
class FileRef:
    """A file a step reads or writes: how the step names it, and where it is."""

    label: str  # as declared ("../data/x.csv") or "value best_month"
    path: Path | str  # absolute, normalised; a URL (`s3://bucket/key`, see stores.normalise) is a str


@dataclass(frozen=True)
class Graph:
    root: Path
    config: Config
    steps: dict[str, Step]
    not_steps: tuple[NotAStep, ...]
    upstream: dict[str, tuple[str, ...]]
    order: tuple[str, ...]  # a topological order, ties broken by name
    value_producers: dict[str, str] = field(default_factory=dict)  # a gridded producer: its base name
    produced: frozenset[Path | str] = frozenset()  # input paths that some step writes (or writes inside)
    grids: dict[str, Grid] = field(default_factory=dict)  # gridded steps by base name; `steps` has the instances
    # what is found once per graph and asked per step (thousands of times for a grid): see `remembered`
    _memo: dict[Any, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def remembered(self, key: Any, find: Any) -> Any:
        """`find()`, computed once for this graph (a graph is read anew for every run and status)."""
        if key not in self._memo:
            self._memo[key] = find()
        return self._memo[key]

    @property
    def layout(self) -> StateLayout:
        return StateLayout(self.root)

    @property
    def state_dir(self) -> Path:
        return self.layout.state_dir

    def value_path(self, name: str) -> Path:
        return self.layout.value(name)

    def value_refs(self, value: str) -> list[FileRef]:
        """The files of a published value: one, or one per instance when a gridded step publishes it."""
        grid = self.grids.get(self.value_producers.get(value, ""))
        if grid is None:
            return [FileRef(f"value {value}", self.value_path(value))]
        return [FileRef(f"value {value} of {name}", self.layout.value(value, partition(self.steps[name].grid)))
                for name in grid.instances]

    def inputs_of(self, name: str) -> list[FileRef]:
        step = self.steps[name]
        refs = [FileRef(label, path) for label, path in step.input_paths()]
        for v in step.consumes:
            refs += self.value_refs(v)
        return refs

    def outputs_of(self, name: str) -> list[FileRef]:
        step = self.steps[name]
        refs = [FileRef(label, path) for label, path in step.output_paths()]
        refs += [FileRef(f"value {v}", self.layout.value(v, partition(step.grid))) for v in step.publishes]
        return refs

    def settings_name(self, name: str) -> str:
        """The name nbflow.yaml gives a step's settings under: an instance's are its grid step's."""
        return self.steps[name].instance_of or name

    def resolve_name(self, name: str) -> list[str] | None:
        """The steps a name given by a user selects (a grid's in its order); None when it names nothing.

        A step or an instance selects itself, a gridded step every instance, and
        `train[alpha=0.1]` (keys in any order, a subset of them) the instances with those values.
        """
        if name in self.steps:
            return [name]
        grid = self.grids.get(name)
        if grid is not None:
            return list(grid.instances)
        parsed = parse_selection(name)
        if parsed is None or parsed[0] not in self.grids:
            return None
        base, wanted = parsed
        found = self.grids[base].matching(wanted) if set(wanted) <= set(self.grids[base].values) else []
        return found or None

    def left_behind(self) -> list[LeftBehind]:
        """Outputs of instances that left a grid (and plain paths of gridded notebooks run by hand)."""
        if not self.grids:
            return []
        current = {path for step in self.steps.values() for _, path in step.output_paths()}
        return [item for grid in self.grids.values() for item in _left_behind(grid, current)]

    def python_path(self) -> tuple[Path, ...]:
        """Folders put first on every step's `sys.path`: `pythonpath:` of nbflow.yaml, else the project root."""
        return self.remembered("python_path", self._python_path)

    def _python_path(self) -> tuple[Path, ...]:
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
        return [FileRef(label, path) for label, path in self.steps[name].input_paths() if path not in self.produced]


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
            if _left_out_by(above, root):
                break  # the enclosing pipeline excludes this folder: its notebooks are nobody else's steps
            return [Problem(f"{root} is inside the pipeline {above} (it has {STATE_DIR}/ or {CONFIG_NAME}); run "
                            f"`nbflow run {above}` (name steps to run only some), {make_own}")]
        if (above / ".git").exists() or (above / "pyproject.toml").is_file():
            break  # a project's root: pipelines of other projects above it are none of its business
    if nested:  # found by `discover`, which walks the folder anyway
        inner = nested[0]
        return [Problem(f"{inner} below {root} is a pipeline already (it has {STATE_DIR}/); run "
                        f"`nbflow run {inner}`, {make_own}")]
    return []


def _left_out_by(pipeline: Path, folder: Path) -> bool:
    """Whether the pipeline's nbflow.yaml leaves every notebook of `folder` out (exclude:, or an include: it misses)."""
    try:
        config = load_config(pipeline)
    except PipelineError:
        return False
    probe = f"{folder.relative_to(pipeline).as_posix()}/notebook.ipynb"
    if config.include and not any(fnmatch.fnmatch(probe, pat) for pat in config.include):
        return True
    return any(fnmatch.fnmatch(probe, pat) for pat in config.exclude)


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
                collect: list[Problem] | None = None, *, grid: Mapping[str, Mapping[str, Any]] | None = None
                ) -> Graph:
    """Read every notebook of `root` and build the validated graph.

    Raises PipelineError listing every problem found (malformed notebooks,
    non-literal declarations, duplicate producers, cycles, bad nbflow.yaml,
    bad grids). With `collect`, problems are appended to it instead and a
    best-effort graph of the readable steps is returned, so that later checks
    (missing inputs, kernels, parameters) can be reported together with these.
    `grid` (`{"train": {"alpha": [0.1, 1.0]}}`) replaces the grids nbflow.yaml
    gives the steps it names; each gridded step becomes its instances.
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
    _check_config(config, steps, problems)
    steps, grids = _expand_grids(config, grid, steps, problems)
    producers, value_producers = _producers(root, steps, problems)
    upstream, produced = _edges(root, steps, producers, value_producers, grids, problems)
    problems += [lost_step_problem(nb, f"step {reader!r} reads {relative_to(path, root)}, which it writes")
                 for nb, reader, path in _read_from_not_steps(steps, not_steps)]
    rank = _rank(steps, grids)
    order: tuple[str, ...] = tuple(sorted(steps, key=rank))
    sorter = graphlib.TopologicalSorter({n: upstream.get(n, ()) for n in order})
    try:
        order = tuple(_stable_order(sorter, rank))
    except graphlib.CycleError as e:
        cycle = list(e.args[1])  # each step is followed by one that reads what it writes
        problems.append(Problem("cycle: " + " -> ".join(cycle) + "; a step cannot depend on its own outputs",
                                file=steps[cycle[0]].rel_path if cycle[0] in steps else None))
    if problems:
        if collect is None:
            raise PipelineError(problems)
        collect.extend(problems)
    return Graph(root=root, config=config, steps={n: steps[n] for n in sorted(steps, key=rank)},
                 not_steps=tuple(not_steps), upstream=upstream, order=order, value_producers=value_producers,
                 produced=frozenset(produced), grids=grids)


def _rank(steps: dict[str, Step], grids: dict[str, Grid]):
    """Sort key of step names: by name, the instances of a grid in the grid's order (seed=2 before seed=10)."""
    position = {name: i for grid in grids.values() for i, name in enumerate(grid.instances)}

    def key(name: str) -> tuple[str, int]:
        return (steps[name].instance_of or name, position.get(name, -1)) if name in steps else (name, -1)

    return key


def _expand_grids(config: Config, given: Mapping[str, Mapping[str, Any]] | None, steps: dict[str, Step],
                  problems: list[Problem]) -> tuple[dict[str, Step], dict[str, Grid]]:
    """Each gridded step replaced by its instances, after checking its grid (every problem reported)."""
    wanted: dict[str, tuple[Any, _GridSource]] = {
        name: (settings.grid, _GridSource.yaml(config, name))
        for name, settings in config.steps.items() if settings.grid is not None}
    for name, values in (given or {}).items():
        if name not in steps:
            problems.append(Problem(f"grid[{name!r}]: no step named {name!r}{did_you_mean(name, steps)}"))
            continue
        wanted[name] = (values, _GridSource.python(name))
    grids: dict[str, Grid] = {}
    expanded = dict(steps)
    for name, (values, source) in wanted.items():
        step = steps.get(name)
        if step is None:
            continue  # nbflow.yaml names no such step: _check_config said so
        checked = _check_grid(config, step, values, source, problems)
        if checked is None:
            continue
        grid, instances = expand(step, checked)
        del expanded[name]
        for instance in instances:
            if instance.name in expanded:
                problems.append(source.problem(f"instance {instance.name!r} has the name of a notebook; rename "
                                               "the notebook", step))
            expanded[instance.name] = instance
        grids[name] = grid
    return expanded, grids


@dataclass(frozen=True)
class _GridSource:
    """Where a grid was given (nbflow.yaml or `grid=` of the Python API), to name it in problems."""

    name: str
    file: str | None
    lines: Mapping[str, int]

    @classmethod
    def yaml(cls, config: Config, step: str) -> "_GridSource":
        return cls(f"'steps.{step}.grid", CONFIG_NAME, config.grid_lines.get(step, {}))

    @classmethod
    def python(cls, step: str) -> "_GridSource":
        return cls(f"grid[{step!r}]", None, {})

    def where(self, key: str | None = None) -> str:
        if self.file is None:
            return f"{self.name}[{key!r}]" if key is not None else self.name
        return f"{self.name}.{key}'" if key is not None else f"{self.name}'"

    def problem(self, message: str, step: Step, key: str | None = None) -> Problem:
        line = self.lines.get(key or "") or self.lines.get("")
        return Problem(f"{self.where(key)}: {message}", file=self.file, line=line, step=step.name)


def _check_grid(config: Config, step: Step, values: Any, source: _GridSource,
                problems: list[Problem]) -> dict[str, tuple[Any, ...]] | None:
    """The grid as key -> values when every key and value can make instances, else None (problems added)."""
    found: list[Problem] = []
    if not isinstance(values, Mapping) or not values:
        problems.append(source.problem("a grid maps parameters of the step to lists of values, e.g. "
                                       "{alpha: [0.1, 1.0]}", step))
        return None
    own = config.steps.get(step.name)
    yaml_parameters = own.parameters if own is not None else {}
    checked: dict[str, tuple[Any, ...]] = {}
    for key, listed in values.items():
        key = str(key)
        param = step.parameters.get(key)
        if param is None:
            known = [p for p in step.parameters if p not in step.consumes]
            hint = did_you_mean(key, known) or f"; its parameters: {', '.join(known) or 'none'}"
            found.append(source.problem(f"step {step.name!r} has no parameter {key!r}{hint}", step, key))
            continue
        if key in step.consumes:
            found.append(source.problem(f"{key!r} is a value step {step.name!r} consumes: a run always gives it "
                                        "the published value", step, key))
            continue
        if is_secret_parameter(key, config.secrets):
            found.append(source.problem(f"{key!r} is a secret: grid values are written in file and folder "
                                        "names", step, key))
            continue
        if key in yaml_parameters:
            found.append(source.problem(f"{key!r} is also set in 'steps.{step.name}.parameters'; a gridded "
                                        "parameter takes its values from the grid: remove one", step, key))
            continue
        if isinstance(listed, (str, bytes, Mapping)) or not isinstance(listed, Iterable):
            found.append(source.problem(f"the values of {key!r} must be a list, e.g. [{listed!r}]", step, key))
            continue
        try:  # from Python: a range, a numpy array, numpy numbers are plain lists and numbers
            listed = [plain_value(v) for v in listed]
        except TypeError as e:
            found.append(source.problem(f"value {e}", step, key))
            continue
        if not listed:
            found.append(source.problem(f"the list of values of {key!r} is empty: a grid needs at least one "
                                        "value per key", step, key))
            continue
        seen: dict[str, Any] = {}
        good = True
        for value in listed:
            why = value_problem(value)
            if why is None and not _same_kind(value, param):
                why = f"{value!r} is not {param.type_name} like the default {param.source} in {step.rel_path}"
            if why is None and format_value(value) in seen:
                why = f"{format_value(value)} is listed twice"
            if why is not None:
                found.append(source.problem(f"value {why}", step, key))
                good = False
            seen.setdefault(format_value(value), value)
        if good:
            checked[key] = tuple(listed)
    if not found:  # an instance's executed notebook is `<name>.ipynb`: its name must fit in a file name
        widest = {k: max(vs, key=lambda v: len(format_value(v).encode())) for k, vs in checked.items()}
        longest = instance_name(step.name.rpartition("/")[2], widest.items())
        if len(longest.encode()) > MAX_NAME_BYTES:
            found.append(source.problem(f"its longest instance name is {len(longest.encode())} bytes, too long for "
                                        f"a file name ({MAX_NAME_BYTES} at most): use shorter values", step))
    problems += found
    return None if found else checked


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
               ) -> tuple[dict[Path | str, str], dict[str, str]]:
    """Who writes each output path and publishes each value; one producer each, none inside `_nbflow/`."""
    producers: dict[Path | str, str] = {}
    value_producers: dict[str, str] = {}
    state_dir = Path(os.path.realpath(root / STATE_DIR))
    real_paths: dict[str, str] = {}
    inside_state_dir = os.path.join(state_dir, "")
    for name, step in steps.items():
        for label, path in step.output_paths():
            # a symlink must not lead an output into the ledger's folder
            real = _realpath(str(path), real_paths) if isinstance(path, Path) else path
            if real == str(state_dir) or real.startswith(inside_state_dir):
                via = f" (through a symlink, it is {real})" if real != str(path) else ""
                problems.append(Problem(f"output {label!r} is inside {STATE_DIR}/{via}, which nbflow owns; write it "
                                        "elsewhere", file=step.rel_path, step=name))
            other = producers.setdefault(path, name)
            if other != name:
                problems.append(Problem(
                    f"steps {other!r} and {name!r} both write {relative_to(path, root)}; a file must have one "
                    "producer", file=step.rel_path, step=name))
        for value in step.publishes:
            owner = step.instance_of or name  # every instance of a grid publishes its own value of it
            other = value_producers.setdefault(value, owner)
            if other != owner:
                problems.append(Problem(f"steps {other!r} and {owner!r} both publish value {value!r}",
                                        file=step.rel_path, step=owner))
    return producers, value_producers


def _realpath(path: str, known: dict[str, str]) -> str:
    """os.path.realpath, remembering every folder on the way: a grid's outputs share all but their last folders."""
    found = known.get(path)
    if found is None:
        parent, name = os.path.split(path)
        found = os.path.join(_realpath(parent, known), name) if name else path
        if os.path.islink(found):
            found = os.path.realpath(found)
        known[path] = found
    return found


def _edges(root: Path, steps: dict[str, Step], producers: dict[Path | str, str], value_producers: dict[str, str],
           grids: dict[str, Grid], problems: list[Problem]) -> tuple[dict[str, tuple[str, ...]], set[Path | str]]:
    """Each step's upstream steps, and the input paths that some step produces.

    B depends on A when B reads a path A writes, a path inside a folder A
    writes, or declares a folder input (`"metrics/"`) that A writes inside.
    Reading the plain path of a gridded step's output, which no instance
    writes, is a problem that names the folder to read instead.
    """
    upstream: dict[str, tuple[str, ...]] = {}
    produced: set[Path | str] = set()
    plain = {path: (base, declared) for base, grid in grids.items() for declared, path in grid.step.output_paths()
             if not is_folder_path(declared)}
    for name, step in steps.items():
        ups = set()
        for label, path in step.input_paths():
            writers = {producers[p] for p in (path, *folders_of(path)) if p in producers}
            if is_folder_path(label):
                inside = str(path).rstrip("/") + "/" if isinstance(path, str) else os.path.join(str(path), "")
                writers |= {w for p, w in producers.items() if str(p).startswith(inside)}
            if name in writers:
                problems.append(Problem(f"reads {relative_to(path, root)}, which it also writes", file=step.rel_path))
                writers.discard(name)
            if not writers and path in plain and plain[path][0] != (step.instance_of or name):
                base, declared = plain[path]
                folder = relative_to(folders_of(path)[0], step.folder)
                problem = Problem(
                    f"reads {label}, the output path of gridded step {base!r} as its notebook declares it, but each "
                    f"instance writes its own file under partition folders ({_example_path(grids[base], declared)}); "
                    f"read them all as a folder input ending in '/': inputs = {{{_input_name(step, label)!r}: "
                    f"\"{folder}/\"}}", file=step.rel_path, line=step.declaration_lines.get("inputs"),
                    step=step.instance_of or name)
                if problem not in problems:  # once for all instances of a gridded reader
                    problems.append(problem)
            if writers:
                produced.add(path)
            ups |= writers
        for value in step.consumes:
            if value in value_producers:
                producer = value_producers[value]
                ups |= set(grids[producer].instances) if producer in grids else {producer}
            else:
                problems.append(Problem(
                    f"consumes value {value!r} but no step publishes it"
                    f"{did_you_mean(value, value_producers)}", file=step.rel_path, step=name))
        upstream[name] = tuple(sorted(ups))
    return upstream, produced


def _example_path(grid: Grid, declared: str) -> str:
    first = tuple((k, v[0]) for k, v in grid.values.items())
    return partitioned(declared, first) + (", ..." if len(grid.instances) > 1 else "")


def _input_name(step: Step, label: str) -> str:
    return next((name for name, paths in step.inputs.items() if label in paths), "data")


def _read_from_not_steps(steps: dict[str, Step], not_steps: list[NotAStep]
                         ) -> list[tuple[NotAStep, str, Path | str]]:
    """Notebooks that are not steps but declare outputs a step reads: (notebook, reader, path)."""
    found: list[tuple[NotAStep, str, Path | str]] = []
    for nb in not_steps:
        for _, out in nb.output_paths():
            reader = next((name for name, step in steps.items() for label, path in step.input_paths()
                           if path == out or out in folders_of(path)
                           or (is_folder_path(label) and path in folders_of(out))),
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


def _check_config(config: Config, steps: dict[str, Step], problems: list[Problem]) -> None:
    """nbflow.yaml names only steps, parameters and secrets that exist (the steps as read, before grids)."""
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


def _stable_order(sorter: graphlib.TopologicalSorter, key) -> list[str]:
    sorter.prepare()
    order: list[str] = []
    while sorter.is_active():
        ready = sorted(sorter.get_ready(), key=key)
        order += ready
        sorter.done(*ready)
    return order


def folders_of(path: Path | str) -> list[Path | str]:
    """The folders a path or a URL lies in, nearest first (`Path.parents`, or `stores.parents` of a URL)."""
    return list(path.parents) if isinstance(path, Path) else list(stores.parents(path))


def relative_to(path: Path | str, root: Path) -> str:
    """`path` as seen from the pipeline folder `root` (posix; with `..` when outside it); a URL as it is."""
    if isinstance(path, str):
        return path
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return Path(os.path.relpath(path, root)).as_posix()


def select_steps(graph: Graph, names: Iterable[str], *, only: bool = False) -> list[str]:
    """The named steps and every step they need (`only`: just the named ones), in graph order.

    A gridded step's name selects all its instances (see `Graph.resolve_name`). Unknown names are errors.
    """
    names = list(names)
    if not names:
        return list(graph.order)
    chosen: set[str] = set()
    problems = []
    for n in names:
        found = graph.resolve_name(n)
        if found is None:
            problems.append(unknown_step_problem(graph, n))
        else:
            chosen.update(found)
    if problems:
        raise PipelineError(problems)
    wanted = chosen if only else chosen | graph.ancestors(chosen)
    return [s for s in graph.order if s in wanted]


def unknown_step_problem(graph: Graph, name: str, prefix: str = "") -> Problem:
    """No step (or instance) has this name: a did-you-mean, and the steps (each grid as one)."""
    shown = list(dict.fromkeys(f"{graph.steps[n].instance_of}[…]" if graph.steps[n].instance_of else n
                               for n in graph.order))
    parsed = parse_selection(name)
    if parsed is not None and parsed[0] in graph.grids:
        grid = graph.grids[parsed[0]]
        keys = [k for k in parsed[1] if k not in grid.values]
        if keys:
            hint = f"{parsed[0]!r} has no grid key {keys[0]!r}{did_you_mean(keys[0], grid.values)}"
        else:
            hint = "; ".join(f"{k} is one of {', '.join(map(format_value, grid.values[k]))}" for k in parsed[1])
        return Problem(f"{prefix}no instance of {parsed[0]!r} matches {name!r}: {hint}", step=parsed[0])
    return Problem(f"{prefix}no step named {name!r}{did_you_mean(name, [*graph.steps, *graph.grids])}; "
                   f"steps: {', '.join(shown)}")


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
        raise PipelineError(list(dict.fromkeys(problems)))
    return result


def _split_overrides(graph: Graph, overrides: dict[str, Any], problems: list[Problem]
                     ) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """`NAME` overrides (for every step that has NAME) and `STEP.NAME` overrides, checked against the steps."""
    global_over: dict[str, Any] = {}
    step_over: dict[str, dict[str, Any]] = {}
    all_params = sorted({p for s in _as_read(graph) for p in s.parameters})
    for key, value in overrides.items():
        step_name, dot, pname = key.rpartition(".")
        targets = (graph.resolve_name(step_name) or []) if dot else []
        step = graph.steps[targets[0]] if targets else None
        if step is not None:
            gridded = [graph.steps[t] for t in targets if pname in dict(graph.steps[t].grid)]
            if pname not in step.parameters:
                problems.append(Problem(f"-p {key}: step {step_name!r} has no parameter {pname!r}"
                                        f"{did_you_mean(pname, step.parameters)}", file=step.rel_path))
            elif pname in step.consumes:
                problems.append(_consumed_override(graph, key, targets[0], pname))
            elif gridded:
                problems.append(_gridded_override(graph, key, gridded[0], pname))
            else:
                for target in targets:
                    step_over.setdefault(target, {})[pname] = value
        elif key in all_params:
            having = [n for n, s in graph.steps.items() if key in s.parameters]
            gridded = [graph.steps[n] for n in having if key in dict(graph.steps[n].grid)]
            if all(key in graph.steps[n].consumes for n in having):
                problems.append(_consumed_override(graph, key, having[0], key))
            elif gridded:
                problems.append(_gridded_override(graph, key, gridded[0], key))
            else:
                global_over[key] = value
        elif dot:
            problems.append(unknown_step_problem(graph, step_name, prefix=f"-p {key}: "))
        else:
            hint = did_you_mean(key, all_params)
            problems.append(Problem(f"-p {key}: no step has a parameter {key!r}{hint}"
                                    + ("" if hint else f"; parameters: {', '.join(all_params) or 'none'}")))
    return global_over, step_over


def _as_read(graph: Graph) -> list[Step]:
    """The steps as their notebooks declare them: one per gridded step, not its instances."""
    return [s for s in graph.steps.values() if s.instance_of is None] + [g.step for g in graph.grids.values()]


def _gridded_override(graph: Graph, key: str, instance: Step, pname: str) -> Problem:
    """`-p` on a parameter that a grid gives its values: a problem naming the grid."""
    base = instance.instance_of or instance.name
    values = ", ".join(map(format_value, graph.grids[base].values[pname]))
    yaml = base in graph.config.grid_lines
    where = f"'steps.{base}.grid.{pname}' in {CONFIG_NAME}" if yaml else f"grid[{base!r}][{pname!r}]"
    return Problem(f"-p {key}: {pname!r} of step {base!r} takes its values from the grid ({where}: {values}); "
                   f"change the grid, or run one instance: nbflow run PIPELINE \"{instance.name}\"",
                   file=CONFIG_NAME if yaml else None,
                   line=graph.config.grid_lines.get(base, {}).get(pname) if yaml else None, step=base)


def _consumed_override(graph: Graph, key: str, step_name: str, pname: str) -> Problem:
    producer = graph.value_producers.get(pname, "?")
    return Problem(f"-p {key}: step {step_name!r} consumes {pname!r} from step {producer!r}, so a run always "
                   f"gives it the published value; override a parameter of {producer!r} instead, or remove "
                   f"{pname!r} from `consumes`", file=graph.steps[step_name].rel_path, step=step_name)


def _step_parameters(graph: Graph, name: str, global_over: dict[str, Any], own_over: dict[str, Any],
                     problems: list[Problem]) -> dict[str, Any]:
    """What is injected into one step: only the parameters given a value from outside the notebook."""
    step = graph.steps[name]
    settings_name = graph.settings_name(name)
    yaml_params = graph.config.steps.get(settings_name, _EMPTY).parameters
    chosen = {**yaml_params, **{k: v for k, v in global_over.items() if k in step.parameters}, **own_over}
    grid_values = dict(step.grid)
    values: dict[str, Any] = {}
    for pname, param in step.parameters.items():
        if pname in step.consumes:
            values[pname] = _value_ref(graph, step, pname)
            continue
        if pname in grid_values:
            values[pname] = grid_values[pname]  # checked against the default's type by _check_grid
            continue
        secret = is_secret(graph, pname)
        value = chosen.get(pname, secret_from_environment(pname) if secret else None)
        if pname not in chosen and value is None:
            continue  # the notebook's own default stays; nothing injected
        from_yaml = pname in yaml_params and chosen.get(pname) is yaml_params[pname]
        # named as the notebook is (an instance's problem is that of every instance: reported once)
        where = (f"'steps.{settings_name}.parameters.{pname}'" if from_yaml
                 else f"step {settings_name!r}, parameter {pname!r}")
        try:
            value = plain_value(value)
        except TypeError as e:
            problems.append(Problem(f"{where}: {e}", file="nbflow.yaml" if from_yaml else step.rel_path,
                                    line=graph.config.step_lines.get(settings_name) if from_yaml else param.line,
                                    step=settings_name))
            continue
        if from_yaml and not _same_kind(value, param):
            problems.append(Problem(
                f"{where} must be {param.type_name} like the default {param.source} in {step.rel_path}, not "
                f"{'a ' + type(value).__name__ if secret else repr(value)}", file="nbflow.yaml",
                line=graph.config.step_lines.get(settings_name), step=settings_name))
            continue
        try:
            value = coerce(value, param, secret=secret)
        except ValueError as e:
            problems.append(Problem(f"{where}: {e}", file=step.rel_path, line=param.line, step=settings_name))
            continue
        values[pname] = EnvRef.holding(secret_env_var(pname), value) if secret else value
    if step.grid and step.outputs:
        values["outputs"] = injected_outputs(step)  # the instance's own paths, relative like the notebook's
    return values


def _value_ref(graph: Graph, step: Step, value: str) -> ValueRef:
    """How a consumer loads a value: its file, or the files of a gridded producer's current instances."""
    grid = graph.grids.get(graph.value_producers.get(value, ""))
    if grid is None:
        return ValueRef(Path(os.path.relpath(graph.value_path(value), step.folder)).as_posix())
    folder = os.path.relpath(graph.layout.grid_value(value), step.folder)
    return ValueRef(Path(folder).as_posix(), tuple(dict(graph.steps[n].grid) for n in grid.instances))


def is_secret(graph: Graph, name: str) -> bool:
    """A parameter is a secret when nbflow.yaml declares it in `secrets:` or its name says so."""
    return is_secret_parameter(name, graph.config.secrets)


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
