"""Scheduled runs: the crontab line that runs a pipeline, and installing it.

Owns: checking a cron expression (with the reason when it is unusable), the
next run times, the command a scheduler runs (the absolute nbflow command,
the caller's PATH, so that kernels and the tools notebooks call are found
under cron's bare environment, NBFLOW_TRIGGER=schedule so that the ledger
records the trigger and a tick that finds a run in progress, and the log in
`_nbflow/cron.log`), the crontab line and its installation in place of the
pipeline's earlier line, and the systemd timer and service units for machines
without cron. Returns data; the CLI prints it. Must not run the pipeline.
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
    units: dict[str, str] | None = None  # --systemd: the unit files' names and texts

    def to_json(self) -> dict:
        return {"expression": self.expression, "line": self.line, "units": self.units, "log": str(self.log),
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


def command(root: Path, log: Path) -> str:
    """The shell command a scheduler runs: in the pipeline's parent folder, with this PATH, the absolute nbflow."""
    script = Path(sys.executable).parent / "nbflow"
    found = shutil.which("nbflow")
    if script.exists():
        program = shlex.quote(str(script))
    elif found:
        program = shlex.quote(os.path.abspath(found))
    else:
        program = f"{shlex.quote(sys.executable)} -m nbflow.cli"
    path = os.environ.get("PATH", os.defpath)
    return (f"cd {shlex.quote(str(root.parent))} && PATH={shlex.quote(path)} NBFLOW_TRIGGER=schedule {program} run "
            f"{shlex.quote(str(root))} >> {shlex.quote(str(log))} 2>&1")


def cron_line(expression: str, root: Path, log: Path) -> str:
    """The crontab line; it ends with the pipeline's marker comment."""
    line = f"{expression} {command(root, log)} {marker(root)}"
    return line.replace("%", "\\%")  # cron turns a bare % in the command into a newline


_DAYS = ("Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat")
_ALIASES = {"@hourly": "0 * * * *", "@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@weekly": "0 0 * * 0",
            "@monthly": "0 0 1 * *", "@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *"}


def on_calendar(expression: str) -> str:
    """A cron expression as systemd's OnCalendar= (e.g. "30 */2 * * 1-5" -> "Mon..Fri *-*-* 00/2:30:00")."""
    fields = _ALIASES.get(expression, expression).split()
    if len(fields) != 5:
        raise BadCronExpression(expression, "systemd timers need the 5 cron fields (or @daily and the like)",
                                "--systemd")
    minute, hour, day, month, weekday = fields
    if day != "*" and weekday != "*":
        raise BadCronExpression(expression, "cron runs when the day of month OR the weekday matches; a systemd "
                                "timer needs both: give one of the two as *", "--systemd")

    def field(text: str, start: int) -> str:
        parts = []
        for part in text.split(","):
            if part == "*":
                parts.append("*")
                continue
            base, _, step = part.partition("/")
            base = f"{start}" if base == "*" else base
            first, _, last = base.partition("-")
            value = f"{int(first):02d}" + (f"..{int(last):02d}" if last else "")
            parts.append(value + (f"/{int(step)}" if step else ""))
        return ",".join(parts)

    def days(text: str) -> str:
        names = []
        for part in text.split(","):
            first, _, last = part.partition("-")
            names.append(_DAYS[int(first) % 7] + (f"..{_DAYS[int(last) % 7]}" if last else ""))
        return ",".join(names) + " "

    try:
        weekdays = "" if weekday == "*" else days(weekday)
        return f"{weekdays}*-{field(month, 1)}-{field(day, 1)} {field(hour, 0)}:{field(minute, 0)}:00"
    except ValueError:
        raise BadCronExpression(expression, "nbflow converts numbers, lists, ranges and steps to systemd; write "
                                "names as numbers", "--systemd") from None


def systemd_units(expression: str, root: Path, log: Path) -> dict[str, str]:
    """The user units that run the pipeline on schedule: {file name: text} for a .service and a .timer."""
    name = unit_name(root)
    service = (f"[Unit]\nDescription=nbflow pipeline {root}\n\n[Service]\nType=oneshot\n"
               f"ExecStart=/bin/sh -c {shlex.quote(command(root, log))}\n")
    timer = (f"[Unit]\nDescription=Run the nbflow pipeline {root} on schedule ({expression})\n\n[Timer]\n"
             f"OnCalendar={on_calendar(expression)}\nPersistent=true\n\n[Install]\nWantedBy=timers.target\n")
    return {f"{name}.service": service, f"{name}.timer": timer}


def unit_name(root: Path) -> str:
    """nbflow-<folder>-<hash of its path>: one unit pair per pipeline folder."""
    import hashlib  # noqa: PLC0415
    import re  # noqa: PLC0415

    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", root.name).strip("-") or "pipeline"
    return f"nbflow-{slug}-{hashlib.sha256(str(root).encode()).hexdigest()[:8]}"


def install_systemd(units: dict[str, str]) -> Path:
    """Write the units into ~/.config/systemd/user/ and enable the timer (when systemctl can)."""
    folder = Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "systemd" / "user"
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in units.items():
        (folder / name).write_text(text)
    timer = next(name for name in units if name.endswith(".timer"))
    if shutil.which("systemctl") is None:
        raise NbflowError(f"wrote the units into {folder}, but there is no `systemctl` here to enable them; on a "
                          f"machine with systemd run: systemctl --user enable --now {timer}")
    for args in (["daemon-reload"], ["enable", "--now", timer]):
        done = subprocess.run(["systemctl", "--user", *args], capture_output=True, text=True)
        if done.returncode != 0:
            raise NbflowError(f"wrote the units into {folder}, but `systemctl --user {' '.join(args)}` said: "
                              f"{done.stderr.strip()}; run it yourself once a user session bus is available")
    return folder


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
