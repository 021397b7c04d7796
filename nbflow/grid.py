"""Parameter grids: one step, one instance per combination of values (DESIGN s.8).

Owns: how a grid value is written (in instance names and partition folders),
which values can be written so, an instance's name (`train[alpha=0.1,seed=1]`),
where an instance's outputs go (Hive-style partition folders inserted before
the file name), expanding a Step into its instances, and finding partition
folders that no instance writes any more. Must not read nbflow.yaml or know
the graph: graph.py checks a grid against its step, then calls `expand`.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .notebook import Step, is_folder_path

# characters a value cannot hold: path separators and `=` break the partition folder `key=value`; `,` `[` `]`
# the instance's name; `%` is an escape to the Hive readers (pyarrow, Spark)
_RESERVED = frozenset('/\\=,[]%')
MAX_NAME_BYTES = 255 - len(".ipynb")  # an instance's executed notebook is `<name>.ipynb`: one file name


def format_value(value: Any) -> str:
    """A grid value as written in names and folders: str(), with booleans `true`/`false` as YAML writes them."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def value_problem(value: Any) -> str | None:
    """Why `value` cannot be a grid value, or None when it can."""
    if isinstance(value, bool) or isinstance(value, (int, float, str)):
        text = format_value(value)
    else:
        return f"{value!r} is not a string, a number or true/false"
    if not text:
        return "an empty string cannot name a partition folder"
    bad = sorted({c for c in text if c in _RESERVED or not c.isprintable()})
    if bad:
        shown = ", ".join(repr(c) if c.isprintable() else repr(c).strip("'") for c in bad)
        return (f"{text!r} contains {shown}, which cannot be part of a partition folder `key=value` or of an "
                "instance name `step[key=value,...]`")
    if text != text.strip():
        return f"{text!r} starts or ends with a space"
    return None


def instance_name(base: str, pairs: Iterable[tuple[str, Any]]) -> str:
    """`train[alpha=0.1,seed=1]`: the keys in the grid's order."""
    return f"{base}[{','.join(f'{k}={format_value(v)}' for k, v in pairs)}]"


def partition(pairs: Iterable[tuple[str, Any]]) -> str:
    """`alpha=0.1/seed=1`: one Hive-style folder per grid key."""
    return "/".join(f"{k}={format_value(v)}" for k, v in pairs)


def partitioned(path: str, pairs: Sequence[tuple[str, Any]]) -> str:
    """A declared output path of an instance: the partition folders before the file name.

    `metrics/scores.parquet` -> `metrics/alpha=0.1/seed=1/scores.parquet`; a folder
    `parts/` -> `parts/alpha=0.1/seed=1/`.
    """
    part = partition(pairs)
    if is_folder_path(path):
        return f"{path}{part}/"
    folder, sep, name = path.rpartition("/")
    return f"{folder}/{part}/{name}" if sep else f"{part}/{name}"


def plain_root(path: str) -> str:
    """The folder under which the instances of a declared output write their partitions."""
    if is_folder_path(path):
        return path
    folder, sep, _ = path.rpartition("/")
    return f"{folder}/" if sep else "./"


def parse_selection(name: str) -> tuple[str, dict[str, str]] | None:
    """`train[alpha=0.1, seed=1]` -> ("train", {"alpha": "0.1", "seed": "1"}); None when not of that shape."""
    base, bracket, rest = name.partition("[")
    if not bracket or not rest.endswith("]") or not base:
        return None
    pairs: dict[str, str] = {}
    for item in rest[:-1].split(","):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            return None
        pairs[key.strip()] = value.strip()
    return base, pairs


