"""Read one notebook file into a `Step`, statically.

Owns: parsing a notebook (JSON, or jupytext percent-format `.py`), finding the
`parameters` cell, and reading the declarations (`inputs`, `outputs`,
`publishes`, `consumes`) and ordinary parameters from its AST. Must not start
a kernel, import nbformat/papermill, or know about other steps: edges and
pipeline-wide rules live in `graph.py`.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator

from . import stores
from .errors import PipelineError, Problem
from .imports import imported_names

PARAMETERS_TAG = "parameters"
INJECTED_TAG = "injected-parameters"
DECLARATIONS = ("inputs", "outputs", "publishes", "consumes")
NOTEBOOK_SUFFIXES = (".ipynb", ".py")


@dataclass(frozen=True)
class Parameter:
    """An ordinary parameter of a step: a name in the parameters cell."""

    name: str
    default: Any
    type_name: str  # "int", "float", "bool", "str", "NoneType", "list", "dict", "tuple" or "expression"
    line: int
    source: str  # the default as written, e.g. "2012" or "date.today()"


@dataclass(frozen=True)
class Step:
    """A notebook with a `parameters` cell: one node of the pipeline graph."""

    name: str  # path relative to the pipeline folder, without suffix: "load", "etl/clean"
    path: Path  # absolute path of the source notebook
    rel_path: str  # path relative to the pipeline folder, posix
    inputs: dict[str, tuple[str, ...]]  # as written, relative to the notebook's folder
    outputs: dict[str, tuple[str, ...]]
    parameters: dict[str, Parameter]
    publishes: tuple[str, ...] = ()
    consumes: tuple[str, ...] = ()
    kernel: str = "python3"
    language: str = "python"
    parameters_cell: int = 0  # 0-based index of the parameters cell
    cell_hashes: tuple[tuple[int, str], ...] = ()  # (1-based cell number, sha256) of every code cell
    declaration_lines: dict[str, int] = field(default_factory=dict)
    imports: tuple[str, ...] = ()  # module names its code cells import (see imports.py)
    output_lists: frozenset[str] = frozenset()  # output names declared as a list of paths (not one string)
    # an instance of a parameter grid (grid.py): the step it was expanded from and its (key, value) pairs
    instance_of: str | None = None
    grid: tuple[tuple[str, Any], ...] = ()

    @property
    def folder(self) -> Path:
        return self.path.parent

    def resolve(self, relative: str) -> Path | str:
        """Absolute, normalised path of a declared path (relative to the notebook's folder); a URL normalised."""
        if "://" in relative:
            if stores.is_url(relative):
                return stores.normalise(relative)
            relative = stores.local_path_of(relative)
        return Path(os.path.normpath(os.path.join(self.path.parent, relative)))

    def input_paths(self) -> list[tuple[str, Path | str]]:
        return list(self._input_paths)

    def output_paths(self) -> list[tuple[str, Path | str]]:
        return list(self._output_paths)

    # Resolved once per Step: graph building and planning ask for them thousands of times in a large pipeline.
    @cached_property
    def _input_paths(self) -> tuple[tuple[str, Path | str], ...]:
        return tuple((p, self.resolve(p)) for paths in self.inputs.values() for p in paths)

    @cached_property
    def _output_paths(self) -> tuple[tuple[str, Path | str], ...]:
        return tuple((p, self.resolve(p)) for paths in self.outputs.values() for p in paths)


@dataclass(frozen=True)
class NotAStep:
    """A notebook in the pipeline folder that nbflow will never execute, and why."""

    name: str
    path: Path
    rel_path: str
    reason: str
    # an untagged code cell that still declares `outputs` (a lost `parameters` tag?): its number and the paths
    declaring_cell: int | None = None
    outputs: tuple[str, ...] = ()

    def output_paths(self) -> list[tuple[str, Path | str]]:
        return [(p, stores.normalise(p) if stores.is_url(p) else Path(os.path.normpath(self.path.parent / p)))
                for p in self.outputs]


def is_folder_path(declared: str) -> bool:
    """A declared path ending in `/` is a folder: it is hashed as a whole, and read as everything inside it."""
    return declared.endswith(("/", os.sep))


def step_name(path: Path, root: Path) -> str:
    return path.relative_to(root).with_suffix("").as_posix()


def read_step(path: Path, root: Path) -> Step | NotAStep:
    """Read `path` (inside pipeline folder `root`) into a Step, or say why it is not one.

    Raises PipelineError with every problem found in this file.
    """
    path = Path(path)
    root = Path(root)
    rel = path.relative_to(root).as_posix()
    name = step_name(path, root)
    nb = load_notebook_json(path, rel)
    if isinstance(nb, str):
        return NotAStep(name, path, rel, nb)
    cells = nb["cells"]
    tagged = [i for i, c in enumerate(cells) if PARAMETERS_TAG in _tags(c)]
    if not tagged:
        return NotAStep(name, path, rel, "no cell tagged 'parameters'", *_untagged_declarations(cells))
    if len(tagged) > 1:
        numbers = " and ".join(str(i + 1) for i in tagged[:2])
        raise PipelineError(Problem(
            f"cells {numbers} are both tagged 'parameters'; keep the tag on one cell", file=rel))
    index = tagged[0]
    if cells[index].get("cell_type") != "code":
        raise PipelineError(Problem(
            f"cell {index + 1} is tagged 'parameters' but is not a code cell", file=rel))
    source = cell_source(cells[index])
    decl = _read_parameters_cell(source, rel, index + 1)
    meta = nb.get("metadata", {})
    kernelspec = meta.get("kernelspec") or {}
    language = kernelspec.get("language") or (meta.get("language_info") or {}).get("name") or "python"
    # every code cell, the parameters cell included: a `def` or an `if` there changes what the step computes
    code = [(i, cell_source(c)) for i, c in enumerate(cells)
            if c.get("cell_type") == "code" and INJECTED_TAG not in _tags(c)]
    hashes = tuple((i + 1, hashlib.sha256(src.encode()).hexdigest()) for i, src in code)
    imports = tuple(dict.fromkeys(name for _, src in code if "import" in src for name in imported_names(src)))
    return Step(
        name=name,
        path=path,
        rel_path=rel,
        inputs=decl.paths["inputs"],
        outputs=decl.paths["outputs"],
        parameters=decl.parameters,
        publishes=decl.names["publishes"],
        consumes=decl.names["consumes"],
        kernel=kernelspec.get("name") or "python3",
        language=language,
        parameters_cell=index,
        cell_hashes=hashes,
        declaration_lines=decl.lines,
        imports=imports,
        output_lists=frozenset(decl.lists),
    )


def _untagged_declarations(cells: list[dict]) -> tuple[int | None, tuple[str, ...]]:
    """The first code cell that assigns a literal `outputs` although no cell is tagged: (its number, paths)."""
    for i, cell in enumerate(cells):
        if cell.get("cell_type") != "code" or "outputs" not in cell_source(cell):
            continue
        try:
            tree = ast.parse(cell_source(cell))
        except (SyntaxError, ValueError):
            continue
        for node in tree.body:
            if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                    and node.targets[0].id == "outputs"):
                try:
                    value = ast.literal_eval(node.value)
                except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                    continue
                paths = _path_mapping("outputs", value, lambda message: None)
                if paths:
                    return i + 1, tuple(p for group in paths.values() for p in group)
    return None, ()


