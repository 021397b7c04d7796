"""Convert a Ploomber project into an nbflow pipeline folder (`nbflow import ploomber`).

Owns: reading a Ploomber `pipeline.yaml` (tasks, products, params, grids,
`env.yaml` placeholders), writing one nbflow notebook per task whose
parameters cell declares `inputs`/`outputs`, rewriting `upstream[...]` and
`product[...]` in its code, copying the project's other files (data, modules)
beside the notebooks, and listing everything it could not convert. Must not
modify the source project, run anything, or print: the CLI prints the
returned `Conversion`.

The naming scheme (also in the README):

- `upstream['clean']['data']` -> `inputs['clean_data']` (task, `_`, product key);
  `upstream['get']` of a task with one product -> `inputs['get']`.
- `product['data']` -> `outputs['data']`; a function task's single product
  is `outputs['<task>']`.
- `params['resources_']['cfg']` -> `inputs['resources_cfg']`.
- The `nb` product (the executed notebook) is dropped: nbflow keeps every
  executed notebook in `_nbflow/`.

Layout: each notebook is written to `<out>/<task>.ipynb` and the project's
other files are copied to the same relative places, so every step runs in
the folder that `ploomber build` ran in (the project's folder) and paths in
the code keep working. A product path stays the same string.
"""

from __future__ import annotations

import ast
import datetime as dt
import fnmatch
import io
import json
import os
import posixpath
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CommandError, NbflowError, PipelineError, Problem, did_you_mean
from .notebook import INJECTED_TAG, PARAMETERS_TAG, cell_source

__all__ = ["import_ploomber", "Conversion", "ConvertedStep", "Issue"]

_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][\w.]*)\s*\}\}")
_GRID_PLACEHOLDER = re.compile(r"\[\[\s*(\w+)\s*\]\]")
_BUILD_TIME = {"git", "git_hash", "now", "user"}  # Ploomber fills these in when it builds
_NOTEBOOK_SUFFIXES = {".py", ".ipynb"}
_OTHER_SOURCES = {
    ".sql": "an SQL task: nbflow runs notebooks; run the query from a notebook (a database client or "
            "pandas.read_sql) and declare the files it writes in `outputs`",
    ".sh": "a shell task: nbflow runs notebooks; run the command from a notebook cell (`!command` or "
           "subprocess) and declare its files",
    ".r": "an R task: its `upstream`/`product` are R code, which is not rewritten; convert it by hand "
          "(declare `inputs`/`outputs` in its parameters cell)",
    ".rmd": "an R Markdown task: not converted; save it as a notebook with an R kernel and declare "
            "`inputs`/`outputs` in its parameters cell",
}
_TOP_KEYS_NOT_CONVERTED = {
    "clients": "database and storage clients are not converted: open connections in the notebooks, or use "
               "fsspec URLs (s3://...) as inputs and outputs",
    "on_render": "the hook is not converted: nbflow has no on_render",
    "on_finish": "the hook is not converted: nbflow.yaml's `on_success` runs a shell command or "
                 "`module:function` given the run as JSON; adapt the function and set it there",
    "on_failure": "the hook is not converted: nbflow.yaml's `on_failure` runs a shell command or "
                  "`module:function` given the run as JSON; adapt the function and set it there",
    "serializer": "serializers are not converted: function tasks that return objects need their own code "
                  "to write their products",
    "unserializer": "unserializers are not converted: function tasks that receive objects need their own "
                    "code to read their inputs",
    "source_loader": "sources loaded from a package are not converted",
    "location": "a pipeline made by a Python factory is not converted: nbflow reads notebooks, not Python DAGs",
}
_TASK_KEYS_NOT_CONVERTED = {
    "on_render": "task hooks are not converted: put the check in a cell of the notebook",
    "on_finish": "task hooks are not converted: put the check in a last cell of the notebook",
    "on_failure": "task hooks are not converted: nbflow.yaml's `on_failure` is run-wide",
    "client": "clients are not converted: open the connection in the notebook",
    "product_client": "product clients are not converted",
    "nbconvert_export_kwargs": "not converted: nbflow keeps executed notebooks as .ipynb in _nbflow/; "
                               "export them with `jupyter nbconvert`",
    "nbconvert_exporter_name": "not converted: nbflow keeps executed notebooks as .ipynb in _nbflow/; "
                               "export them with `jupyter nbconvert`",
}
_TASK_KEYS_IGNORED = {  # settings that mean nothing to nbflow: a note each, no change of behaviour
    "static_analysis": "nbflow always reads the parameters cell statically",
    "check_if_kernel_installed": "nbflow checks every step's kernel before a run",
}
_META_IGNORED = {"jupyter_functions_as_notebooks", "jupyter_hot_reload", "product_default_class"}
_SKIP_DIRS = {"__pycache__", ".ipynb_checkpoints", "_nbflow", "node_modules"}


@dataclass(frozen=True)
class Issue:
    """Something of the Ploomber project that was not converted, or a note about how it was."""

    message: str
    task: str | None = None
    file: str | None = None  # a converted notebook (relative to the output folder) or a project file
    cell: int | None = None  # 1-based, in the converted notebook
    line: int | None = None  # in that cell

    def __str__(self) -> str:
        where = [f"task {self.task}"] if self.task else []
        if self.file:
            where.append(self.file + (f" cell {self.cell}" if self.cell else "")
                         + (f" line {self.line}" if self.line else ""))
        return f"{', '.join(where)}: {self.message}" if where else self.message

    def to_json(self) -> dict[str, Any]:
        return {"task": self.task, "file": self.file, "cell": self.cell, "line": self.line,
                "message": self.message}


@dataclass(frozen=True)
class ConvertedStep:
    """One Ploomber task written as an nbflow notebook."""

    name: str  # the nbflow step
    task: str  # the Ploomber task, as named in pipeline.yaml (a grid's name template included)
    source: str  # the task's source as written in pipeline.yaml
    notebook: str  # relative to the output folder
    inputs: dict[str, str]
    outputs: dict[str, str]
    parameters: dict[str, Any]
    grid: dict[str, list] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "task": self.task, "source": self.source, "notebook": self.notebook,
                "inputs": self.inputs, "outputs": self.outputs, "parameters": self.parameters, "grid": self.grid}


@dataclass(frozen=True)
class Conversion:
    """What `import_ploomber` wrote, and what it could not convert."""

    pipeline: Path  # the Ploomber pipeline.yaml
    out: Path  # the nbflow pipeline folder written
    steps: tuple[ConvertedStep, ...]
    unconverted: tuple[Issue, ...]  # each needs the user's hand before the pipeline does what Ploomber did
    notes: tuple[Issue, ...]  # how something was converted, for the record
    copied: tuple[str, ...]  # the project's other files copied to `out` (relative paths)
    config: str | None = None  # the nbflow.yaml written, relative to `out`

    def to_json(self) -> dict[str, Any]:
        return {"pipeline": str(self.pipeline), "out": str(self.out), "steps": [s.to_json() for s in self.steps],
                "unconverted": [i.to_json() for i in self.unconverted], "notes": [i.to_json() for i in self.notes],
                "copied": list(self.copied), "config": self.config}


class _Report:
    def __init__(self) -> None:
        self.unconverted: list[Issue] = []
        self.notes: list[Issue] = []

    def fail(self, message: str, task: str | None = None, **where: Any) -> None:
        self.unconverted.append(Issue(message, task, **where))

    def note(self, message: str, task: str | None = None, **where: Any) -> None:
        self.notes.append(Issue(message, task, **where))


