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

from .errors import NbflowError, PipelineError

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
@click.option("--force", is_flag=True,
              help="Run fresh steps too: the named STEPS (what they need only if stale), or every step if none.")
@click.option("--force-upstream", is_flag=True, help="With --force and STEPS: force what they need too.")
@click.option("--only", is_flag=True, help="Run just the named STEPS, not what they need (it must exist).")
@click.option("-j", "--jobs", type=click.IntRange(min=1), help="Steps to run at once [default: CPU cores].")
@click.option("--executor", type=click.Choice(["local", "dask"]), help="Where steps run [default: local].")
@click.option("--dask-address", help="Scheduler address of a dask.distributed cluster.")
@click.option("--fail-fast", is_flag=True, help="Start no new step after a failure.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout and nothing else.")
@click.option("--watch", is_flag=True, help="Then keep watching: rerun what goes stale whenever a notebook, a "
                                            "declared input or an imported module changes on disk (Ctrl-C stops).")
def run(pipeline: Path, steps: tuple[str, ...], parameters: tuple[str, ...], force: bool, force_upstream: bool,
        only: bool, jobs: int | None, executor: str | None, dask_address: str | None, fail_fast: bool,
        as_json: bool, watch: bool) -> None:
    """Run PIPELINE (or STEPS and what they need); fresh steps are skipped."""
    from . import api  # noqa: PLC0415
    from .audit import command_line  # noqa: PLC0415
    from .params import parse_assignments  # noqa: PLC0415

    try:
        overrides = parse_assignments(parameters)
    except ValueError as e:
        raise PipelineError(str(e)) from None
    if only and not steps:
        raise click.UsageError("--only needs the STEPS to run")
    if watch:
        if as_json or force or force_upstream:
            raise click.UsageError("--watch reruns what goes stale after each change; it takes neither --json nor "
                                   "--force (run `nbflow run PIPELINE --force` once, then watch)")
        _watch(pipeline, steps, overrides, only=only, jobs=jobs, executor=executor, dask_address=dask_address,
               fail_fast=fail_fast)
        return
    listeners = [] if as_json else [_progress_listener()]
    handle = api.run(pipeline, steps, parameters=overrides, force=force, force_upstream=force_upstream, only=only,
                     jobs=jobs, executor=executor, call=command_line,  # told the declared secrets, it redacts them
                     dask_address=dask_address, fail_fast=fail_fast, background=True, listeners=listeners,
                     display=False)
    assert isinstance(handle, api.RunHandle)
    _wait_in_foreground(handle, handle.cancel)
    result = handle.wait()
    assert result is not None
    if as_json:
        click.echo(json.dumps(result.to_json()))
    sys.exit(0 if result.ok else 1)


def _wait_in_foreground(handle: Any, stop: Any) -> None:
    """Wait for a run or a watch going on in its thread; Ctrl-C and SIGTERM `stop` it, cleanly."""
    previous = signal.signal(signal.SIGTERM, lambda *_: stop())
    try:
        while not handle.done:
            try:
                handle.wait(timeout=0.2)
            except KeyboardInterrupt:
                stop()
    finally:
        signal.signal(signal.SIGTERM, previous)


def _watch(pipeline: Path, steps: tuple[str, ...], overrides: dict[str, Any], **options: Any) -> None:
    """`nbflow run --watch`: cycles until Ctrl-C or SIGTERM, which end the watch cleanly (exit 0)."""
    from . import api  # noqa: PLC0415
    from .audit import command_line  # noqa: PLC0415

    handle = api.watch(pipeline, steps, parameters=overrides, listeners=[_progress_listener(watch=True)],
                       display=False, call=command_line, **options)
    _wait_in_foreground(handle, handle.stop)
    try:
        handle.wait()
    except NbflowError:
        raise
    except Exception as e:  # noqa: BLE001 - the watch's own failure (it cannot follow the files): exit 1
        raise NbflowError(f"the watch ended: {e}") from None
    sys.exit(0)