def load_notebook_json(path: Path, rel: str | None = None) -> dict | str:
    """The notebook as a plain dict (nbformat 4), or a string saying why it is not a step.

    Raises PipelineError for a file that should be a notebook but is broken.
    """
    rel = rel or str(path)
    if path.suffix == ".py":
        return _load_percent_script(path, rel)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise PipelineError(Problem(f"cannot read the notebook: {e.strerror}", file=rel)) from None
    if not raw.strip():
        raise PipelineError(Problem("the file is empty, not a notebook; delete it or save a notebook over it",
                                    file=rel))
    try:
        nb = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise PipelineError(Problem("not a notebook: the file is not UTF-8 text (binary data?)", file=rel)) from None
    except json.JSONDecodeError as e:
        raise PipelineError(Problem(
            f"not valid notebook JSON: {e.msg} at line {e.lineno} column {e.colno}; "
            "restore the file from version control or re-save it in Jupyter",
            file=rel, line=e.lineno)) from None
    return _check_structure(nb, rel)


def _check_structure(nb: Any, rel: str) -> dict:
    if not isinstance(nb, dict) or "cells" not in nb and "worksheets" not in nb:
        raise PipelineError(Problem("not a notebook: the JSON has no 'cells' list", file=rel))
    major = nb.get("nbformat")
    if major != 4:
        raise PipelineError(Problem(
            f"notebook format v{major} is not supported; convert it with "
            f"`jupyter nbconvert --to notebook --nbformat 4 --inplace {rel}`", file=rel))
    cells = nb.get("cells")
    if not isinstance(cells, list):
        raise PipelineError(Problem("not a notebook: 'cells' is not a list", file=rel))
    seen: dict[str, int] = {}
    for i, cell in enumerate(cells):
        if not isinstance(cell, dict) or "cell_type" not in cell or "source" not in cell:
            raise PipelineError(Problem(f"cell {i + 1} is malformed (no cell_type or source)", file=rel))
        cid = cell.get("id")
        if cid is not None:
            if cid in seen:
                raise PipelineError(Problem(
                    f"cells {seen[cid] + 1} and {i + 1} have the same id {cid!r}; "
                    "cell ids must be unique: change or delete one of them", file=rel))
            seen[cid] = i
    return nb


def _load_percent_script(path: Path, rel: str) -> dict | str:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PipelineError(Problem(f"cannot read the script: {e}", file=rel)) from None
    try:
        import jupytext  # noqa: PLC0415 - optional extra
    except ImportError:
        return "jupytext percent script, but jupytext is not installed: pip install 'nbflow[jupytext]'"
    nb = jupytext.reads(text, fmt="py:percent")
    return _check_structure(json.loads(json.dumps(nb)), rel)