# ---------------------------------------------------------------- the entry point


def import_ploomber(pipeline_yaml: str | os.PathLike, out: str | os.PathLike | None = None) -> Conversion:
    """Convert the Ploomber project of `pipeline_yaml` (or its folder) into the nbflow pipeline folder `out`.

    `out` must be new or empty (default: `<project>-nbflow` beside the project).
    Raises CommandError (exit 2) for a missing file or an unusable `out`,
    PipelineError (exit 2) for a pipeline.yaml that is not a Ploomber spec.
    """
    pipeline = Path(pipeline_yaml)
    if pipeline.is_dir():
        pipeline = pipeline / "pipeline.yaml"
    if not pipeline.is_file():
        raise CommandError(f"{pipeline}: no such file; give the project's pipeline.yaml (or its folder)")
    pipeline = pipeline.absolute()
    root = pipeline.parent
    target = Path(out) if out is not None else root.parent / f"{root.name}-nbflow"
    _check_out(target.absolute(), root)
    report = _Report()
    spec = _load_yaml(pipeline)
    if isinstance(spec, list):  # Ploomber also takes a bare list of tasks
        spec = {"tasks": spec}
    if not isinstance(spec, dict) or not isinstance(spec.get("tasks"), list):
        raise PipelineError(Problem("not a Ploomber pipeline: expected a `tasks:` list", file=str(pipeline)))
    env_file, env = _load_env(pipeline, report)
    meta = spec.get("meta") or {}
    raw_tasks = list(spec["tasks"])
    extra_yaml: list[Path] = []
    if isinstance(meta, dict) and meta.get("import_tasks_from"):
        imported = root / str(meta["import_tasks_from"])
        extra_yaml.append(imported)
        more = _load_yaml(imported) if imported.is_file() else None
        if isinstance(more, list):
            raw_tasks = more + raw_tasks
        else:
            report.fail(f"meta.import_tasks_from: {imported.name} is not a list of tasks; its tasks are missing")
    settings = _read_top_level(spec, meta, report)
    tasks = _read_tasks(raw_tasks, root, env, settings, report)
    plan = _Plan(root, tasks, settings, report)
    notebooks = {t.step: plan.notebook(t) for t in tasks if t.convertible}
    if plan.wrapped:
        report.note(f"function tasks run from notebooks that call them ({', '.join(plan.wrapped)}), with paths "
                    "(str) as their product and upstream")
    if plan.dropped:
        report.note(f"the executed notebooks ({', '.join(plan.dropped)}) are not declared as outputs: nbflow "
                    "keeps each step's executed notebook as _nbflow/latest/<step>.ipynb (to HTML: "
                    "`jupyter nbconvert --to html`)")
    skip = {_rel(pipeline, root)} | {_rel(p, root) for p in extra_yaml if p.is_file()}
    if env_file is not None:
        skip.add(_rel(env_file, root))
    skip |= {_rel(t.source_path, root) for t in tasks if t.convertible and t.kind == "notebook" and t.source_path}
    products = [_GRID_PLACEHOLDER.sub("*", p) for t in tasks for p in t.product_paths()]

    target.mkdir(parents=True, exist_ok=True)
    out_dir = target.absolute()
    copied = _copy_project(root, out_dir, skip, products, report)
    steps = []
    for t in tasks:
        if not t.convertible:
            continue
        nb, converted = notebooks[t.step]
        path = out_dir / converted.notebook
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        steps.append(converted)
    config = _write_config(out_dir, pipeline, plan, report)
    _ignore_state_folder(out_dir)
    return Conversion(pipeline, target, tuple(steps), tuple(report.unconverted), tuple(report.notes),
                      tuple(copied), config)


def _check_out(out: Path, root: Path) -> None:
    if out == root or out in root.parents:
        raise CommandError(f"{out}: the output folder would hold the Ploomber project itself; give a new folder "
                           "with -o (the project is never modified)")
    if out.exists() and not out.is_dir():
        raise CommandError(f"{out}: exists and is not a folder; give a new folder with -o")
    if out.is_dir() and any(out.iterdir()):
        raise CommandError(f"{out}: the folder is not empty; give a new or empty folder with -o")


def _load_yaml(path: Path) -> Any:
    import yaml  # noqa: PLC0415

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CommandError(f"{path}: cannot read it: {e}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        raise PipelineError(Problem(f"not valid YAML: {getattr(e, 'problem', None) or e}", file=str(path),
                                    line=line)) from None


# ---------------------------------------------------------------- env.yaml and {{placeholders}}


class _Env:
    """Ploomber's `{{placeholders}}`: env.yaml's values and {{here}}/{{root}}/{{cwd}} (the project folder)."""

    def __init__(self, root: Path):
        self.root = root
        self.values: dict[str, Any] = {"here": str(root), "root": str(root), "cwd": str(root)}

    def lookup(self, name: str) -> tuple[bool, Any]:
        value: Any = self.values
        for part in name.split("."):
            if not isinstance(value, dict) or part not in value:
                return False, None
            value = value[part]
        return True, value

    def render(self, value: Any, where: str, report: _Report, task: str | None = None) -> Any:
        if isinstance(value, dict):
            return {k: self.render(v, f"{where}.{k}", report, task) for k, v in value.items()}
        if isinstance(value, list):
            return [self.render(v, f"{where}[{i}]", report, task) for i, v in enumerate(value)]
        if not isinstance(value, str) or "{{" not in value:
            return value
        missing: list[str] = []

        def substitute(match: re.Match) -> str:
            found, resolved = self.lookup(match.group(1))
            if not found:
                missing.append(match.group(1))
                return match.group(0)
            return str(resolved)

        text = _PLACEHOLDER.sub(substitute, value)
        if missing or "{{" in text:
            names = ", ".join(f"{{{{{m}}}}}" for m in missing) or "a Jinja expression"
            why = ("Ploomber fills it in when it builds" if set(missing) & _BUILD_TIME or
                   any(m.startswith("env.") for m in missing) else "it is not in env.yaml")
            report.fail(f"{where}: {names} has no value at conversion ({why}); kept as written: {value!r}",
                        task)
            return text
        return _cast(text)