def _progress_listener(watch: bool = False):
    if sys.stdout.isatty():
        try:
            from .ui.terminal import TerminalProgress, WatchProgress  # noqa: PLC0415

            return WatchProgress() if watch else TerminalProgress()
        except ImportError:
            pass
    from .ui.log import LogListener, WatchLog  # noqa: PLC0415

    return WatchLog(sys.stdout) if watch else LogListener(sys.stdout)


@main.command()
@PIPELINE
@click.option("-p", "--parameter", "parameters", multiple=True, metavar="[STEP.]NAME=VALUE",
              help="Judge freshness as if run with these parameters.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def status(pipeline: Path, parameters: tuple[str, ...], as_json: bool) -> None:
    """Steps, their edges, and whether each is fresh or stale (and why).

    Also the outputs of grid instances that are no longer in the grid (left behind, never deleted silently).
    """
    from .api import Pipeline  # noqa: PLC0415
    from .grid import folded  # noqa: PLC0415
    from .params import parse_assignments  # noqa: PLC0415

    try:
        overrides = parse_assignments(parameters)
    except ValueError as e:
        raise PipelineError(str(e)) from None
    view = Pipeline(pipeline)
    states = view.status(overrides)
    code = view.code_change()
    left = view.left_behind()
    if as_json:
        click.echo(json.dumps({"steps": [s.to_json() for s in states], "code": code, "left_behind": left}))
        return
    if code and code["differs"]:
        click.echo(f"code differs from the last run's commit ({code['last_run_commit'][:10]} in run "
                   f"{code['last_run_id']}; now {code['commit'][:10]}{', with changes' if code['dirty'] else ''})")
    width = max((len(s.name) for s in states), default=4)
    for s in states:
        after = f"  (after {', '.join(folded(s.upstream))})" if s.upstream else ""
        reasons = "; ".join(s.reasons)
        if s.state == "fresh":
            reasons = ""
        click.echo(f"{s.name:<{width}}  {s.state:<10} {reasons}{after}".rstrip())
    if left:
        click.echo(f"left behind ({len(left)}; kept until `nbflow clean {pipeline} --left-behind` removes them):")
        for item in left:
            click.echo(f"  {item['path']}  ({item['why']})")


@main.command()
@PIPELINE
@click.option("-n", "--limit", type=click.IntRange(min=1), default=20, show_default=True, help="How many runs.")
@click.option("-a", "--all", "show_all", is_flag=True, help="Also the runs where nothing ran (every step fresh).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def history(pipeline: Path, limit: int, show_all: bool, as_json: bool) -> None:
    """Past runs, newest first, with the parameters they were given."""
    from .api import is_idle, runs  # noqa: PLC0415

    every = runs(pipeline, limit, idle=True)
    shown = every if show_all else runs(pipeline, limit, idle=False)
    folded = 0 if show_all else sum(is_idle(r) for r in every)
    if as_json:
        click.echo(json.dumps({"runs": shown, "folded": folded}))
        return
    if not every:
        click.echo("no runs yet")
        return
    for r in shown:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["started_at"]))
        counts = ", ".join(f"{n} {s}" for s, n in sorted(r["steps"].items()))
        params = "  " + " ".join(f"{k}={v}" for k, v in r["parameters"].items()) if r["parameters"] else ""
        click.echo(f"{r['run_id']}  {when}  {r['status']:<11} {_duration(r['duration_s']):>9}  {counts}{params}")
    if folded:
        click.echo(f"(and {folded} run(s) where every step was fresh among the last {len(every)}; --all shows them)")


