"""Parameter overrides: parse `-p NAME=VALUE`, coerce to the default's type.

Owns: turning override text into Python values, making values given from
Python or YAML into plain literals (or refusing them), which names are secrets,
and the two special values that are injected as code instead of literals: a
secret read from the environment and a published value loaded from
`_nbflow/values/`. Must not know about the graph.
"""

from __future__ import annotations

import ast
import datetime
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

from .notebook import Parameter

# A name is taken for a secret when its last word (words split at `_` and at camelCase
# humps) is one of these, or its last two words one of the pairs: `api_token`, `password`,
# `client_secret`, `aws_secret_access_key` are secrets; `max_tokens`, `sort_keys`, `keyword`,
# `tokenizer`, `key` are not. Anything else is made a secret with `secrets:` in nbflow.yaml.
SECRET_WORDS = frozenset({"token", "password", "passwd", "secret", "apikey", "credentials"})
SECRET_PAIRS = frozenset({("api", "key"), ("secret", "key"), ("access", "key"), ("private", "key"),
                          ("auth", "key")})
_WORD = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")


class CliValue(str):
    """A parameter value typed on the command line: coerced to the default's type."""


@dataclass(frozen=True)
class EnvRef:
    """A secret: the kernel reads it from an environment variable, never from the notebook.

    `text` is what the variable holds (never written anywhere); `typed` says it
    is a Python literal (a secret whose default is a number, a list...) that the
    kernel evaluates, so a secret is coerced like any parameter.
    """

    var: str
    text: str = field(default="", repr=False, compare=False)
    typed: bool = False

    @classmethod
    def holding(cls, var: str, value: Any) -> "EnvRef":
        if isinstance(value, str):
            return cls(var, value)
        return cls(var, repr(value), typed=True)

    def __repr__(self) -> str:
        read = f'__import__("os").environ[{self.var!r}]'
        return f'__import__("ast").literal_eval({read})' if self.typed else read


@dataclass(frozen=True)
class ValueRef:
    """A value published by an upstream step, loaded from its file (path relative to the notebook).

    A value of a gridded step: `path` is its folder and `grid` the values of each current instance
    (`{"alpha": 0.1, "seed": 1}`), loaded as one DataFrame (see `values.load_value`).
    """

    path: str
    grid: tuple[dict[str, Any], ...] = ()

    def __repr__(self) -> str:
        if self.grid:
            return f'__import__("nbflow").load_value({self.path!r}, grid={list(self.grid)!r})'
        return f'__import__("nbflow").load_value({self.path!r})'


def is_secret_name(name: str) -> bool:
    """Whether a parameter name says it holds a secret (see SECRET_WORDS); `secrets:` declares others."""
    words = [w.lower() for w in _WORD.findall(name)]
    if not words:
        return False
    return words[-1] in SECRET_WORDS or tuple(words[-2:]) in SECRET_PAIRS


def is_secret_parameter(name: str, declared: "Iterable[str]" = ()) -> bool:
    """Whether an override's name (`NAME` or `STEP.NAME`, as `-p` and `parameters=` take them) is a secret:
    declared in `secrets:`, or named like one. The one rule every record of parameters (ledger, audit
    call, widget) goes by."""
    bare = name.rpartition(".")[2]
    return name in declared or bare in declared or is_secret_name(bare)


def secret_env_var(name: str) -> str:
    """The environment variable that carries secret parameter `name` to the kernel (and may supply it)."""
    return f"NBFLOW_SECRET_{name.upper()}"


def secret_from_environment(name: str) -> "CliValue | None":
    value = os.environ.get(secret_env_var(name))
    return None if value is None else CliValue(value)


_PLAIN = (str, int, float, bool, type(None))


def plain_value(value: Any) -> Any:
    """A value given from Python or YAML as a plain literal that can be injected as code.

    Paths become str, numpy scalars Python numbers (numpy arrays lists), dates
    and times ISO strings, tuples and sets keep their type; subclasses of the
    plain types (an IntEnum, a str subclass) become the plain type, so no
    custom `repr` is ever injected. Raises TypeError naming the type otherwise.
    """
    if isinstance(value, CliValue):
        return value
    if value is None or type(value) in _PLAIN:
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value) if isinstance(os.fspath(value), str) else os.fsdecode(value)
    if isinstance(value, (datetime.date, datetime.time)):  # datetime.datetime is a date
        return value.isoformat()
    numpy_item = getattr(value, "item", None)
    if type(value).__module__ == "numpy" and callable(numpy_item):
        converted = value.tolist() if hasattr(value, "tolist") else numpy_item()
        return plain_value(converted)
    for kind in (str, int, float):
        if isinstance(value, kind):
            return kind(value)
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [plain_value(v) for v in value]
        return items if isinstance(value, list) else tuple(items) if isinstance(value, tuple) else set(items)
    if isinstance(value, dict):
        return {plain_value(k): plain_value(v) for k, v in value.items()}
    raise TypeError(f"a {type(value).__module__}.{type(value).__qualname__} cannot be passed to a notebook; "
                    "give a str, int, float, bool, None, or a list, tuple or dict of those")


def parse_assignments(items: list[str] | tuple[str, ...]) -> dict[str, CliValue]:
    """['a=1', 'clean.b=x'] -> {'a': '1', 'clean.b': 'x'}. Raises ValueError naming the bad item.

    The name may be that of a grid's instance: `train[alpha=0.1].folds=3` sets `folds`.
    """
    result: dict[str, CliValue] = {}
    for item in items:
        name, value = split_assignment(item)
        if value is None or not name:
            raise ValueError(f"-p {item!r}: expected NAME=VALUE or STEP.NAME=VALUE")
        result[name] = CliValue(value)
    return result


def split_assignment(item: str) -> tuple[str, str | None]:
    """`-p`'s `[STEP.]NAME=VALUE` -> (name, value), value None without an `=`; a grid instance's name has `=`
    of its own (`train[alpha=0.1].folds=3`). The one split of an assignment: parsing and redacting agree."""
    start = item.find("]") + 1 if "[" in item.partition("=")[0] else 0  # past an instance name's own `=`
    name, sep, value = item[start:].partition("=")
    return (item[:start] + name).strip(), (value if sep else None)


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def coerce(value: Any, parameter: Parameter, *, secret: bool = False) -> Any:
    """Convert a command-line string to the type of the parameter's default.

    Python values (not CliValue) are returned as they are. Raises ValueError
    with the expected type (and, for a secret, without the value).
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
        got = "a value that is not one" if secret else repr(text)
        raise ValueError(f"expected {kind} like the default {parameter.source}, got {got}") from None
    # None default or an expression: a Python literal if it is one, else the text
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def jsonable(value: Any) -> Any:
    """A value as JSON can hold it: containers become lists and dicts, anything else its repr
    (a secret or a published value: the code that reads it, never the value)."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, ValueRef) and value.grid:  # the values of a gridded step: not one line per instance
        return f"__import__(\"nbflow\").load_value({value.path!r}, grid=<{len(value.grid)} instances>)"
    return repr(value)