def _cast(text: str) -> Any:
    """As Ploomber does with a rendered placeholder: 'true' is True, '3' is 3, else the string."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return text


def _load_env(pipeline: Path, report: _Report) -> tuple[Path | None, _Env]:
    env = _Env(pipeline.parent)
    name = pipeline.name
    candidates = []
    if name.startswith("pipeline.") and name.count(".") == 2:  # pipeline.serve.yaml reads env.serve.yaml
        candidates.append(pipeline.parent / f"env.{name.split('.')[1]}.yaml")
    candidates.append(pipeline.parent / "env.yaml")
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        return None, env
    data = _load_yaml(found)
    if not isinstance(data, dict):
        report.fail(f"{found.name} is not a mapping; its placeholders are not resolved")
        return found, env
    for key, value in data.items():  # in order: a value may use the keys before it
        env.values[str(key)] = env.render(value, f"{found.name}: {key}", report)
    report.note(f"placeholders resolved from {found.name} (the converted notebooks hold the values; "
                "change them there or in nbflow.yaml's steps.<step>.parameters)")
    return found, env


# ---------------------------------------------------------------- reading the spec


@dataclass
class _Settings:
    extract_upstream: bool = True
    extract_product: bool = False
    serializer: bool = False
    unserializer: bool = False
    jobs: int | None = None


def _read_top_level(spec: dict, meta: Any, report: _Report) -> _Settings:
    settings = _Settings()
    if not isinstance(meta, dict):
        report.fail("meta: not a mapping; ignored")
        meta = {}
    for key, value in meta.items():
        if key == "extract_upstream":
            settings.extract_upstream = bool(value)
        elif key == "extract_product":
            settings.extract_product = bool(value)
        elif key == "source_loader":
            report.fail("meta.source_loader: " + _TOP_KEYS_NOT_CONVERTED["source_loader"])
        elif key not in _META_IGNORED and key != "import_tasks_from":
            report.fail(f"meta.{key}: not converted")
    for key, value in spec.items():
        if key in ("tasks", "meta"):
            continue
        if key == "executor":
            settings.jobs = _jobs_of(value, report)
        elif key in ("serializer", "unserializer"):
            setattr(settings, key, bool(value))
            if value:
                report.fail(f"{key}: {_TOP_KEYS_NOT_CONVERTED[key]}")
        elif key in _TOP_KEYS_NOT_CONVERTED:
            if value:
                report.fail(f"{key}: {_TOP_KEYS_NOT_CONVERTED[key]}")
        else:
            report.fail(f"{key}: not a key nbflow knows how to convert; ignored")
    return settings


def _jobs_of(executor: Any, report: _Report) -> int | None:
    kind = executor.get("dotted_path", "") if isinstance(executor, dict) else str(executor)
    if kind.lower().endswith("serial"):
        report.note("executor: serial became `jobs: 1` in nbflow.yaml (one step at a time); remove it to run "
                    "independent steps in parallel")
        return 1
    if kind.lower().endswith("parallel"):
        processes = executor.get("processes") if isinstance(executor, dict) else None
        if isinstance(processes, int) and processes >= 1:
            report.note(f"executor: parallel with {processes} processes became `jobs: {processes}` in nbflow.yaml")
            return processes
        report.note("executor: parallel is nbflow's default (one step per CPU core; `-j N` to change)")
        return None
    report.fail(f"executor: {executor!r} is not converted; nbflow runs steps locally in parallel "
                "(`executor: dask` in nbflow.yaml for a cluster)")
    return None


@dataclass
class _Task:
    """One Ploomber task, read and planned."""

    name: str  # Ploomber's name (a grid's template as written)
    source: str
    spec: dict
    kind: str = ""  # "notebook" or "function"; "" when it is not converted
    source_path: Path | None = None
    step: str = ""  # the nbflow step, and the notebook's file name without suffix
    folder: str = ""  # folder of the notebook, relative to the output folder ("" the top)
    data: dict[str, str] = field(default_factory=dict)  # data products: key -> path relative to the project
    single: bool = False  # the product is one path: upstream['x'] is that path
    nb_key: str = "nb"
    nb_product: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list] | None = None
    upstream: list[str] | None = None  # None: not known statically
    notebook: dict | None = None
    parameters_cell: int | None = None
    function: tuple[str, str, Path, ast.FunctionDef | ast.AsyncFunctionDef] | None = None

    @property
    def convertible(self) -> bool:
        return bool(self.kind)

    def product_paths(self) -> list[str]:
        return list(self.data.values()) + ([self.nb_product] if self.nb_product else [])


def _read_tasks(raw_tasks: list, root: Path, env: _Env, settings: _Settings, report: _Report) -> list[_Task]:
    tasks: list[_Task] = []
    for index, raw in enumerate(raw_tasks):
        if not isinstance(raw, dict) or "source" not in raw:
            report.fail(f"tasks[{index}]: not a task (a mapping with `source:`); skipped")
            continue
        source = str(raw["source"])
        name = str(raw.get("name") or _default_name(source))
        spec = env.render(dict(raw), f"tasks[{index}] ({name})", report, name)
        task = _Task(name=name, source=source, spec=spec)
        _read_task(task, root, settings, report)
        tasks.append(task)
    _name_steps(tasks, report)
    return tasks


def _default_name(source: str) -> str:
    if Path(source).suffix.lower() in _NOTEBOOK_SUFFIXES | set(_OTHER_SOURCES) | {".md"}:
        return Path(source).stem
    return re.split(r"::|\.", source)[-1]


def _read_task(task: _Task, root: Path, settings: _Settings, report: _Report) -> None:
    spec, name = task.spec, task.name
    suffix = Path(task.source).suffix.lower()
    task_class = str(spec.get("class") or "")
    is_file = suffix in _NOTEBOOK_SUFFIXES | set(_OTHER_SOURCES) | {".md"} or "/" in task.source
    if task_class and task_class not in ("NotebookRunner", "ScriptRunner", "PythonCallable"):
        report.fail(f"class {task_class}: nbflow converts notebooks, scripts and functions only; not converted",
                    name)
    elif is_file:
        task.source_path = (root / task.source).absolute()
        if suffix in _OTHER_SOURCES:
            report.fail(f"{task.source} is {_OTHER_SOURCES[suffix]}", name)
        elif suffix not in _NOTEBOOK_SUFFIXES:
            report.fail(f"{task.source}: not a .py script or .ipynb notebook; not converted", name)
        elif not task.source_path.is_file():
            report.fail(f"{task.source}: no such file in the project; not converted", name)
        else:
            task.kind = "notebook"
    else:
        task.kind = "function"
    task.nb_key = str(spec.get("nb_product_key") or "nb")
    task.params = dict(spec.get("params") or {})
    _read_products(task, root, report)
    if task.kind == "notebook":
        _read_notebook(task, root, settings, report)
    elif task.kind == "function":
        _read_function(task, root, settings, report)
    if task.kind:
        _read_grid(task, report)
    if "upstream" in spec:  # declared in pipeline.yaml (meta.extract_upstream: false)
        up = spec["upstream"]
        task.upstream = [up] if isinstance(up, str) else [str(u) for u in (up or [])]
    elif not settings.extract_upstream and task.upstream is None:
        task.upstream = []
    for key, value in spec.items():
        if key in ("source", "name", "product", "params", "grid", "upstream", "class", "nb_product_key",
                   "local_execution", "kernelspec_name", "serializer", "unserializer"):
            continue
        if key in _TASK_KEYS_IGNORED:
            report.note(f"{key}: {_TASK_KEYS_IGNORED[key]}", name)
        else:
            report.fail(f"{key}: {_TASK_KEYS_NOT_CONVERTED.get(key, 'not converted')}", name)


def _read_products(task: _Task, root: Path, report: _Report) -> None:
    product = task.spec.get("product")
    if product is None:
        return
    if isinstance(product, (list, tuple)):  # [schema, name, table]: an SQL relation
        report.fail(f"product {list(product)!r} is a database relation, not a file; nbflow tracks files", task.name)
        return
    if isinstance(product, dict):
        for key, path in product.items():
            if not isinstance(path, str):
                report.fail(f"product {key!r}: {path!r} is not a file path; not declared", task.name)
            elif key == task.nb_key and task.kind != "function":
                task.nb_product = _project_path(path, root)
            else:
                task.data[str(key)] = _project_path(path, root)
        return
    if task.kind == "function" or not task.kind:
        task.data[task.name] = _project_path(str(product), root)
        task.single = True
    else:  # a script's only product is its executed notebook
        task.nb_product = _project_path(str(product), root)


def _project_path(path: str, root: Path) -> str:
    """A product path relative to the project folder (as Ploomber reads it), posix, normalised."""
    p = Path(path).expanduser()
    if p.is_absolute():
        try:
            return p.relative_to(root).as_posix()
        except ValueError:
            return p.as_posix()
    trailing = "/" if path.endswith("/") else ""
    return posixpath.normpath(p.as_posix()) + trailing


def _read_notebook(task: _Task, root: Path, settings: _Settings, report: _Report) -> None:
    assert task.source_path is not None
    try:
        nb = _load_source(task.source_path)
    except NbflowError:
        raise
    except Exception as e:  # noqa: BLE001 - jupytext and json raise many kinds; the task is reported
        report.fail(f"{task.source}: cannot read it as a notebook ({e}); not converted", task.name)
        task.kind = ""
        return
    meta = nb.get("metadata") or {}
    language = ((meta.get("kernelspec") or {}).get("language") or (meta.get("language_info") or {}).get("name")
                or (meta.get("jupytext") or {}).get("main_language") or "python")
    if str(language).lower() != "python":
        report.fail(f"{task.source}: a {language} notebook; only Python code is rewritten: declare `inputs` and "
                    "`outputs` in its parameters cell by hand", task.name)
        task.kind = ""
        return
    injected = [c for c in nb["cells"] if INJECTED_TAG in _tags(c)]
    if injected:
        nb["cells"] = [c for c in nb["cells"] if INJECTED_TAG not in _tags(c)]
        report.note(f"{task.source}: removed the injected-parameters cell Ploomber left in it", task.name)
    tagged = [i for i, c in enumerate(nb["cells"]) if PARAMETERS_TAG in _tags(c) and c.get("cell_type") == "code"]
    if not tagged:
        report.fail(f"{task.source}: no code cell tagged 'parameters'; not converted", task.name)
        task.kind = ""
        return
    if len(tagged) > 1:
        for i in tagged[1:]:
            nb["cells"][i]["metadata"]["tags"] = [t for t in _tags(nb["cells"][i]) if t != PARAMETERS_TAG]
        report.note(f"{task.source}: several cells were tagged 'parameters'; the first keeps the tag", task.name)
    task.notebook, task.parameters_cell = nb, tagged[0]
    assignments = _assignments(cell_source(nb["cells"][tagged[0]]))
    if assignments is None:
        report.fail(f"{task.source}: the parameters cell is not valid Python; not converted", task.name)
        task.kind = ""
        return
    task.upstream = []  # Ploomber requires `upstream` in the cell; without it, none
    if "upstream" in assignments:
        node = assignments["upstream"][-1]
        try:
            value = ast.literal_eval(node.value)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            value = ...
        if value is None:
            task.upstream = []
        elif isinstance(value, (list, tuple, set, dict)) and all(isinstance(v, str) for v in value):
            task.upstream = sorted(value) if isinstance(value, set) else list(value)
        elif settings.extract_upstream and "upstream" not in task.spec:
            task.upstream = None
            report.fail("`upstream` in the parameters cell is not a literal list of task names; its "
                        "dependencies are not converted", task.name)
    if settings.extract_product and "product" not in task.spec and "product" in assignments:
        try:
            product = ast.literal_eval(assignments["product"][-1].value)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            product = None
        if product:
            task.spec["product"] = product
            _read_products(task, root, report)


def _load_source(path: Path) -> dict:
    if path.suffix.lower() == ".ipynb":
        nb = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(nb, dict) or nb.get("nbformat") != 4 or not isinstance(nb.get("cells"), list):
            raise ValueError("not an nbformat-4 notebook")
        return nb
    try:
        import jupytext  # noqa: PLC0415 - optional extra
    except ImportError:
        raise NbflowError(f"{path.name} is a script: converting it needs jupytext; "
                          "pip install 'nbflow[jupytext]'") from None
    nb = json.loads(jupytext.writes(jupytext.read(path), fmt="ipynb"))
    for i, cell in enumerate(nb["cells"]):  # jupytext's ids are random: keep the conversion reproducible
        cell["id"] = f"cell-{i + 1}"
    meta = nb.setdefault("metadata", {})
    meta.pop("jupytext", None)
    meta.setdefault("kernelspec", {"name": "python3", "display_name": "Python 3", "language": "python"})
    meta.setdefault("language_info", {"name": "python"})
    return nb


def _read_function(task: _Task, root: Path, settings: _Settings, report: _Report) -> None:
    if "::" in task.source:
        module, func = task.source.split("::", 1)
    else:
        module, _, func = task.source.rpartition(".")
    parts = module.split(".") if module else []
    candidates = [root.joinpath(*parts).with_suffix(".py"), root.joinpath(*parts, "__init__.py")] if parts else []
    found = next((c for c in candidates if c.is_file()), None)
    serializer = task.spec.get("serializer", settings.serializer)
    unserializer = task.spec.get("unserializer", settings.unserializer)
    if serializer or unserializer:
        which = "serializer" if serializer else "unserializer"
        report.fail(f"function {task.source} has a {which}: it trades objects, not files; not converted", task.name)
        task.kind = ""
        return
    if found is None:
        report.fail(f"function {task.source}: its module is not in the project ({module.replace('.', '/')}.py); "
                    "call it from a notebook by hand", task.name)
        task.kind = ""
        return
    try:
        tree = ast.parse(found.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError) as e:
        report.fail(f"function {task.source}: cannot read {_rel(found, root)} ({e}); not converted", task.name)
        task.kind = ""
        return
    defs = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == func]
    if not defs:
        report.fail(f"function {task.source}: no top-level `def {func}` in {_rel(found, root)}; not converted",
                    task.name)
        task.kind = ""
        return
    task.function = (module, func, found, defs[-1])
    if "upstream" in _arguments(defs[-1]):  # as Ploomber: every upstream['name'] in the function
        keys = [n.slice.value for n in ast.walk(defs[-1]) if isinstance(n, ast.Subscript)
                and isinstance(n.value, ast.Name) and n.value.id == "upstream"
                and isinstance(n.slice, ast.Constant) and isinstance(n.slice.value, str)]
        task.upstream = list(dict.fromkeys(keys))
    else:
        task.upstream = []


def _arguments(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    a = fn.args
    return [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]


def _read_grid(task: _Task, report: _Report) -> None:
    grid = task.spec.get("grid")
    if grid is None:
        return
    if isinstance(grid, list) and len(grid) == 1:
        grid = grid[0]
    if isinstance(grid, list):
        report.fail(f"grid is a list of {len(grid)} grids; an nbflow grid is one cartesian product: "
                    "converted without a grid; copy the notebook once per grid and give each its grid "
                    "in nbflow.yaml", task.name)
        return
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        report.fail("grid values made by a function (or not lists) are not converted; converted without a grid: "
                    "list the values in nbflow.yaml's steps.<step>.grid", task.name)
        return
    task.grid = {str(k): list(v) for k, v in grid.items()}


def _name_steps(tasks: list[_Task], report: _Report) -> None:
    """Each task's step name (its notebook's file name): the task name, a grid's template without [[...]]."""
    taken: set[str] = set()
    for t in tasks:
        base = _clean(_GRID_PLACEHOLDER.sub("", t.name)) if t.grid is not None or "[[" in t.name else t.name
        step = re.sub(r"[^\w.-]+", "-", base).strip("-.") or "task"
        if step != t.name and t.kind:
            report.note(f"the step is named {step!r}", t.name)
        candidate, n = step, 2
        while candidate in taken:
            candidate, n = f"{step}-{n}", n + 1
        if candidate != step:
            report.note(f"{step!r} was taken; the step is named {candidate!r}", t.name)
        taken.add(candidate)
        t.step = candidate
        if t.single:  # a function's one product is outputs['<step>']
            t.data = {candidate: path for path in t.data.values()}
        if t.kind == "notebook" and t.spec.get("local_execution"):
            t.folder = posixpath.dirname(Path(t.source).as_posix())
            if t.folder:
                t.step = f"{t.folder}/{candidate}"
                report.note(f"local_execution: the notebook is written to {t.folder}/, where Ploomber ran it",
                            t.name)


