"""Command line: argument parsing only; calls the same API as Python users.

Exit codes: 0 every step succeeded or was fresh; 1 a step failed or the run
was cancelled; 2 the pipeline or the command is invalid.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import click

from .errors import CommandError, NbflowError, PipelineError

PIPELINE = click.argument("pipeline", type=click.Path(file_okay=False, path_type=Path))


def _fail(error: NbflowError, as_json: bool = False) -> None:
    click.echo(f"nbflow: invalid pipeline: {error}" if isinstance(error, PipelineError) else f"nbflow: {error}",
               err=True)
    if as_json:  # a tool reading stdout still gets one JSON object
        problems = [{"message": p.message, "file": p.file, "line": p.line, "step": p.step}
                    for p in getattr(error, "problems", [])]
        click.echo(json.dumps({"error": str(error), "exit_code": error.exit_code, "problems": problems}))
    sys.exit(error.exit_code)


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except NbflowError as e:
            _fail(e, as_json="--json" in sys.argv[1:])


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="nbflow")
def main() -> None:
    """Turn a folder of Jupyter notebooks into a pipeline."""


@main.command()
@PIPELINE
@click.argument("steps", nargs=-1)
@click.option("-p", "--parameter", "parameters", multiple=True, metavar="[STEP.]NAME=VALUE",
              help="Override a parameter (of every step that has it, or of STEP only).")
@click.option("--force", is_flag=True, help="Run every selected step, fresh or not.")
@click.option("-j", "--jobs", type=click.IntRange(min=1), help="Steps to run at once [default: CPU cores].")
@click.option("--executor", type=click.Choice(["local", "dask"]), help="Where steps run [default: local].")
@click.option("--dask-address", help="Scheduler address of a dask.distributed cluster.")
@click.option("--fail-fast", is_flag=True, help="Start no new step after a failure.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout and nothing else.")
def run(pipeline: Path, steps: tuple[str, ...], parameters: tuple[str, ...], force: bool, jobs: int | None,
        executor: str | None, dask_address: str | None, fail_fast: bool, as_json: bool) -> None:
    """Run PIPELINE (or STEPS and what they need); fresh steps are skipped."""
    from . import api  # noqa: PLC0415
    from .params import parse_assignments  # noqa: PLC0415

    try:
        overrides = parse_assignments(parameters)
    except ValueError as e:
        raise PipelineError(str(e)) from None
    listeners = [] if as_json else [_progress_listener()]
    handle = api.run(pipeline, steps, parameters=overrides, force=force, jobs=jobs, executor=executor,
                     dask_address=dask_address, fail_fast=fail_fast, background=True, listeners=listeners,
                     display=False)
    assert isinstance(handle, api.RunHandle)
    previous = signal.signal(signal.SIGTERM, lambda *_: handle.cancel())
    try:
        while not handle.done:
            try:
                handle.wait(timeout=0.2)
            except KeyboardInterrupt:
                handle.cancel()
    finally:
        signal.signal(signal.SIGTERM, previous)
    result = handle.wait()
    assert result is not None
    if as_json:
        click.echo(json.dumps(result.to_json()))
    sys.exit(0 if result.ok else 1)


def _progress_listener():
    if sys.stdout.isatty():
        try:
            from .ui.terminal import TerminalProgress  # noqa: PLC0415

            return TerminalProgress()
        except ImportError:
            pass
    from .ui.log import LogListener  # noqa: PLC0415

    return LogListener(sys.stdout)


@main.command()
@PIPELINE
@click.option("-p", "--parameter", "parameters", multiple=True, metavar="[STEP.]NAME=VALUE",
              help="Judge freshness as if run with these parameters.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def status(pipeline: Path, parameters: tuple[str, ...], as_json: bool) -> None:
    """Steps, their edges, and whether each is fresh or stale (and why)."""
    from .api import Pipeline  # noqa: PLC0415
    from .params import parse_assignments  # noqa: PLC0415

    try:
        overrides = parse_assignments(parameters)
    except ValueError as e:
        raise PipelineError(str(e)) from None
    states = Pipeline(pipeline).status(overrides)
    if as_json:
        click.echo(json.dumps({"steps": [s.to_json() for s in states]}))
        return
    width = max((len(s.name) for s in states), default=4)
    for s in states:
        after = f"  (after {', '.join(s.upstream)})" if s.upstream else ""
        reasons = "; ".join(s.reasons)
        if s.state == "fresh":
            reasons = ""
        click.echo(f"{s.name:<{width}}  {s.state:<10} {reasons}{after}".rstrip())


@main.command()
@PIPELINE
@click.option("-n", "--limit", type=click.IntRange(min=1), default=20, show_default=True, help="How many runs.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def history(pipeline: Path, limit: int, as_json: bool) -> None:
    """Past runs, newest first."""
    from .api import runs  # noqa: PLC0415

    rows = runs(pipeline, limit)
    if as_json:
        click.echo(json.dumps({"runs": rows}))
        return
    if not rows:
        click.echo("no runs yet")
        return
    for r in rows:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["started_at"]))
        counts = ", ".join(f"{n} {s}" for s, n in sorted(r["steps"].items()))
        dur = f"{r['duration_s']:.1f}s" if r["duration_s"] is not None else "-"
        click.echo(f"{r['run_id']}  {when}  {r['status']:<11} {dur:>7}  {counts}")


@main.command()
@PIPELINE
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def show(pipeline: Path, run_id: str, as_json: bool) -> None:
    """One run: its steps, timings, errors and files."""
    from .api import read_ledger  # noqa: PLC0415

    with read_ledger(pipeline) as ledger:
        ids = [r["run_id"] for r in ledger.runs()]
        if run_id == "latest" and ids:
            run_id = ids[0]
        matches = [i for i in ids if i.startswith(run_id)]
        if len(matches) != 1:
            from .errors import did_you_mean  # noqa: PLC0415

            raise CommandError(f"no run {run_id!r}{did_you_mean(run_id, ids)}; see `nbflow history {pipeline}`"
                                if not matches else f"{run_id!r} matches {len(matches)} runs; give more of the id")
        rows = ledger.step_runs(matches[0])
    if as_json:
        for r in rows:
            r.pop("error_traceback", None)
        click.echo(json.dumps({"run_id": matches[0], "steps": rows}))
        return
    click.echo(f"run {matches[0]}")
    for r in rows:
        dur = f"{r['duration_s']:.2f}s" if r["duration_s"] is not None else ""
        attempt = f" attempt {r['attempt']}" if r["attempt"] > 1 else ""
        click.echo(f"  {r['step']:<20} {r['status']:<10}{attempt} {dur:>8}  {r['notebook'] or ''}")
        if r["error_name"]:
            cell = f" (cell {r['error_cell']})" if r["error_cell"] else ""
            click.echo(f"      error: {r['error_name']}: {r['error_value']}{cell}")
        for f in r["files"]:
            click.echo(f"      {f['role']:<6} {f['path']}  sha256 {f['sha256'][:12]}")


@main.command()
@PIPELINE
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def lineage(pipeline: Path, path: Path, as_json: bool) -> None:
    """Which run and step made PATH, and from which inputs."""
    import os  # noqa: PLC0415

    from .api import read_ledger  # noqa: PLC0415
    from .state import sha256_file  # noqa: PLC0415

    with read_ledger(pipeline) as ledger:
        root = ledger.root
        rel = Path(os.path.relpath(path.absolute(), root)).as_posix()
        info = ledger.lineage(rel)
    if info is None:
        raise CommandError(f"{rel}: no successful run recorded this file as an output (source data, or never "
                           "made by a step of this pipeline)")
    current = sha256_file(root / rel) if (root / rel).exists() else None
    info["path"] = rel
    info["current_matches"] = current == info["sha256"]
    if as_json:
        click.echo(json.dumps(info))
        return
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["finished_at"]))
    click.echo(f"{rel}: made by step {info['step']!r} in run {info['run_id']} at {when}")
    click.echo("  file unchanged since" if info["current_matches"] else "  the file has CHANGED since (or is gone)")
    for i in info["inputs"]:
        click.echo(f"  from {i['path']}  sha256 {i['sha256'][:12]}")


@main.command()
@PIPELINE
@click.option("--keep", type=click.IntRange(min=1), default=10, show_default=True,
              help="How many recent runs to keep.")
def clean(pipeline: Path, keep: int) -> None:
    """Remove the executed notebooks of old runs (the ledger keeps their records)."""
    from .api import clean as clean_runs  # noqa: PLC0415

    done = clean_runs(pipeline, keep)
    click.echo(f"removed the notebooks of {len(done['removed'])} run(s), kept {len(done['kept'])}")


@main.command()
@PIPELINE
def repair(pipeline: Path) -> None:
    """Move a damaged run ledger aside; the next run starts a new one (every step runs once)."""
    from .api import repair as repair_ledger  # noqa: PLC0415

    done = repair_ledger(pipeline)
    if not done["moved"]:
        click.echo(f"{done['ledger']} is sound; nothing moved" if Path(done["ledger"]).exists()
                   else f"no run ledger in {Path(done['ledger']).parent}; nothing to repair")
        return
    click.echo(f"the run ledger was damaged ({done['damage']}); moved it aside to {done['moved'][0]}")
    click.echo("the next run starts a new ledger and runs every step once; the executed notebooks in "
               "_nbflow/runs/ are kept")


@main.command()
@PIPELINE
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="File to write: .svg, .png, .html or .mmd (mermaid).")
def plot(pipeline: Path, output: Path) -> None:
    """Draw the graph of PIPELINE's steps to a file."""
    from .graph import build_graph  # noqa: PLC0415
    from .ui import plot as plotting  # noqa: PLC0415

    if output.suffix.lower() not in plotting.SUFFIXES:
        raise click.BadParameter(f"{output}: cannot tell the format from {output.suffix or 'no suffix'!r}; end the "
                                 f"name with one of {', '.join(plotting.SUFFIXES)}", param_hint="'-o'")
    graph = build_graph(pipeline)
    plotting.write(graph, output)
    click.echo(f"wrote {output} ({len(graph.steps)} steps)")


