"""Scheduled runs: the crontab line that runs a pipeline, and installing it.

Owns: checking a cron expression (with the reason when it is unusable), the
next run times, the line itself (the absolute nbflow command, the caller's
PATH, so that kernels and the tools notebooks call are found under cron's
bare environment, and the log in `_nbflow/cron.log`), and adding it to the
user's crontab in place of the pipeline's earlier line. Returns data; the CLI
prints it. Must not run the pipeline.
"""

from __future__ import annotations

import datetime as dt
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import NbflowError, PipelineError

EXAMPLES = ('write 5 fields, minute hour day-of-month month day-of-week, e.g. "0 6 * * *" for 06:00 every day, '
            '"30 */2 * * 1-5" for every 2 hours on weekdays')


class BadCronExpression(PipelineError):
    """A cron expression nbflow cannot use; `.expression` and `.reason` say which and why."""

    def __init__(self, expression: str, reason: str, source: str):
        self.expression, self.reason, self.source = expression, reason, source
        super().__init__(f"{source}: {expression!r} is not a usable cron expression: {reason}; {EXAMPLES}")

    def __reduce__(self):
        return (type(self), (self.expression, self.reason, self.source))


@dataclass(frozen=True)
class Schedule:
    expression: str
    line: str  # the crontab line
    upcoming: tuple[dt.datetime, ...]  # the next three run times
    log: Path
    installed: bool = False
    warning: str | None = None  # e.g. no cron daemon runs, so the line will not fire

    def to_json(self) -> dict:
        return {"expression": self.expression, "line": self.line, "log": str(self.log),
                "next": [t.isoformat() for t in self.upcoming], "installed": self.installed, "warning": self.warning}


def next_times(expression: str, source: str, count: int = 3) -> tuple[str, tuple[dt.datetime, ...]]:
    """The expression with its spaces normalised and its next `count` times; raises BadCronExpression."""
    from croniter import croniter  # noqa: PLC0415

    expression = " ".join(expression.split())
    fields = len(expression.split())
    try:
        if not expression.startswith("@") and fields != 5:
            raise ValueError(f"cron needs exactly 5 fields, this has {fields}")
        times = croniter(expression, dt.datetime.now().astimezone())
        return expression, tuple(times.get_next(dt.datetime) for _ in range(count))
    except ValueError as e:  # croniter's errors are ValueErrors
        reason = "it never fires" if "failed to find next date" in str(e) else str(e)
        raise BadCronExpression(expression, reason, source) from None


def marker(root: Path) -> str:
    """The comment that ends this pipeline's crontab line, so that installing again replaces it."""
    return f"# nbflow schedule {root}"


def cron_line(expression: str, root: Path, log: Path) -> str:
    """The crontab line: in the pipeline's parent folder, with this PATH, the absolute nbflow command."""
    script = Path(sys.executable).parent / "nbflow"
    found = shutil.which("nbflow")
    if script.exists():
        command = shlex.quote(str(script))
    elif found:
        command = shlex.quote(os.path.abspath(found))
    else:
        command = f"{shlex.quote(sys.executable)} -m nbflow.cli"
    path = os.environ.get("PATH", os.defpath)
    line = (f"{expression} cd {shlex.quote(str(root.parent))} && PATH={shlex.quote(path)} {command} run "
            f"{shlex.quote(str(root))} >> {shlex.quote(str(log))} 2>&1 {marker(root)}")
    return line.replace("%", "\\%")  # cron turns a bare % in the command into a newline


def install(line: str, root: Path) -> None:
    """Put `line` into the user's crontab, replacing the pipeline's earlier line."""
    if shutil.which("crontab") is None:
        raise NbflowError("cannot install: there is no `crontab` program on this machine; install cron "
                          "(Debian/Ubuntu: apt-get install cron; Fedora/RHEL: dnf install cronie), or add this line "
                          f"to your scheduler yourself:\n{line}")
    current = subprocess.run(["crontab", "-l"], capture_output=True, text=True)
    if current.returncode != 0 and "no crontab" not in current.stderr.lower():
        raise NbflowError(f"cannot read your crontab (`crontab -l` said: {current.stderr.strip()}); "
                          f"add this line with `crontab -e`:\n{line}")
    end = marker(root).replace("%", "\\%")
    kept = [ln for ln in (current.stdout if current.returncode == 0 else "").splitlines()
            if not ln.rstrip().endswith(end)]
    written = subprocess.run(["crontab", "-"], input="\n".join(kept + [line]) + "\n", capture_output=True,
                             text=True)
    if written.returncode != 0:
        raise NbflowError(f"cannot write your crontab (`crontab -` said: {written.stderr.strip()}); "
                          f"add this line with `crontab -e`:\n{line}")


def no_cron_daemon() -> str | None:
    """A warning when, on Linux, no cron daemon runs: the line would then never fire."""
    if not sys.platform.startswith("linux"):
        return None  # macOS starts cron on demand
    import psutil  # noqa: PLC0415

    daemons = {"cron", "crond", "cronie", "fcron", "busybox crond"}
    if any((p.info.get("name") or "") in daemons for p in psutil.process_iter(["name"])):
        return None
    return ("warning: no cron daemon is running on this machine, so the line will not fire until one does; "
            "start it (e.g. `service cron start`) or enable it at boot")