def _clean(text: str) -> str:
    """What is left of a name once [[placeholders]] are gone: 'fit--' -> 'fit'."""
    return re.sub(r"([-_.])[-_.]+", r"\1", text).strip("-_. ")


def _strip_grid_placeholders(path: str, fallback: str) -> str:
    """A grid's product path without its [[placeholders]] (nbflow adds partition folders instead).

    'out/m-[[alpha]]-[[seed]].csv' -> 'out/m.csv'; 'alpha=[[alpha]]/[[seed]].csv' -> '<fallback>.csv'.
    """
    path = _GRID_PLACEHOLDER.sub("", re.sub(r"\w+=" + _GRID_PLACEHOLDER.pattern, "", path))
    *folders, file = path.split("/")
    stem, ext = re.fullmatch(r"(.*?)((?:\.[A-Za-z0-9]+)*)", file).groups()  # type: ignore[union-attr]
    kept = [c for c in (_clean(f) for f in folders) if c]
    return "/".join(kept + [(_clean(stem) or fallback) + ext])


# ---------------------------------------------------------------- planning each notebook


class _Plan:
    """All tasks known: each convertible task's inputs, outputs and notebook."""

    def __init__(self, root: Path, tasks: list[_Task], settings: _Settings, report: _Report):
        self.root, self.tasks, self.settings, self.report = root, tasks, settings, report
        self.by_name = {t.name: t for t in tasks}
        self.product_files = {p for t in tasks for p in t.product_paths()}
        self.grids: dict[str, dict] = {}
        self.kernels: dict[str, str] = {}
        self.dropped: list[str] = []  # the executed-notebook products, which nbflow keeps itself
        self.wrapped: list[str] = []  # steps that call a function task

    # -- paths

    def output_path(self, t: _Task, key: str) -> str:
        """Where task t's product `key` goes, relative to the project; a gridded product gets its own folder."""
        path = t.data[key]
        if "[[" in path:
            path = _strip_grid_placeholders(path, key)
        if t.grid is not None:
            folder, file = posixpath.split(path)
            if posixpath.basename(folder) != key:
                path = posixpath.join(folder, key, file)
        return path

    def declared(self, t: _Task, path: str) -> str:
        """A project-relative path as declared in t's notebook (relative to the notebook's folder)."""
        if posixpath.isabs(path) or not t.folder:
            return path
        trailing = "/" if path.endswith("/") else ""
        return posixpath.relpath(path or ".", t.folder) + trailing

    # -- the notebook

    def notebook(self, t: _Task) -> tuple[dict, ConvertedStep]:
        where = f"{t.step}.ipynb"
        inputs, rewrite = self._inputs(t, where)
        outputs = {key: self.declared(t, self.output_path(t, key)) for key in t.data}
        if t.nb_product:
            self.dropped.append(t.nb_product)
        for key, path in t.data.items():
            if "[[" in path and t.grid is None:
                self.report.fail(f"product {key!r} ({path}) names grid values, but there is no grid; declared "
                                 f"as {outputs[key]}", t.name)
        params = {k: _plain(self._relocate(t, v)) for k, v in t.params.items() if k != "resources_"}
        if t.grid is not None:
            self.grids[t.step] = t.grid
            self.report.note(f"grid written to nbflow.yaml (steps.{t.step}.grid); each instance writes its "
                             "outputs under its own partition folders "
                             f"({_partition_example(outputs, t.grid)})", t.name)
        if t.spec.get("kernelspec_name"):
            self.kernels[t.step] = str(t.spec["kernelspec_name"])
        if t.kind == "function":
            nb = self._function_notebook(t, inputs, outputs, params, rewrite)
        else:
            assert t.notebook is not None
            nb = self._script_notebook(t, inputs, outputs, params, rewrite, where)
        if any("id" not in c for c in nb["cells"]):  # cell ids came with nbformat 4.5
            nb["nbformat_minor"] = max(nb.get("nbformat_minor") or 0, 5)
            taken = {c["id"] for c in nb["cells"] if "id" in c}
            for i, cell in enumerate(nb["cells"]):
                if "id" not in cell:
                    cell["id"] = f"cell-{i + 1}" if f"cell-{i + 1}" not in taken else f"nbflow-cell-{i + 1}"
        notebook = posixpath.join(t.folder, f"{posixpath.basename(t.step)}.ipynb")
        return nb, ConvertedStep(t.step, t.name, t.source, notebook, inputs, outputs, params, t.grid)

    def _relocate(self, t: _Task, value: Any) -> Any:
        """A parameter that is a path inside the project ({{here}}/...) made relative to the notebook."""
        if not isinstance(value, str) or not (value == str(self.root) or value.startswith(str(self.root) + os.sep)):
            return value
        inside = _project_path(value, self.root)
        return self.declared(t, inside if inside != "." else "") or "."

    def _inputs(self, t: _Task, where: str) -> tuple[dict[str, str], "_Rewrite"]:
        rewrite = _Rewrite(nb_key=t.nb_key, outputs=dict.fromkeys(t.data))
        inputs: dict[str, str] = {}
        used_by: dict[str, tuple[str, str]] = {}

        def declare(key: str, path: str, origin: tuple[str, str]) -> None:
            if key in inputs and used_by[key] != origin:
                self.report.fail(f"inputs {key!r} would name both {used_by[key]} and {origin}; the second is "
                                 "not declared", t.name, file=where)
                return
            inputs[key], used_by[key] = self.declared(t, path), origin

        for up in t.upstream or []:
            producers = self._producers(t, up, where)
            if producers is None:
                continue
            wildcard = any(c in up for c in "*?[")
            rewrite.upstream[up] = _Upstream(wildcard=wildcard)
            for p in producers:
                if not p.data:
                    what = "only its executed notebook" if p.nb_product else "no file"
                    self.report.fail(f"upstream {p.name!r} writes {what}, so no input is declared for it: nbflow "
                                     "orders steps by the files they read, and this step no longer waits for it",
                                     t.name, file=where)
                for key in p.data:
                    path = self.output_path(p, key)
                    if p.grid is not None:  # every instance: the folder of their partitions
                        path, name = posixpath.dirname(path) + "/", f"{p.step}_{key}"
                    else:
                        name = p.name if p.single else f"{p.name}_{key}"
                    declare(name, path, (p.name, key))
                    rewrite.upstream[up].keys[key] = name
                    if p.single:
                        rewrite.upstream[up].single = name
                if p.nb_product:
                    rewrite.upstream[up].has_nb = True
        if t.upstream is None:
            rewrite.dynamic = True
        resources = t.params.get("resources_")
        if isinstance(resources, dict):
            for key, path in resources.items():
                declare(f"resources_{key}", _project_path(str(path), self.root), ("resources_", str(key)))
                rewrite.resources[str(key)] = f"resources_{key}"
            self.report.note("params.resources_ became inputs (resources_<key>): a change to one reruns the step",
                             t.name)
        for path in self._source_files(t):
            key = posixpath.splitext(posixpath.basename(path))[0] or "file"
            name, n = key, 2
            while name in inputs:
                name, n = f"{key}_{n}", n + 1
            declare(name, path, ("file", path))
            self.report.note(f"{path} is named in the code: declared as inputs[{name!r}], so that a change to "
                             "it reruns the step", t.name, file=where)
        return inputs, rewrite

    def _producers(self, t: _Task, up: str, where: str) -> list[_Task] | None:
        if any(c in up for c in "*?["):
            matches = [p for p in self.tasks if p is not t and fnmatch.fnmatchcase(p.name, up)]
            if not matches:
                self.report.fail(f"upstream {up!r} matches no task", t.name, file=where)
                return None
            return matches
        producer = self.by_name.get(up)
        if producer is None or producer is t:
            self.report.fail(f"upstream {up!r} is not a task of pipeline.yaml"
                             f"{did_you_mean(up, self.by_name)}", t.name, file=where)
            return None
        return [producer]

    def _source_files(self, t: _Task) -> list[str]:
        """Project files (not products) that the task's code or params name: source data it reads."""
        strings: list[str] = []
        if t.function is not None:
            strings += [n.value for n in ast.walk(t.function[3])
                        if isinstance(n, ast.Constant) and isinstance(n.value, str)]
        elif t.notebook is not None:
            for cell in t.notebook["cells"]:
                if cell.get("cell_type") == "code":
                    tree = _parse(cell_source(cell))
                    if tree is not None:
                        strings += [n.value for n in ast.walk(tree)
                                    if isinstance(n, ast.Constant) and isinstance(n.value, str)]
        strings += [v for k, v in t.params.items() if isinstance(v, str) and k != "resources_"]
        found = []
        for s in strings:
            if not s or len(s) > 500 or "\n" in s or "\x00" in s:
                continue
            path = _project_path(s if posixpath.isabs(s) else posixpath.join(t.folder, s), self.root)
            if (path.startswith("../") or posixpath.isabs(path) or path in self.product_files
                    or any(part.startswith(".") for part in path.split("/"))):
                continue
            candidate = self.root / path
            if candidate.is_file() and candidate != t.source_path and candidate.suffix not in (".py", ".ipynb") \
                    and path not in found:
                found.append(path)
        return found

    def _script_notebook(self, t: _Task, inputs: dict, outputs: dict, params: dict, rewrite: "_Rewrite",
                         where: str) -> dict:
        assert t.notebook is not None and t.parameters_cell is not None
        nb = t.notebook
        cells = nb["cells"]
        index = t.parameters_cell
        cell = cells[index]
        missing = {k: v[0] for k, v in (t.grid or {}).items()}
        cell["source"] = self._parameters_source(t, cell_source(cell), inputs, outputs, params, missing, where,
                                                 index + 1)
        if _needs_folders(outputs, t.grid):
            cells.insert(index + 1, _code_cell("nbflow-make-folders", _MAKE_FOLDERS))
        for number, c in enumerate(cells, start=1):
            if c.get("cell_type") == "code" and number != index + 1:
                c["source"] = rewrite.apply(cell_source(c), self.report, t.name, where, number)
        return nb

    def _parameters_source(self, t: _Task, source: str, inputs: dict, outputs: dict, params: dict,
                           grid_defaults: dict, where: str, number: int) -> str:
        text = _Text(source)
        assignments = _assignments(text.masked) or {}
        block = ("# converted from Ploomber: upstream[...] and product[...] are read from these\n"
                 + _declaration("inputs", inputs) + _declaration("outputs", outputs))
        for name in ("inputs", "outputs"):
            if name in assignments:
                self.report.fail(f"the parameters cell already assigns `{name}`; the converted declaration "
                                 "comes first and the old one overrides it: remove one", t.name, file=where,
                                 cell=number, line=assignments[name][0].lineno)
        ploomber = [n for name in ("upstream", "product") for n in assignments.get(name, [])]
        ploomber.sort(key=lambda n: (n.lineno, n.col_offset))
        if ploomber:
            first, *rest = ploomber
            text.replace_statement(first, block)
            for node in rest:
                text.replace_statement(node, "")
        else:
            text.insert(0, block)
        # params: their values become the defaults; a grid's parameter keeps its default, or gets its first value
        values = [(k, v, True) for k, v in params.items() if k not in ("upstream", "product")]
        values += [(k, v, False) for k, v in grid_defaults.items() if k not in params]
        for name, value, override in values:
            if name in assignments and not override:
                continue
            try:
                literal = _literal(value)
            except ValueError:
                self.report.fail(f"params {name!r}: {value!r} cannot be written as a Python literal; set it in "
                                 "the notebook by hand", t.name, file=where, cell=number)
                continue
            if name in assignments:
                text.replace(assignments[name][-1].value, literal)
            else:
                text.append(f"{name} = {literal}")
        return text.result()

    def _function_notebook(self, t: _Task, inputs: dict, outputs: dict, params: dict, rewrite: "_Rewrite") -> dict:
        assert t.function is not None
        module, func, path, fn = t.function
        arguments = _arguments(fn)
        takes_any = fn.args.kwarg is not None
        kwargs = []
        if "product" in arguments or takes_any:
            if t.single:
                kwargs.append(f"product=outputs[{json.dumps(t.step)}]")
            else:
                kwargs.append("product={" + ", ".join(f"{json.dumps(k)}: outputs[{json.dumps(k)}]"
                                                      for k in outputs) + "}")
        if "upstream" in arguments:
            entries = []
            for up, info in rewrite.upstream.items():
                if info.wildcard:
                    self.report.fail(f"upstream {up!r} (several tasks) is not passed to the function: pass the "
                                     "folder inputs by hand", t.name, file=f"{t.step}.ipynb")
                    continue
                if info.single:
                    entries.append(f"{json.dumps(up)}: inputs[{json.dumps(info.single)}]")
                elif info.keys:
                    entries.append(json.dumps(up) + ": {" + ", ".join(
                        f"{json.dumps(k)}: inputs[{json.dumps(v)}]" for k, v in info.keys.items()) + "}")
            kwargs.append("upstream={" + ", ".join(entries) + "}")
        for name in list(params) + [k for k in (t.grid or {}) if k not in params]:
            if name in arguments or takes_any:
                kwargs.append(f"{name}={name}")
        call = f"{func}({', '.join(kwargs)})"
        if len(call) > 100:
            call = f"{func}(\n" + "".join(f"    {k},\n" for k in kwargs) + ")"
        parameters = ("# converted from Ploomber: the function's product and upstream are built from these\n"
                      + _declaration("inputs", inputs) + _declaration("outputs", outputs))
        grid_defaults = {k: v[0] for k, v in (t.grid or {}).items() if k not in params}
        for name, value in list(params.items()) + list(grid_defaults.items()):
            try:
                parameters += f"{name} = {_literal(value)}\n"
            except ValueError:
                self.report.fail(f"params {name!r}: {value!r} cannot be written as a Python literal; set it in "
                                 "the notebook by hand", t.name, file=f"{t.step}.ipynb")
        cells = [
            {"cell_type": "markdown", "id": "about", "metadata": {},
             "source": f"Runs the Ploomber function task `{t.source}` ({_rel(path, self.root)}), converted by "
                       "`nbflow import ploomber`."},
            _code_cell("parameters", parameters.rstrip("\n"), [PARAMETERS_TAG]),
        ]
        if _needs_folders(outputs, t.grid):
            cells.append(_code_cell("nbflow-make-folders", _MAKE_FOLDERS))
        cells.append(_code_cell("call", f"from {module} import {func}\n\n{call}"))
        self.wrapped.append(t.step)
        return {"cells": cells, "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                            "language": "python"},
                                             "language_info": {"name": "python"}},
                "nbformat": 4, "nbformat_minor": 5}