@main.command()
@PIPELINE
@click.argument("run_id", default="latest")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def show(pipeline: Path, run_id: str, as_json: bool) -> None:
    """One run (default: the latest): its steps, parameters, timings, errors and files."""
    from .api import show as show_run  # noqa: PLC0415

    run = show_run(pipeline, run_id)
    if as_json:
        for r in run["steps"]:
            r.pop("error_traceback", None)
        click.echo(json.dumps(run))
        return
    overrides = " ".join(f"{k}={v}" for k, v in run["parameters"].items())
    click.echo(f"run {run['run_id']}: {run['status']}" + (f"  (-p {overrides})" if overrides else ""))
    for line in _audit_lines(run.get("audit")):
        click.echo(f"  {line}")
    width = max((len(r["step"]) for r in run["steps"]), default=0)  # a grid instance's name is long
    for r in run["steps"]:
        attempt = f" attempt {r['attempt']}" if r["attempt"] > 1 else ""
        click.echo(f"  {r['step']:<{width}}  {r['status']:<10}{attempt} {_duration(r['duration_s']):>9}  "
                   f"{r['notebook'] or ''}")
        if r["parameters"]:
            click.echo("      parameters: " + ", ".join(f"{k}={v!r}" for k, v in r["parameters"].items()))
        if r["error_name"]:
            cell = f" ({r['error_where']})" if r["error_where"] and r["error_where"] not in r["error_value"] else ""
            click.echo(f"      error: {r['error_name']}: {r['error_value']}{cell}")
        for f in r["files"]:
            click.echo(f"      {f['role']:<6} {f['path']}  sha256 {f['sha256'][:12]}")


def _audit_lines(audit: dict[str, Any] | None) -> list[str]:
    if not audit:
        return []
    git = audit.get("git")
    code = "not in a git repository"
    if git:
        code = f"commit {git['commit'][:10]}" + (f", with {git['changed_count']} changed file(s): "
                                                 f"{', '.join(git['changed'][:5])}" if git["dirty"] else "")
    packages = audit.get("packages") or {}
    key = ", ".join(f"{n} {v}" for n, v in (packages.get("key") or {}).items())
    return [f"by {audit.get('user')} on {audit.get('host')}, Python {audit.get('python')}; {code}",
            f"started by: {audit.get('call')}"] + ([f"packages: {key} (all: sha256 {packages['sha256'][:12]})"]
                                                   if key else [])


def _duration(seconds: float | None) -> str:
    from .ui.view import format_duration  # noqa: PLC0415

    return format_duration(seconds)


@main.command()
@PIPELINE
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def lineage(pipeline: Path, path: Path, as_json: bool) -> None:
    """Which run and step made PATH, with which parameters, from what: back to the source data."""
    from .api import lineage as find_lineage  # noqa: PLC0415

    info = find_lineage(pipeline, path)
    if as_json:
        click.echo(json.dumps(info))
        return
    click.echo(f"{info['path']}: " + ("unchanged since it was made" if info["current_matches"]
                                      else "CHANGED since it was made (or gone)"))
    _print_made(info, indent="  ")


def _print_made(info: dict[str, Any], indent: str) -> None:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["finished_at"]))
    params = " with " + ", ".join(f"{k}={v!r}" for k, v in info["parameters"].items()) if info["parameters"] else ""
    click.echo(f"{indent}made by step {info['step']!r} in run {info['run_id']} at {when}{params}")
    for item in info["inputs"]:
        source = "" if item["made_by"] else "  (source data)"
        click.echo(f"{indent}  from {item['path']}  sha256 {item['sha256'][:12]}{source}")
        if item["made_by"]:
            _print_made(item["made_by"], indent + "    ")


