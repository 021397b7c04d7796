"""One run as a self-contained HTML page, from the ledger.

Owns: choosing the run (the latest, or one named by a unique prefix of its
id), and the page: the run's header (id, status, times, parameters as the
ledger stored them, secrets already redacted), the graph coloured by the
run's statuses, one row per step (status, attempts, duration, error and its
cell, the executed notebook linked relative to the report), and the files
each step read and wrote with their sha256. Reads `_nbflow/history.sqlite`;
runs nothing. No script, no stylesheet or font fetched: the page opens offline.
"""

from __future__ import annotations

import html
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import NbflowError, PipelineError, Problem, did_you_mean
from ..events import StepError
from ..graph import STATE_DIR, build_graph
from . import plot
from .view import format_duration

__all__ = ["write", "render", "resolve_run_id"]

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


@dataclass(frozen=True)
class _StepView:
    """What the graph needs of a step of a recorded run (the plot reads `.status`, `.error` ...)."""

    name: str
    status: str
    attempts: int
    duration_s: float | None
    error: StepError | None


@dataclass(frozen=True)
class _RunView:
    steps: dict[str, _StepView]


def resolve_run_id(runs: list[dict[str, Any]], wanted: str | None, root: Path) -> dict[str, Any]:
    """The run named by `wanted` (a unique prefix of its id, or "latest"/None for the newest)."""
    if not runs:
        raise PipelineError(Problem(f"no runs recorded yet in {STATE_DIR}/history.sqlite; run "
                                    f"`nbflow run {root}` first", file=str(root)))
    if wanted in (None, "", "latest"):
        return runs[0]
    matches = [r for r in runs if r["run_id"].startswith(wanted)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        ids = [r["run_id"] for r in runs]
        raise PipelineError(Problem(f"no run {wanted!r}{did_you_mean(wanted, ids)}; see `nbflow history {root}` "
                                    "for the run ids", file=str(root)))
    raise PipelineError(Problem(f"{wanted!r} matches {len(matches)} runs; give more of the id", file=str(root)))


def write(pipeline: str | os.PathLike, path: str | os.PathLike, run_id: str | None = None) -> tuple[Path, str]:
    """Write the report of `run_id` (default: the latest run) to `path`; returns (path, run id)."""
    from ..state import Ledger  # noqa: PLC0415

    root = Path(pipeline).absolute()
    if not root.is_dir():
        raise PipelineError(Problem("pipeline folder does not exist or is not a folder", file=str(root)))
    out = Path(path).absolute()
    if out.suffix.lower() not in (".html", ".htm"):
        raise PipelineError(Problem("the report is an HTML page: name it with .html (for example report.html)",
                                    file=str(path)))
    ledger = Ledger(root / STATE_DIR, create=False)
    try:
        run = resolve_run_id(ledger.runs(), run_id, root)
        step_rows = ledger.step_runs(run["run_id"])
    finally:
        ledger.close()
    text = render(root, run, step_rows, out.parent)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
    except OSError as e:
        raise NbflowError(f"{path}: cannot write the report: {e.strerror}; choose a writable path with -o") from None
    return out, run["run_id"]


def render(root: Path, run: dict[str, Any], step_rows: list[dict[str, Any]], report_dir: Path) -> str:
    """The HTML page of one run. `report_dir` is where it will be saved (links are relative to it)."""
    steps = _last_attempts(step_rows)
    view = _RunView({name: _StepView(name, _plot_status(r["status"]), r["attempt"], r["duration_s"], _error(r))
                     for name, r in steps.items()})
    graph_html = _graph_html(root, view, steps)
    body = [
        _header(root, run, steps),
        '<h2>Graph</h2>', graph_html,
        '<h2>Steps</h2>', _steps_table(root, steps, report_dir),
        '<h2>Files</h2>', _files_table(steps),
    ]
    title = f"nbflow run {run['run_id']} ({run['status']}): {root.name}"
    return _page(title, "\n".join(body))


def _last_attempts(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """One row per step: its last attempt, with `attempts` and the last error of any attempt."""
    steps: dict[str, dict[str, Any]] = {}
    for row in rows:  # ordered by id: attempts in order
        previous = steps.get(row["step"])
        merged = dict(row)
        if previous is not None and row["error_name"] is None and previous["error_name"] is not None \
                and row["status"] != "succeeded":
            for key in ("error_kind", "error_name", "error_value", "error_cell", "error_traceback"):
                merged[key] = previous[key]
        merged["earlier_errors"] = (previous["earlier_errors"] if previous else []) + (
            [previous] if previous is not None and previous["error_name"] else [])
        steps[row["step"]] = merged
    return steps


def _plot_status(status: str) -> str:
    return {"interrupted": "cancelled"}.get(status, status)


def _error(row: dict[str, Any]) -> StepError | None:
    if not row["error_name"]:
        return None
    return StepError(row["error_kind"] or "exception", row["error_name"], row["error_value"] or "",
                     row["error_cell"], None, row["error_traceback"] or "")


def _graph_html(root: Path, view: _RunView, steps: dict[str, dict[str, Any]]) -> str:
    try:
        graph = build_graph(root)
    except PipelineError as e:
        return (f'<p class="muted">The graph cannot be drawn: the pipeline is invalid now '
                f"({html.escape(str(e))}).</p>")
    changed = sorted(set(steps) - set(graph.steps))
    note = (f'<p class="muted">Steps of this run that are no longer in the pipeline: '
            f'{html.escape(", ".join(changed))}.</p>') if changed else ""
    links = {name: f"#step-{_anchor(name)}" for name in steps if name in graph.steps}
    return plot.html(graph, view, links) + note


def _anchor(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "-", name)


def _when(ts: float | None) -> str:
    if ts is None:
        return "–"
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(ts))


def _duration(s: float | None) -> str:
    return format_duration(s) or "–"


def _badge(status: str) -> str:
    style = plot.STATUS_STYLES.get(_plot_status(status), plot.STATUS_STYLES["pending"])
    dash = "dashed" if style.dash else "solid"
    return (f'<span class="badge" style="background:{style.fill};border:1px {dash} {style.stroke};'
            f'color:{style.text}">{html.escape(status.replace("_", " "))}</span>')


def _header(root: Path, run: dict[str, Any], steps: dict[str, dict[str, Any]]) -> str:
    counts: dict[str, int] = {}
    for r in steps.values():
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    summary = ", ".join(f"{n} {s.replace('_', ' ')}" for s, n in sorted(counts.items()))
    params = run.get("parameters") or {}
    if params:
        shown = "".join(f"<li><code>{html.escape(str(k))}</code> = <code>{html.escape(_value(v))}</code></li>"
                        for k, v in params.items())
        params_html = f'<ul class="params">{shown}</ul>'
    else:
        params_html = '<span class="muted">none given (notebook defaults and nbflow.yaml)</span>'
    rows = [
        ("status", _badge(run["status"]) + f' <span class="muted">{html.escape(summary)}</span>'),
        ("pipeline", f"<code>{html.escape(str(root))}</code>"),
        ("started", html.escape(_when(run["started_at"]))),
        ("finished", html.escape(_when(run["finished_at"]))),
        ("duration", html.escape(_duration(run["duration_s"]))),
        ("host", html.escape(f"{run.get('host') or '?'} (pid {run.get('pid') or '?'})")),
        ("parameters", params_html),
    ]
    table = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    return (f'<h1>Run <code>{html.escape(run["run_id"])}</code></h1>\n'
            f'<table class="header">{table}</table>')


def _value(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v, default=repr)


def _notebook_link(root: Path, notebook: str | None, report_dir: Path) -> str:
    if not notebook:
        return '<span class="muted">–</span>'
    target = root / notebook
    href = Path(os.path.relpath(target, report_dir)).as_posix()
    shown = html.escape(notebook)
    if not target.exists():
        return f'<span class="muted" title="removed since (nbflow clean?)">{shown} (removed)</span>'
    return f'<a href="{html.escape(href, quote=True)}">{shown}</a>'


def _steps_table(root: Path, steps: dict[str, dict[str, Any]], report_dir: Path) -> str:
    head = "".join(f"<th>{h}</th>" for h in ("step", "status", "attempts", "duration", "executed notebook",
                                             "why it ran / error"))
    body = []
    for name, r in steps.items():
        detail = html.escape("; ".join(r["reasons"] or []))
        error = _error(r)
        if error is not None:
            where = f" in cell {error.cell}" if error.cell else ""
            trace = _ANSI.sub("", error.traceback).strip()
            detail = (f'<div class="error">{html.escape(error.ename)}: {html.escape(error.evalue)}'
                      f'<span class="cell">{where}</span></div>'
                      + (f"<details><summary>traceback</summary><pre>{html.escape(trace)}</pre></details>"
                         if trace else "")
                      + (f'<div class="muted">{detail}</div>' if detail else ""))
        earlier = r.get("earlier_errors") or []
        if earlier and r["status"] == "succeeded":
            detail += "".join(f'<div class="muted">attempt {e["attempt"]} failed: '
                              f'{html.escape(e["error_name"])}: {html.escape(e["error_value"] or "")}</div>'
                              for e in earlier)
        body.append(
            f'<tr id="step-{_anchor(name)}"><td><code>{html.escape(name)}</code></td>'
            f"<td>{_badge(r['status'])}</td><td class=num>{r['attempt'] or '–'}</td>"
            f"<td class=num>{_duration(r['duration_s'])}</td>"
            f"<td>{_notebook_link(root, r['notebook'], report_dir)}</td><td>{detail}</td></tr>")
    return f'<table class="steps"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _files_table(steps: dict[str, dict[str, Any]]) -> str:
    rows = []
    for name, r in steps.items():
        for f in sorted(r["files"], key=lambda f: (f["role"] != "input", f["path"])):
            role = "read" if f["role"] == "input" else "wrote"
            rows.append(f"<tr><td><code>{html.escape(name)}</code></td><td>{role}"
                        f"</td><td><code>{html.escape(f['path'])}</code></td>"
                        f'<td><code title="{html.escape(f["sha256"])}">{html.escape(f["sha256"][:12])}</code></td>'
                        f"<td class=num>{_size(f['size'])}</td></tr>")
    if not rows:
        return ('<p class="muted">No files recorded: files are recorded when a step succeeds '
                "(skipped steps were recorded by the run that made their outputs).</p>")
    head = "".join(f"<th>{h}</th>" for h in ("step", "", "path (relative to the pipeline)", "sha256", "size"))
    return f'<table class="files"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


_CSS = """
body { margin: 24px; color: #212529; font-family: system-ui, -apple-system, 'Segoe UI', Roboto,
       'Helvetica Neue', Arial, sans-serif; font-size: 14px; line-height: 1.45; }
h1 { font-size: 20px; margin: 0 0 12px; } h2 { font-size: 16px; margin: 28px 0 8px; }
code, pre { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, 'DejaVu Sans Mono', monospace;
            font-size: 12.5px; }
table { border-collapse: collapse; }
th, td { text-align: left; vertical-align: top; padding: 4px 12px 4px 0; }
table.steps th, table.files th { border-bottom: 1px solid #dee2e6; color: #495057; font-weight: 600; }
table.steps td, table.files td { border-bottom: 1px solid #f1f3f5; }
table.header th { color: #495057; font-weight: 600; padding-right: 20px; }
td.num { text-align: right; white-space: nowrap; }
.badge { display: inline-block; padding: 0 8px; border-radius: 10px; font-size: 12px; white-space: nowrap; }
.muted { color: #868e96; }
.error { color: #c92a2a; font-weight: 600; } .error .cell { color: #495057; font-weight: normal; }
ul.params { margin: 0; padding-left: 18px; }
details pre { background: #f8f9fa; padding: 8px; overflow-x: auto; max-width: 900px; }
:target { background: #fff9db; }
"""


def _page(title: str, body: str) -> str:
    return ('<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n{body}\n"
            '<p class="muted" style="margin-top:32px">Made by nbflow from '
            f"{STATE_DIR}/history.sqlite.</p>\n</body>\n</html>\n")