@main.command()
@PIPELINE
@click.argument("run_id", required=False)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="HTML file to write, e.g. report.html.")
def report(pipeline: Path, run_id: str | None, output: Path) -> None:
    """Write one run (default: the latest) as a self-contained HTML page."""
    from .ui import report as reporting  # noqa: PLC0415

    _, chosen = reporting.write(pipeline, output, run_id)
    click.echo(f"wrote {output} (run {chosen})")


@main.command()
@PIPELINE
@click.option("--cron", "expression", metavar='"MIN HOUR DOM MON DOW"',
              help="When to run, as a cron expression [default: schedule: in nbflow.yaml].")
@click.option("--install", is_flag=True, help="Add the line to your crontab (replacing this pipeline's old line).")
def schedule(pipeline: Path, expression: str | None, install: bool) -> None:
    """Print (or --install) the crontab line that runs PIPELINE on a schedule."""
    import datetime as dt  # noqa: PLC0415

    from croniter import croniter  # noqa: PLC0415

    from .graph import STATE_DIR, build_graph  # noqa: PLC0415

    graph = build_graph(pipeline)
    source = "--cron"
    if expression is None:
        source = f"'schedule:' in {graph.root / 'nbflow.yaml'}"
        expression = graph.config.schedule
        if not expression:
            raise PipelineError(f'no schedule for {graph.root}: give one with --cron "0 6 * * *" or set '
                                f"`schedule: \"0 6 * * *\"` in {graph.root / 'nbflow.yaml'}")
    expression = " ".join(expression.split())
    fields = len(expression.split())
    try:
        if not expression.startswith("@") and fields != 5:
            raise ValueError(f"cron needs exactly 5 fields, this has {fields}")
        times = croniter(expression, dt.datetime.now().astimezone())
        upcoming = [times.get_next(dt.datetime) for _ in range(3)]
    except ValueError as e:  # croniter's errors are ValueErrors
        reason = "it never fires" if "failed to find next date" in str(e) else str(e)
        message = (f"{expression!r} is not a usable cron expression: {reason}; write 5 fields, minute hour "
                   'day-of-month month day-of-week, e.g. "0 6 * * *" for 06:00 every day, "30 */2 * * 1-5" for '
                   "every 2 hours on weekdays")
        if source == "--cron":
            raise click.BadParameter(message, param_hint="'--cron'") from None
        raise PipelineError(f"{source}: {message}") from None
    (graph.root / STATE_DIR).mkdir(exist_ok=True)  # the log's folder must exist before cron's first run
    line = _cron_line(expression, graph.root, graph.root / STATE_DIR / "cron.log")
    click.echo(line)
    click.echo("next runs:")
    for when in upcoming:
        click.echo(f"  {when:%Y-%m-%d %H:%M %a %Z}")
    if install:
        _install_cron_line(line, _cron_marker(graph.root))
        click.echo("installed in your crontab (see it with `crontab -l`)")
        warning = _no_cron_daemon()
        if warning:
            click.echo(warning, err=True)
    else:
        click.echo("add it with `crontab -e`, or run this command again with --install")