_MAKE_FOLDERS = ("# Ploomber made the folders of a task's products before running it\n"
                 "import os\n\n"
                 "for _output in outputs.values():\n"
                 "    os.makedirs(os.path.dirname(_output) or \".\", exist_ok=True)")


def _needs_folders(outputs: dict[str, str], grid: dict | None) -> bool:
    return bool(outputs) and (grid is not None or any(posixpath.dirname(p.rstrip("/")) for p in outputs.values()))


def _partition_example(outputs: dict[str, str], grid: dict[str, list]) -> str:
    if not outputs:
        return "no data outputs"
    folder, file = posixpath.split(next(iter(outputs.values())))
    parts = "/".join(f"{k}={v[0]}" for k, v in grid.items())
    return posixpath.join(folder, parts, file)


def _code_cell(cell_id: str, source: str, tags: list[str] | None = None) -> dict:
    return {"cell_type": "code", "execution_count": None, "id": cell_id,
            "metadata": {"tags": tags} if tags else {}, "outputs": [], "source": source}


def _declaration(name: str, paths: dict[str, str]) -> str:
    if len(paths) <= 1:
        inner = ", ".join(f"{json.dumps(k, ensure_ascii=False)}: {json.dumps(v, ensure_ascii=False)}"
                          for k, v in paths.items())
        return f"{name} = {{{inner}}}\n"
    lines = "".join(f"    {json.dumps(k, ensure_ascii=False)}: {json.dumps(v, ensure_ascii=False)},\n"
                    for k, v in paths.items())
    return f"{name} = {{\n{lines}}}\n"