def is_percent_script(path: Path) -> bool:
    """A `.py` file counts as a notebook only when it has jupytext percent cell markers."""
    try:
        with path.open(encoding="utf-8", errors="replace") as f:
            return any(line.startswith("# %%") for line in f)
    except OSError:
        return False


def cell_source(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else str(src)


def _tags(cell: dict) -> list[str]:
    tags = (cell.get("metadata") or {}).get("tags") or []
    return tags if isinstance(tags, list) else []


@dataclass
class _Declarations:
    paths: dict[str, dict[str, tuple[str, ...]]]
    names: dict[str, tuple[str, ...]]
    parameters: dict[str, Parameter]
    lines: dict[str, int]
    lists: set[str] = field(default_factory=set)  # output names declared as a list


def _read_parameters_cell(source: str, rel: str, cell_number: int) -> _Declarations:
    problems: list[Problem] = []

    def problem(message: str, line: int | None) -> None:
        where = f"parameters cell (cell {cell_number})" + (f", line {line}" if line else "")
        problems.append(Problem(f"{where}: {message}", file=rel, line=line))

    decl = _Declarations(
        paths={"inputs": {}, "outputs": {}},
        names={"publishes": (), "consumes": ()},
        parameters={},
        lines={},
    )
    try:
        tree = ast.parse(source)
    except SyntaxError as e:
        problem(f"syntax error: {e.msg}; fix the cell so that it runs", e.lineno)
        raise PipelineError(problems) from None
    except ValueError as e:  # a NUL byte in the source
        problem(f"cannot be parsed: {e}; remove the character", None)
        raise PipelineError(problems) from None
    for node, target, value in assignments(tree):
        segment = ast.get_source_segment(source, value) or ""
        try:
            literal = ast.literal_eval(value)
            is_literal = True
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            literal, is_literal = None, False
        decl.lines[target] = node.lineno
        if target in DECLARATIONS:
            if not is_literal:
                problem(f"`{target}` must be a literal (strings, lists, dicts), not `{segment}`; "
                        "nbflow reads declarations without running the notebook", node.lineno)
                continue
            line = node.lineno

            def here(message: str, line: int = line) -> None:
                problem(message, line)

            if target in ("inputs", "outputs"):
                paths = _path_mapping(target, literal, here)
                if paths is not None:
                    decl.paths[target] = paths
                    if target == "outputs":
                        decl.lists = {k for k, v in literal.items() if isinstance(v, (list, tuple))}
            else:
                names = _name_list(target, literal, here)
                if names is not None:
                    decl.names[target] = names
            continue
        decl.parameters[target] = Parameter(
            name=target,
            default=literal,
            type_name=type(literal).__name__ if is_literal else "expression",
            line=node.lineno,
            source=segment,
        )
    for name in decl.names["consumes"]:
        if name not in decl.parameters:
            problem(f"`consumes` lists {name!r} but the cell has no parameter {name!r}; "
                    f"add `{name} = <default>` so the notebook also runs by hand", decl.lines.get("consumes"))
    if {"upstream", "product"} <= decl.parameters.keys() and not {"inputs", "outputs"} & decl.lines.keys():
        problem("looks like a Ploomber task (`upstream` and `product`, no `inputs`/`outputs`); convert the project "
                "with `nbflow import ploomber pipeline.yaml`", decl.lines["upstream"])
    if problems:
        raise PipelineError(problems)
    return decl


def assignments(tree: ast.Module) -> Iterator[tuple[ast.stmt, str, ast.expr]]:
    """The top-level `name = value` (and `name: type = value`) statements of a cell: (node, name, value)."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            yield node, node.targets[0].id, node.value
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            yield node, node.target.id, node.value


def _path_mapping(target: str, value: Any, problem) -> dict[str, tuple[str, ...]] | None:
    if not isinstance(value, dict):
        problem(f"`{target}` must be a dict of name -> path, e.g. {target} = {{\"data\": \"data/x.csv\"}}")
        return None
    result: dict[str, tuple[str, ...]] = {}
    for key, paths in value.items():
        if isinstance(paths, str):
            paths = [paths]
        if (not isinstance(key, str) or not isinstance(paths, (list, tuple)) or not paths
                or not all(isinstance(p, str) and p.strip() for p in paths)):
            problem(f"`{target}[{key!r}]` must be a path string or a non-empty list of path strings")
            continue
        if any("\x00" in p for p in paths):
            problem(f"`{target}[{key!r}]` contains a NUL character, which no file name can hold")
            continue
        result[key] = tuple(paths)
    return result


def _name_list(target: str, value: Any, problem) -> tuple[str, ...] | None:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v.isidentifier() for v in value):
        problem(f"`{target}` must be a list of value names (identifiers), e.g. {target} = [\"best_month\"]")
        return None
    return tuple(value)