def _cron_marker(root: Path) -> str:
    return f"# nbflow schedule {root}"


def _cron_line(expression: str, root: Path, log: Path) -> str:
    import os  # noqa: PLC0415
    import shlex  # noqa: PLC0415
    import shutil  # noqa: PLC0415

    script = Path(sys.executable).parent / "nbflow"
    found = shutil.which("nbflow")
    if script.exists():
        command = shlex.quote(str(script))
    elif found:
        command = shlex.quote(os.path.abspath(found))
    else:
        command = f"{shlex.quote(sys.executable)} -m nbflow.cli"
    line = (f"{expression} cd {shlex.quote(str(root.parent))} && {command} run {shlex.quote(str(root))} "
            f">> {shlex.quote(str(log))} 2>&1 {_cron_marker(root)}")
    return line.replace("%", "\\%")  # cron turns a bare % in the command into a newline


def _install_cron_line(line: str, marker: str) -> None:
    import shutil  # noqa: PLC0415
    import subprocess  # noqa: PLC0415

    if shutil.which("crontab") is None:
        raise NbflowError("cannot install: there is no `crontab` program on this machine; install cron "
                          "(Debian/Ubuntu: apt-get install cron; Fedora/RHEL: dnf install cronie), or add the line "
                          "above to your scheduler yourself")
    current = subprocess.run(["crontab", "-l"], capture_output=True, text=True)
    if current.returncode != 0 and "no crontab" not in current.stderr.lower():
        raise NbflowError(f"cannot read your crontab (`crontab -l` said: {current.stderr.strip()}); "
                          "add the line above with `crontab -e`")
    kept = [ln for ln in (current.stdout if current.returncode == 0 else "").splitlines()
            if not ln.rstrip().endswith(marker.replace("%", "\\%"))]
    written = subprocess.run(["crontab", "-"], input="\n".join(kept + [line]) + "\n", capture_output=True,
                             text=True)
    if written.returncode != 0:
        raise NbflowError(f"cannot write your crontab (`crontab -` said: {written.stderr.strip()}); "
                          "add the line above with `crontab -e`")


def _no_cron_daemon() -> str | None:
    """A warning when, on Linux, no cron daemon runs: the line would then never fire."""
    if not sys.platform.startswith("linux"):
        return None  # macOS starts cron on demand
    import psutil  # noqa: PLC0415

    daemons = {"cron", "crond", "cronie", "fcron", "busybox crond"}
    if any((p.info.get("name") or "") in daemons for p in psutil.process_iter(["name"])):
        return None
    return ("warning: no cron daemon is running on this machine, so the line will not fire until one does; "
            "start it (e.g. `service cron start`) or enable it at boot")


if __name__ == "__main__":
    main()