def _plain(value: Any) -> Any:
    """A YAML date or time as ISO text, as nbflow passes dates to a notebook."""
    if isinstance(value, (dt.date, dt.datetime)):
        return value.isoformat()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _literal(value: Any) -> str:
    """Python source for a YAML value (strings in double quotes); ValueError when it has none."""
    if value is None or isinstance(value, bool):
        return repr(value)
    if isinstance(value, (int, float)):
        if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
            raise ValueError(value)
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_literal(k)}: {_literal(v)}" for k, v in value.items()) + "}"
    raise ValueError(value)


# ---------------------------------------------------------------- rewriting code


@dataclass
class _Upstream:
    wildcard: bool = False
    single: str | None = None  # the input of a task with one product: upstream['x']
    keys: dict[str, str] = field(default_factory=dict)  # product key -> input name: upstream['x']['key']
    has_nb: bool = False


@dataclass
class _Rewrite:
    """How `upstream`, `product` and `resources_` in a task's code become `inputs` and `outputs`."""

    nb_key: str = "nb"
    outputs: dict[str, Any] = field(default_factory=dict)  # product key -> output key (None: the same)
    upstream: dict[str, _Upstream] = field(default_factory=dict)
    resources: dict[str, str] = field(default_factory=dict)
    dynamic: bool = False

    def apply(self, source: str, report: _Report, task: str, file: str, cell: int) -> str:
        names = ("upstream", "product", "resources_")
        if not any(n in source for n in names):
            return source
        text = _Text(source)
        tree = _parse(text.masked)
        if tree is None:
            if re.search(r"\b(upstream|product|resources_)\b", source):
                report.fail("the cell is not valid Python (a cell magic?): `upstream`/`product` in it were not "
                            "rewritten", task, file=file, cell=cell)
            return source
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        rebound = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id in names
                   and not isinstance(n.ctx, ast.Load)}
        rebound |= {a.arg for a in ast.walk(tree) if isinstance(a, ast.arg) and a.arg in names}
        for name in sorted(rebound):
            report.fail(f"the cell assigns its own `{name}`; `{name}[...]` in it was not rewritten", task,
                        file=file, cell=cell)
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and node.id in names and node.id not in rebound \
                    and isinstance(node.ctx, ast.Load):
                outcome = self._one(node, parents, text)
                if isinstance(outcome, tuple):
                    span, replacement = outcome
                    text.replace(span, replacement)
                else:
                    report.fail(outcome, task, file=file, cell=cell, line=node.lineno)
        return text.result()

    def _one(self, name: ast.Name, parents: dict, text: "_Text") -> tuple[ast.AST, str] | str:
        """(the expression, its replacement), or why it is not rewritten."""
        sub = parents.get(name)
        key = _constant_key(sub, name)
        shown = text.segment(sub if isinstance(sub, ast.Subscript) and sub.value is name else name)
        if key is None:
            what = {"upstream": "inputs[...]", "product": "outputs[...]", "resources_": "inputs[...]"}[name.id]
            return f"`{_short(shown)}` is not rewritten (not `{name.id}['<name>']`); use {what} (see the parameters cell)"
        quote = text.quote_of(sub.slice)
        if name.id == "product":
            if key == self.nb_key:
                return (f"`{shown}` is the executed notebook: nbflow keeps it in _nbflow/ and does not declare it; "
                        "not rewritten")
            if key not in self.outputs:
                return f"`{shown}`: the task has no product {key!r}; not rewritten"
            return sub, f"outputs[{_quoted(self.outputs[key] or key, quote)}]"
        if name.id == "resources_":
            if key not in self.resources:
                return f"`{shown}`: params.resources_ has no {key!r}; not rewritten"
            return sub, f"inputs[{_quoted(self.resources[key], quote)}]"
        info = self.upstream.get(key)
        if info is None:
            return (f"`{shown}`: {key!r} is not an upstream task of this one"
                    + ("; this task's upstream is not known statically" if self.dynamic else "")
                    + "; not rewritten")
        if info.wildcard:
            folders = ", ".join(f"inputs[{k!r}]" for k in info.keys.values()) or "inputs"
            return (f"`{shown}` gathers the products of every task matching {key!r}: not rewritten; read the "
                    f"folder {folders} instead (one partition folder per grid instance)")
        outer = parents.get(sub)
        inner_key = _constant_key(outer, sub)
        if inner_key is not None:
            whole = text.segment(outer)
            if inner_key in info.keys:
                return outer, f"inputs[{_quoted(info.keys[inner_key], text.quote_of(outer.slice))}]"
            if inner_key == "nb" and info.has_nb:
                return f"`{whole}` is {key}'s executed notebook, which nbflow does not declare; not rewritten"
            if info.single is None:
                return f"`{whole}`: task {key!r} has no product {inner_key!r}; not rewritten"
        if info.single is not None:
            return sub, f"inputs[{_quoted(info.single, quote)}]"
        keys = ", ".join(f"inputs[{v!r}]" for v in info.keys.values()) or "no data products"
        return f"`{shown}` is every product of {key!r}: not rewritten; use one of {keys}"


