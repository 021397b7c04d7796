"""Who ran what, with what: the audit record of a run.

Owns: reading, once per run, the git commit of the pipeline folder (and
whether the tree is dirty, with the changed files), the user, the host,
Python, the versions of the packages the kernels import (a hash of the full
list and the key packages), and the command line or API call that started
the run. It reads; it never changes the repository. A folder outside git, or
no `git` program, gives `git: null`, not an error.
"""

from __future__ import annotations

import getpass
import hashlib
import os
import platform
import shlex
import socket
import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

# the packages whose versions are shown; every installed package counts in the hash
KEY_PACKAGES = ("nbflow", "pandas", "numpy", "pyarrow", "scikit-learn", "scipy", "matplotlib", "polars",
                "torch", "tensorflow", "ipykernel")
_MAX_CHANGED = 50
TRIGGER_ENV = "NBFLOW_TRIGGER"  # set by the scheduled command: the ledger records what started a run


def collect(root: Path, call: str, *, packages: dict[str, str] | None = None) -> dict[str, Any]:
    """The audit record of a run of the pipeline folder `root`, started by `call`."""
    packages = installed_packages() if packages is None else packages
    return {
        "git": git_state(root),
        "user": _user(),
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "executable": sys.executable,
        "packages": {"sha256": packages_digest(packages),
                     "key": {name: packages[name] for name in KEY_PACKAGES if name in packages}},
        "call": call,
        "trigger": os.environ.get(TRIGGER_ENV) or "manual",
    }


def git_state(folder: Path) -> dict[str, Any] | None:
    """{commit, dirty, changed: [paths relative to the repository]} of the repository holding `folder`."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=10,
                                  env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"})  # a read must not take git's lock
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return None
    status = git("status", "--porcelain", "--untracked-files=normal", "--", ".") or ""
    # `_nbflow/` is what nbflow writes; the README asks to ignore it, but an unignored one is not a code change
    changed = [line[3:] for line in status.splitlines() if line[3:] and "_nbflow/" not in line[3:]]
    return {"commit": commit.strip(), "dirty": bool(changed), "changed": changed[:_MAX_CHANGED],
            "changed_count": len(changed)}


@lru_cache(maxsize=1)
def _installed(site: tuple[str, ...]) -> dict[str, str]:
    from importlib import metadata  # noqa: PLC0415

    found: dict[str, str] = {}
    for dist in metadata.distributions(path=list(site)):
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if name and name not in found:
            found[name] = dist.version
    return dict(sorted(found.items()))


def installed_packages() -> dict[str, str]:
    """name -> version of every package this interpreter (the `python3` kernel's) can import."""
    return _installed(tuple(p for p in sys.path if p))


def packages_digest(packages: dict[str, str]) -> str:
    return hashlib.sha256("".join(f"{n}=={v}\n" for n, v in sorted(packages.items())).encode()).hexdigest()


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid()) if hasattr(os, "getuid") else "unknown"


def command_line(secrets: Iterable[str] = ()) -> str:
    """How this process was started, as the user typed it (`nbflow run notebooks -p x=1`), with the value of
    every secret parameter (named like one, or in `secrets`) given with `-p`/`--parameter` replaced by ***."""
    from .params import is_secret_parameter, split_assignment  # noqa: PLC0415
    from .state import REDACTED  # noqa: PLC0415

    def redacted(assignment: str) -> str:
        name, value = split_assignment(assignment)
        return f"{name}={REDACTED}" if value is not None and is_secret_parameter(name, secrets) else assignment

    args = [Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"]
    given = iter(sys.argv[1:])
    for arg in given:
        if arg in ("-p", "--parameter"):
            args += [arg, *(redacted(value) for value in [next(given, None)] if value is not None)]
        elif arg.startswith("--parameter="):
            args.append("--parameter=" + redacted(arg.removeprefix("--parameter=")))
        elif arg.startswith("-p") and not arg.startswith("--"):
            args.append("-p" + redacted(arg[2:]))
        else:
            args.append(arg)
    return shlex.join(args)
