"""The project's own modules that a step imports, found statically.

Owns: reading the `import` statements of a notebook's code cells and of the
project modules they reach (AST only, nothing is imported), and resolving
module names to files in the step's search folders (the notebook's own
folder, as Jupyter puts it first on `sys.path`, then `pythonpath:`). Installed
packages are never followed: only files inside those folders count. The
fingerprint of a step covers the files found here, so editing
`src/features.py` makes exactly the steps that import it stale.
"""

from __future__ import annotations

import ast
import os
from functools import lru_cache
from pathlib import Path
from typing import Iterable


def imported_names(source: str) -> tuple[str, ...]:
    """Absolute module names a piece of code imports: `import a.b` -> a.b; `from a import b` -> a, a.b."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return ()  # IPython magics and the like: what can be read is read cell by cell
    return tuple(_names(tree, package=None))


def _names(tree: ast.AST, package: str | None) -> Iterable[str]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                if package is None:
                    continue
                parts = package.split(".")
                if node.level - 1 > len(parts):
                    continue
                parent = ".".join(parts[: len(parts) - (node.level - 1)])
                base = f"{parent}.{base}" if base and parent else base or parent
            if base:
                yield base
                yield from (f"{base}.{alias.name}" for alias in node.names if alias.name != "*")


def project_modules(names: Iterable[str], folders: Iterable[Path]) -> list[Path]:
    """The files of the modules `names` that lie in `folders`, and of the project modules they import."""
    folders = [Path(f) for f in folders]
    found: dict[Path, None] = {}
    todo = list(names)
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for path, package in _resolve(name, tuple(folders)):
            if path in found:
                continue
            found[path] = None
            todo.extend(_module_imports(path, package, _mtime(path)))
    return sorted(found)


def _resolve(name: str, folders: tuple[Path, ...]) -> list[tuple[Path, str]]:
    """(file, its package) for `name` and its parent packages, in the first folder that has it."""
    parts = name.split(".")
    for folder in folders:
        files: list[tuple[Path, str]] = []
        for i in range(1, len(parts) + 1):
            dotted = ".".join(parts[:i])
            base = folder.joinpath(*parts[:i])
            if (base / "__init__.py").is_file():
                files.append((base / "__init__.py", dotted))
            elif base.with_suffix(".py").is_file():
                files.append((base.with_suffix(".py"), ".".join(parts[: i - 1])))
                break
            elif not base.is_dir():  # a namespace package is a plain folder
                break
        if files:
            return files
    return []


def _mtime(path: Path) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return 0


@lru_cache(maxsize=4096)
def _module_imports(path: Path, package: str, mtime_ns: int) -> tuple[str, ...]:
    """The imports of one module file (cached by its mtime: a watch loop re-reads only what changed)."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
        return ()
    return tuple(_names(tree, package or None))


def missing_module_hint(evalue: str, folder: Path, root: Path) -> str:
    """For "No module named 'config'": where that module is above the notebook, and the `pythonpath:` fix."""
    import re  # noqa: PLC0415

    match = re.search(r"No module named '([\w.]+)'", evalue)
    if not match:
        return ""
    top = match.group(1).split(".")[0]
    for above in folder.parents:
        for candidate in (above / f"{top}.py", above / top):
            if candidate.exists():
                where = os.path.relpath(above, root)
                return (f"; {candidate} exists above the notebook's folder (steps run in their own folder, as in "
                        f"Jupyter): add `pythonpath: [{Path(where).as_posix()}]` to nbflow.yaml so that steps can "
                        f"import it")
    return ""