def _constant_key(sub: ast.AST | None, value: ast.AST) -> str | None:
    if (isinstance(sub, ast.Subscript) and sub.value is value and isinstance(sub.slice, ast.Constant)
            and isinstance(sub.slice.value, str) and isinstance(sub.ctx, ast.Load)):
        return sub.slice.value
    return None


def _quoted(key: str, quote: str) -> str:
    """A string literal for key, in the quotes the code used (double quotes inside an f'...' would break it)."""
    if quote == "'":
        text = repr(key)
        if text.startswith("'"):
            return text
    return json.dumps(key, ensure_ascii=False)


def _short(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


class _Text:
    """A cell's source with edits at AST positions (UTF-8 byte columns), applied all at once."""

    def __init__(self, source: str):
        self.source = source
        self.lines = io.StringIO(source, newline="").readlines() or [""]
        self.starts = [0]
        for line in self.lines:
            self.starts.append(self.starts[-1] + len(line))
        self.masked = _mask_magics(self.lines)
        self.edits: list[tuple[int, int, str]] = []
        self.appended: list[str] = []

    def offset(self, line: int, col: int) -> int:
        text = self.lines[line - 1] if line - 1 < len(self.lines) else ""
        return self.starts[line - 1] + len(text.encode("utf-8")[:col].decode("utf-8", errors="ignore"))

    def span(self, node: ast.AST) -> tuple[int, int]:
        return (self.offset(node.lineno, node.col_offset),  # type: ignore[attr-defined]
                self.offset(node.end_lineno, node.end_col_offset))  # type: ignore[attr-defined]

    def segment(self, node: ast.AST) -> str:
        start, end = self.span(node)
        return self.source[start:end]

    def quote_of(self, node: ast.AST) -> str:
        match = re.search(r"['\"]", self.segment(node))
        return match.group(0) if match else '"'

    def replace(self, node: ast.AST, replacement: str) -> None:
        start, end = self.span(node)
        self.edits.append((start, end, replacement))

    def insert(self, offset: int, text: str) -> None:
        self.edits.append((offset, offset, text))

    def replace_statement(self, node: ast.stmt, replacement: str) -> None:
        """Replace a statement; one alone on its lines goes with its lines (and its end of line)."""
        start, end = self.span(node)
        line_start = self.starts[node.lineno - 1]
        line_end = self.starts[node.end_lineno]  # type: ignore[attr-defined]
        alone = not self.source[line_start:start].strip() and not self.source[end:line_end].strip()
        if alone:
            start, end = line_start, line_end
            if replacement and not replacement.endswith("\n"):
                replacement += "\n"
            if replacement and end == len(self.source) and not self.source.endswith("\n"):
                replacement = replacement.rstrip("\n")
        else:
            replacement = replacement.rstrip("\n")
            if not replacement:  # `a = 1; upstream = None`: its `;` goes too
                before = self.source[line_start:start].rstrip()
                if before.endswith(";"):
                    start = line_start + len(before) - 1
        self.edits.append((start, end, replacement))

    def append(self, line: str) -> None:
        self.appended.append(line)

    def result(self) -> str:
        out = self.source
        for start, end, replacement in sorted(self.edits, key=lambda e: (e[0], e[1]), reverse=True):
            out = out[:start] + replacement + out[end:]
        if self.appended:
            out = (out.rstrip("\n") + "\n" if out.strip() else "") + "\n".join(self.appended)
        return out if self.source.endswith("\n") else out.rstrip("\n")


def _mask_magics(lines: list[str]) -> str:
    """IPython magics and shell escapes turned into comments of the same length, so that ast can read the cell."""
    if lines and lines[0].lstrip().startswith("%%"):
        return ""  # a cell magic: not Python
    masked = []
    for line in lines:
        stripped = line.lstrip()
        if stripped.startswith(("%", "!")):
            i = len(line) - len(stripped)
            line = line[:i] + "#" + line[i + 1:]
        masked.append(line)
    return "".join(masked)


def _parse(source: str) -> ast.Module | None:
    masked = _mask_magics(io.StringIO(source, newline="").readlines())
    if not masked.strip():
        return None
    try:
        return ast.parse(masked)
    except (SyntaxError, ValueError):
        return None


def _assignments(source: str) -> dict[str, list[ast.Assign | ast.AnnAssign]] | None:
    """Top-level `name = value` statements of a cell, by name (None: not valid Python)."""
    tree = _parse(source) if source.strip() else ast.Module(body=[], type_ignores=[])
    if tree is None:
        return None
    found: dict[str, list] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            found.setdefault(node.targets[0].id, []).append(node)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            found.setdefault(node.target.id, []).append(node)
    return found


def _tags(cell: dict) -> list[str]:
    tags = (cell.get("metadata") or {}).get("tags") or []
    return tags if isinstance(tags, list) else []


# ---------------------------------------------------------------- the output folder


def _rel(path: Path, root: Path) -> str:
    try:
        return path.absolute().relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def _copy_project(root: Path, out: Path, skip: set[str], products: list[str], report: _Report) -> list[str]:
    """Copy the project's other files (data, modules) to the same places under `out`."""
    copied: list[str] = []
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in _SKIP_DIRS
                         and not (here / d / "pyvenv.cfg").exists() and (here / d).absolute() != out)
        for name in sorted(files):
            path = here / name
            rel = _rel(path, root)
            if (rel in skip or (name.startswith(".") and name.endswith(".metadata")) or name == ".DS_Store"
                    or any(fnmatch.fnmatchcase(rel, p) or fnmatch.fnmatchcase(rel, p.rstrip("/") + "/*")
                           for p in products)):
                continue
            if path.suffix in (".py", ".ipynb") and _looks_like_ploomber_task(path):
                report.note(f"{rel} looks like a Ploomber task that pipeline.yaml does not run; not copied "
                            "(nbflow would read it as a step)")
                continue
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            try:
                shutil.copy2(path, out / rel)
            except OSError as e:  # a broken link, a file we may not read
                report.fail(f"{rel}: not copied ({e.strerror or e}); copy it by hand if a step needs it")
                continue
            copied.append(rel)
    return copied