@main.command()
@PIPELINE
@click.option("--keep", type=click.IntRange(min=1), help="How many recent runs to keep [default: 10].")
@click.option("--left-behind", is_flag=True,
              help="Instead, remove the outputs that `nbflow status` lists as left behind: those of grid instances "
                   "no longer in the grid (and a gridded notebook's own output path, written by a run by hand). "
                   "Nothing else, unless --keep is given too.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def clean(pipeline: Path, keep: int | None, left_behind: bool, as_json: bool) -> None:
    """Remove the executed notebooks of old runs (the ledger keeps their records), or with --left-behind the
    outputs that grid instances no longer in the grid left behind."""
    from .api import clean as clean_runs  # noqa: PLC0415

    done: dict[str, Any] = {}
    if left_behind:
        done.update(clean_runs(pipeline, left_behind=True))
    if keep is not None or not left_behind:
        done.update(clean_runs(pipeline, keep or 10))
    if as_json:
        click.echo(json.dumps(done))
        return
    if left_behind:
        click.echo(f"removed {len(done['left_behind'])} left-behind output(s)" + (":" if done["left_behind"] else ""))
        for item in done["left_behind"]:
            click.echo(f"  {item['path']}  ({item['why']})")
    if "removed" in done:
        click.echo(f"removed the notebooks of {len(done['removed'])} run(s), kept {len(done['kept'])}")


@main.command()
@PIPELINE
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def repair(pipeline: Path, as_json: bool) -> None:
    """Move a damaged run ledger aside; the next run starts a new one (every step runs once)."""
    from .api import repair as repair_ledger  # noqa: PLC0415

    done = repair_ledger(pipeline)
    if as_json:
        click.echo(json.dumps(done))
        return
    if not done["moved"]:
        click.echo(f"{done['ledger']} is sound; nothing moved" if Path(done["ledger"]).exists()
                   else f"no run ledger in {Path(done['ledger']).parent}; nothing to repair")
        return
    click.echo(f"the run ledger was damaged ({done['damage']}); moved it aside to {done['moved'][0]}")
    click.echo("the next run starts a new ledger and runs every step once; the executed notebooks in "
               "_nbflow/runs/ are kept")


@main.group("import")
def import_() -> None:
    """Convert a pipeline written for another tool into an nbflow pipeline folder."""


@import_.command("ploomber")
@click.argument("pipeline_yaml", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", type=click.Path(file_okay=False, path_type=Path),
              help="New (or empty) folder to write [default: <project>-nbflow beside the project].")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def import_ploomber(pipeline_yaml: Path, out: Path | None, as_json: bool) -> None:
    """Convert the Ploomber project of PIPELINE_YAML (or its folder); the project is not modified."""
    from .migrate import import_ploomber as convert  # noqa: PLC0415

    done = convert(pipeline_yaml, out)
    if as_json:
        click.echo(json.dumps(done.to_json()))
        return
    click.echo(f"converted {len(done.steps)} Ploomber task(s) of {pipeline_yaml} into {done.out}/")
    width = max((len(s.name) for s in done.steps), default=4)
    for s in done.steps:
        grid = f"  (grid: {', '.join(s.grid)})" if s.grid else ""
        click.echo(f"  {s.name:<{width}}  {s.source} -> {s.notebook}{grid}")
    if done.copied:
        click.echo(f"copied {len(done.copied)} other file(s) of the project (data, modules) to the same places")
    if done.config:
        click.echo(f"wrote {done.config}")
    if done.notes:
        click.echo("notes:")
        for note in done.notes:
            click.echo(f"  - {note}")
    if done.unconverted:
        click.echo(f"could not convert ({len(done.unconverted)}); see to these by hand:")
        for issue in done.unconverted:
            click.echo(f"  - {issue}")
    else:
        click.echo("everything was converted")
    click.echo(f"next: nbflow status {done.out}   then   nbflow run {done.out}")


@main.command()
@PIPELINE
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="File to write: .svg, .png, .html or .mmd (mermaid).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def plot(pipeline: Path, output: Path, as_json: bool) -> None:
    """Draw the graph of PIPELINE's steps to a file."""
    from .graph import build_graph  # noqa: PLC0415
    from .ui import plot as plotting  # noqa: PLC0415

    if output.suffix.lower() not in plotting.SUFFIXES:
        raise click.BadParameter(f"{output}: cannot tell the format from {output.suffix or 'no suffix'!r}; end the "
                                 f"name with one of {', '.join(plotting.SUFFIXES)}", param_hint="'-o'")
    graph = build_graph(pipeline)
    plotting.write(graph, output)
    if as_json:
        click.echo(json.dumps({"output": str(output), "steps": len(graph.steps)}))
        return
    click.echo(f"wrote {output} ({len(graph.steps)} steps)")


@main.command()
@PIPELINE
@click.argument("run_id", required=False)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="HTML file to write, e.g. report.html.")
@click.option("--outputs", type=click.Choice(["summary", "all", "none"]), default="summary", show_default=True,
              help="Outputs of each notebook to show: summary (figures, the last table, printed lines that look "
                   "like metrics), all, or none.")
