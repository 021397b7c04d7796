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


def _fail(error: NbflowError) -> None:
    click.echo(f"nbflow: {error}" if not isinstance(error, PipelineError) else f"nbflow: invalid pipeline: {error}",
               err=True)
    sys.exit(error.exit_code)


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except NbflowError as e:
            _fail(e)


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
@click.option("-n", "--limit", type=int, default=20, show_default=True, help="How many runs.")
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
    from .state import Ledger  # noqa: PLC0415

    ledger = Ledger(pipeline.absolute() / "_nbflow", create=False)
    try:
        ids = [r["run_id"] for r in ledger.runs()]
        if run_id == "latest" and ids:
            run_id = ids[0]
        matches = [i for i in ids if i.startswith(run_id)]
        if len(matches) != 1:
            from .errors import did_you_mean  # noqa: PLC0415

            raise PipelineError(f"no run {run_id!r}{did_you_mean(run_id, ids)}; see `nbflow history {pipeline}`"
                                if not matches else f"{run_id!r} matches {len(matches)} runs; give more of the id")
        rows = ledger.step_runs(matches[0])
    finally:
        ledger.close()
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

    from .state import Ledger, sha256_file  # noqa: PLC0415

    root = pipeline.absolute()
    rel = Path(os.path.relpath(path.absolute(), root)).as_posix()
    ledger = Ledger(root / "_nbflow", create=False)
    try:
        info = ledger.lineage(rel)
    finally:
        ledger.close()
    if info is None:
        raise PipelineError(f"{rel}: no successful run recorded this file as an output")
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
@click.option("--keep", type=int, default=10, show_default=True, help="How many recent runs to keep.")
def clean(pipeline: Path, keep: int) -> None:
    """Remove the executed notebooks of old runs (the ledger keeps their records)."""
    import shutil  # noqa: PLC0415

    from .state import RunLock, iter_runs_dir  # noqa: PLC0415

    state = pipeline.absolute() / "_nbflow"
    lock = RunLock(state)
    lock.acquire("clean")
    try:
        folders = list(iter_runs_dir(state))
        old = folders[: max(0, len(folders) - keep)]
        for folder in old:
            shutil.rmtree(folder)
    finally:
        lock.release()
    click.echo(f"removed {len(old)} run folder(s), kept {min(keep, len(folders))}")


if __name__ == "__main__":
    main()