def _looks_like_ploomber_task(path: Path) -> bool:
    """A script or notebook whose parameters cell assigns `upstream` and `product` (checked on the text)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    if path.suffix == ".ipynb":
        try:
            cells = json.loads(text).get("cells") or []
            text = "\n".join(cell_source(c) for c in cells if PARAMETERS_TAG in _tags(c))
        except (ValueError, AttributeError):
            return False
    elif not re.search(r"tags\s*=\s*\[[^\]]*['\"]parameters['\"]", text):
        return False
    return bool(re.search(r"^upstream\s*=", text, re.M) and re.search(r"^product\s*=", text, re.M))


def _write_config(out: Path, pipeline: Path, plan: _Plan, report: _Report) -> str | None:
    import yaml  # noqa: PLC0415

    config: dict[str, Any] = {}
    if plan.settings.jobs is not None:
        config["jobs"] = plan.settings.jobs
    steps: dict[str, dict] = {}
    for step, grid in plan.grids.items():
        steps.setdefault(step, {})["grid"] = grid
    for step, kernel in plan.kernels.items():
        steps.setdefault(step, {})["kernel"] = kernel
    if steps:
        config["steps"] = steps
    if not config:
        return None
    path = out / "nbflow.yaml"
    if path.exists():
        report.fail("the project has its own nbflow.yaml; it was replaced by the converted settings")
    header = f"# written by `nbflow import ploomber` from {pipeline.name}\n"
    path.write_text(header + yaml.safe_dump(config, sort_keys=False, default_flow_style=None), encoding="utf-8")
    return "nbflow.yaml"


def _ignore_state_folder(out: Path) -> None:
    gitignore = out / ".gitignore"
    text = gitignore.read_text(encoding="utf-8") if gitignore.exists() else ""
    if "_nbflow" not in text:
        gitignore.write_text(text + ("\n" if text and not text.endswith("\n") else "") + "_nbflow/\n",
                             encoding="utf-8")