def folded(names: Iterable[str]) -> list[str]:
    """Step names for a sentence: three or more instances of one grid become `train (6 instances)`."""
    names = list(names)
    if len(names) < 3:
        return names
    bases: dict[str, list[str]] = {}
    for name in names:
        parsed = parse_selection(name)
        bases.setdefault(parsed[0] if parsed else name, []).append(name)
    out: list[str] = []
    for name in names:
        parsed = parse_selection(name)
        group = bases.get(parsed[0]) if parsed else None
        if parsed is None or group is None or len(group) < 3:
            out.append(name)
        elif group[0] == name:
            out.append(f"{parsed[0]} ({len(group)} instances)")
    return out


@dataclass(frozen=True)
class Grid:
    """A gridded step: the notebook as read (defaults and plain paths), its values and its instances."""

    step: Step
    values: dict[str, tuple[Any, ...]]  # key -> values, in the grid's order
    instances: tuple[str, ...]  # instance names, in the order of the cartesian product

    def matching(self, wanted: Mapping[str, str]) -> list[str]:
        """The instances whose values (as written) include `wanted`."""
        found = []
        for combo in itertools.product(*self.values.values()):
            pairs = dict(zip(self.values, map(format_value, combo)))
            if all(pairs.get(k) == v for k, v in wanted.items()):
                found.append(instance_name(self.step.name, zip(self.values, combo)))
        return found


def expand(step: Step, values: Mapping[str, Sequence[Any]]) -> tuple[Grid, list[Step]]:
    """The instances of `step` for the cartesian product of `values` (keys in their order)."""
    keys = tuple(values)
    instances = []
    for combo in itertools.product(*values.values()):
        pairs = tuple(zip(keys, combo))
        outputs = {label: tuple(partitioned(p, pairs) for p in paths) for label, paths in step.outputs.items()}
        instances.append(replace(step, name=instance_name(step.name, pairs), outputs=outputs,
                                 instance_of=step.name, grid=pairs))
    grid = Grid(step, {k: tuple(v) for k, v in values.items()}, tuple(s.name for s in instances))
    return grid, instances


def injected_outputs(step: Step) -> dict[str, str | list[str]]:
    """An instance's `outputs` as its injected-parameters cell sets it: paths as declared (relative), in the
    shape the notebook declares them (a string, or a list)."""
    return {label: list(paths) if label in step.output_lists else paths[0] for label, paths in step.outputs.items()}


@dataclass(frozen=True)
class LeftBehind:
    """A path under a gridded step's output folder that no current instance writes."""

    step: str
    path: Path | str  # absolute, or a URL
    why: str


def left_behind(grid: Grid, current: Iterable[Path | str]) -> list[LeftBehind]:
    """Partition folders (`key=value`) under the grid's output folders that lead to no current output path
    (of any step), and the notebook's own plain output paths (a run by hand) when they exist."""
    outputs = {str(path) for path in current}
    keep: set[str] = set()  # every folder on the way to a current output (strings: thousands of them)
    for path in outputs:
        folder = os.path.dirname(path)
        while folder not in keep and folder != os.path.dirname(folder):
            keep.add(folder)
            folder = os.path.dirname(folder)
    found: list[LeftBehind] = []
    seen: set[str] = set()
    for declared, plain in grid.step.output_paths():
        root = str(grid.step.resolve(plain_root(declared)))
        if not is_folder_path(declared) and str(plain) not in outputs and os.path.lexists(plain):
            found.append(LeftBehind(grid.step.name, plain, f"{grid.step.rel_path}'s own output path, written by a "
                                                           "run by hand? its instances write partition folders"))
        if root in seen:
            continue
        seen.add(root)
        todo = [root]
        while todo:
            try:
                entries = list(os.scandir(todo.pop()))
            except OSError:
                continue
            for entry in entries:
                if "=" not in entry.name or entry.path in outputs or not entry.is_dir(follow_symlinks=False):
                    continue
                if entry.path in keep:
                    todo.append(entry.path)
                else:
                    found.append(LeftBehind(grid.step.name, Path(entry.path),
                                            f"no longer in the grid of {grid.step.name}"))
    return sorted(found, key=lambda item: item.path)
