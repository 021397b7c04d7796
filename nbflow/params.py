"""Parameter overrides: parse `-p NAME=VALUE`, coerce to the default's type.

Owns: turning override text into Python values, and the two special values
that are injected as code instead of literals: a secret read from the
environment and a published value loaded from `_nbflow/values/`. Must not know
about the graph.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from typing import Any

from .notebook import Parameter

SECRET_NAME = re.compile(r"token|password|passwd|secret|key", re.IGNORECASE)


class CliValue(str):
    """A parameter value typed on the command line: coerced to the default's type."""


@dataclass(frozen=True)
class EnvRef:
    """A secret: the kernel reads it from an environment variable, never from the notebook."""

    var: str

    def __repr__(self) -> str:
        return f'__import__("os").environ[{self.var!r}]'


@dataclass(frozen=True)
class ValueRef:
    """A value published by an upstream step, loaded from its file (path relative to the notebook)."""

    path: str

    def __repr__(self) -> str:
        return f'__import__("nbflow").load_value({self.path!r})'


def is_secret_name(name: str) -> bool:
    return bool(SECRET_NAME.search(name))


def parse_assignments(items: list[str] | tuple[str, ...]) -> dict[str, CliValue]:
    """['a=1', 'clean.b=x'] -> {'a': '1', 'clean.b': 'x'}. Raises ValueError naming the bad item."""
    result: dict[str, CliValue] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"-p {item!r}: expected NAME=VALUE or STEP.NAME=VALUE")
        result[name.strip()] = CliValue(value)
    return result


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def coerce(value: Any, parameter: Parameter) -> Any:
    """Convert a command-line string to the type of the parameter's default.

    Python values (not CliValue) are returned as they are. Raises ValueError
    with the expected type.
    """
    if not isinstance(value, CliValue):
        return value
    text = str(value)
    kind = parameter.type_name
    try:
        if kind == "str":
            return text
        if kind == "bool":
            low = text.strip().lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError
        if kind == "int":
            return int(text.strip())
        if kind == "float":
            return float(text.strip())
        if kind in ("list", "dict", "tuple", "set"):
            parsed = ast.literal_eval(text)
            if type(parsed).__name__ != kind:
                raise ValueError
            return parsed
    except (ValueError, SyntaxError):
        raise ValueError(f"expected {kind} like the default {parameter.source}, got {text!r}") from None
    # None default or an expression: a Python literal if it is one, else the text
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