@click.option("--inputs", is_flag=True, help="Show the code of the cells whose outputs are shown.")
@click.option("--notebooks-html", is_flag=True,
              help="Also export each executed notebook to HTML (nbconvert; pip install \"nbflow[html]\") into "
                   "<report>_notebooks/ beside the report, linked from it.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def report(pipeline: Path, run_id: str | None, output: Path, outputs: str, inputs: bool,
           notebooks_html: bool, as_json: bool) -> None:
    """Write one run (default: the latest) as a self-contained HTML page."""
    from .ui import report as reporting  # noqa: PLC0415

    written, chosen = reporting.write(pipeline, output, run_id, outputs=outputs, inputs=inputs,
                                      notebooks_html=notebooks_html)
    size = written.stat().st_size
    if as_json:
        click.echo(json.dumps({"output": str(written), "run_id": chosen, "bytes": size,
                               "notebooks_html": str(reporting.notebooks_dir(output)) if notebooks_html else None}))
        return
    also = f"; notebooks as HTML in {reporting.notebooks_dir(output)}" if notebooks_html else ""
    click.echo(f"wrote {output} (run {chosen}, {size / 1024:.0f} KB{also})")


@main.command()
@PIPELINE
@click.option("--cron", "expression", metavar='"MIN HOUR DOM MON DOW"',
              help="When to run, as a cron expression [default: schedule: in nbflow.yaml].")
@click.option("--install", is_flag=True,
              help="Add the line to your crontab (replacing this pipeline's old line), or with --systemd write and "
                   "enable the units.")
@click.option("--systemd", is_flag=True, help="A systemd timer and service (user units) instead of a crontab line.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def schedule(pipeline: Path, expression: str | None, install: bool, systemd: bool, as_json: bool) -> None:
    """Print (or --install) what runs PIPELINE on a schedule: a crontab line or systemd units.

    A scheduled run that finds the previous one still running does not start; the ledger records the tick as
    `skipped` (see `nbflow history --all`).
    """
    from .api import schedule as make_schedule  # noqa: PLC0415
    from .scheduling import EXAMPLES, BadCronExpression  # noqa: PLC0415

    try:
        planned = make_schedule(pipeline, expression, install=install, systemd=systemd)
    except BadCronExpression as e:
        if e.source != "--cron":
            raise
        raise click.BadParameter(f"{e.expression!r} is not a usable cron expression: {e.reason}; {EXAMPLES}",
                                 param_hint="'--cron'") from None
    if as_json:
        click.echo(json.dumps(planned.to_json()))
        return
    if planned.units:
        for name, text in planned.units.items():
            click.echo(f"# {name}\n{text}")
    else:
        click.echo(planned.line)
    click.echo("next runs:")
    for when in planned.upcoming:
        click.echo(f"  {when:%Y-%m-%d %H:%M %a %Z}")
    if install and planned.units:
        click.echo("installed the units in ~/.config/systemd/user/ and enabled the timer")
    elif install:
        click.echo("installed in your crontab (see it with `crontab -l`)")
        if planned.warning:
            click.echo(planned.warning, err=True)
    elif planned.units:
        click.echo("save them in ~/.config/systemd/user/ and `systemctl --user enable --now` the timer, or run "
                   "this command again with --install")
    else:
        click.echo("add it with `crontab -e`, or run this command again with --install")


if __name__ == "__main__":
    main()
