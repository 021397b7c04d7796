"""One run as a self-contained HTML page, from the ledger and the executed notebooks.

Owns: choosing the run (the latest, or one named by a unique prefix of its
id), and the page: the run's header (id, status, times, parameters as the
ledger stored them, secrets already redacted), the timeline of the run (one
bar per step attempt), the graph coloured by the run's statuses, one row per
step, then one section per step with what it showed (figures, its last table,
printed lines that look like metrics; or every output, or none), its
parameters, attempts and timings, the error with its cell and line, and links
to the executed notebook (relative to the report); last, the files each step
read and wrote with their sha256. A step that was fresh shows the outputs of
the run that made them. On request, every shown notebook is also exported to
HTML with nbconvert (`notebook_html`) into a folder beside the report.

The page is one file: images are inlined (each once), no script, no
stylesheet, font or image fetched, and a Content-Security-Policy that forbids
them anyway; HTML from outputs passes through `sanitize.clean_html`. It reads
correctly with JavaScript disabled. Reads `_nbflow/`; runs nothing.
"""

from __future__ import annotations

import html
import json
import os
import re
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import NbflowError, PipelineError, Problem
from ..events import MASK, StepError, cell_label
from ..graph import STATE_DIR, Graph, build_graph
from ..layout import StateLayout
from ..params import is_secret_parameter
from . import gantt, notebook_content, plot
from .notebook_content import OUTPUT_MODES, NotebookContent, Output, ShownCell
from .view import format_duration

__all__ = ["write", "render", "notebooks_dir", "OUTPUT_MODES"]

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


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


@dataclass
class _Shown:
    """What the step sections show, and the state they share (each image goes into the page once)."""

    outputs: str = "summary"
    inputs: bool = False
    earlier: dict[str, dict[str, Any]] = field(default_factory=dict)  # fresh step -> its last success before
    exported: dict[str, Path] = field(default_factory=dict)  # step -> its notebook exported to HTML
    images: dict[str, str] = field(default_factory=dict)  # digest -> the step that shows it


def notebooks_dir(report: Path) -> Path:
    """Where `--notebooks-html` puts the exported notebooks: `report_notebooks/` beside `report.html`."""
    return report.with_name(f"{report.stem}_notebooks")


def write(pipeline: str | os.PathLike, path: str | os.PathLike, run_id: str | None = None, *,
          outputs: str = "summary", inputs: bool = False, notebooks_html: bool = False) -> tuple[Path, str]:
    """Write the report of `run_id` (default: the latest run) to `path`; returns (path, run id).

    `outputs`: which outputs of each notebook to show, "summary" (figures, the last table, lines that look
    like metrics), "all" or "none"; `inputs`: show the code of those cells too; `notebooks_html`: also
    export each executed notebook to HTML (needs nbconvert, the `html` extra) into `notebooks_dir(path)`.
    """
    from ..state import Ledger  # noqa: PLC0415

    root = Path(pipeline).absolute()
    if not root.is_dir():
        raise PipelineError(Problem("pipeline folder does not exist or is not a folder", file=str(root)))
    out = Path(path).absolute()
    if out.suffix.lower() not in (".html", ".htm"):
        raise PipelineError(Problem("the report is an HTML page: name it with .html (for example report.html)",
                                    file=str(path)))
    if outputs not in OUTPUT_MODES:
        raise PipelineError(Problem(f"outputs must be one of {', '.join(OUTPUT_MODES)}, not {outputs!r}"))
    from . import notebook_html  # noqa: PLC0415

    exporter = notebook_html.exporter() if notebooks_html else None  # a missing extra fails before any write
    ledger = Ledger(StateLayout(root).state_dir, create=False)
    try:
        runs = ledger.runs()
        chosen = ledger.find_run(run_id)
        run = next(r for r in runs if r["run_id"] == chosen)
        step_rows = ledger.step_runs(run["run_id"])
        earlier = _earlier_successes(ledger, runs, run, step_rows)
    finally:
        ledger.close()
    exported = {}
    if exporter is not None:
        folder = notebooks_dir(out)
        for name, notebook in _shown_notebooks(root, step_rows, earlier).items():
            exported[name] = folder / f"{name}.html"
            notebook_html.export(exporter, notebook, exported[name])
    text = render(root, run, step_rows, out.parent, outputs=outputs, inputs=inputs, earlier=earlier,
                  exported=exported)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
    except OSError as e:
        raise NbflowError(f"{path}: cannot write the report: {e.strerror}; choose a writable path with -o") from None
    return out, run["run_id"]


def _earlier_successes(ledger: Any, runs: list[dict[str, Any]], run: dict[str, Any],
                       rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """For each step that was fresh in `run`, its newest successful row of an earlier run."""
    wanted = {r["step"] for r in _last_attempts(rows).values() if r["status"] == "skipped"}
    found: dict[str, dict[str, Any]] = {}
    for older in runs:  # newest first
        if not wanted - set(found):
            break
        if older["started_at"] >= run["started_at"]:
            continue
        for row in ledger.step_runs(older["run_id"]):
            if row["step"] in wanted and row["step"] not in found and row["status"] == "succeeded":
                found[row["step"]] = {**row, "run_id": older["run_id"]}
    return found


def _shown_notebooks(root: Path, rows: list[dict[str, Any]], earlier: dict[str, dict[str, Any]]) -> dict[str, Path]:
    """The executed notebook each step's section shows, when it still exists."""
    notebooks = {}
    for name, row in _last_attempts(rows).items():
        source = earlier.get(name, row)
        if source["notebook"] and (root / source["notebook"]).is_file():
            notebooks[name] = root / source["notebook"]
    return notebooks


def render(root: Path, run: dict[str, Any], step_rows: list[dict[str, Any]], report_dir: Path, *,
           outputs: str = "summary", inputs: bool = False, earlier: dict[str, dict[str, Any]] | None = None,
           exported: dict[str, Path] | None = None) -> str:
    """The HTML page of one run. `report_dir` is where it will be saved (links are relative to it).

    `earlier`: for a step that was fresh, the ledger row of the run that made its outputs (shown instead);
    `exported`: the steps' notebooks exported to HTML, linked from their sections.
    """
    shown = _Shown(outputs, inputs, earlier or {}, exported or {})
    steps = _last_attempts(step_rows)
    view = _RunView({name: _StepView(name, _plot_status(r["status"]), r["attempt"], r["duration_s"], _error(r))
                     for name, r in steps.items()})
    graph = _graph(root)
    links = {name: f"#step-{_anchor(name)}" for name in steps}
    secrets = set(graph.config.secrets) if isinstance(graph, Graph) else set()
    body = [
        _header(root, run, steps),
        "<h2>Timeline</h2>", f'<div class="scroll">{gantt.svg(run, step_rows, links)}</div>',
        "<h2>Graph</h2>", _graph_html(graph, view, steps),
        "<h2>Steps</h2>", _steps_table(root, steps, report_dir),
        *(_step_section(root, run, name, r, step_rows, report_dir, shown, secrets) for name, r in steps.items()),
        "<h2>Files</h2>", _files_table(steps),
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
            for key in ("error_kind", "error_name", "error_value", "error_cell", "error_traceback",
                        "error_execution"):
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
                     row["error_cell"], None, row["error_traceback"] or "", row.get("error_execution"))


def _graph(root: Path) -> Graph | PipelineError:
    try:
        return build_graph(root)
    except PipelineError as e:
        return e


def _graph_html(graph: Graph | PipelineError, view: _RunView, steps: dict[str, dict[str, Any]]) -> str:
    if isinstance(graph, PipelineError):
        return (f'<p class="muted">The graph cannot be drawn: the pipeline is invalid now '
                f"({html.escape(str(graph))}).</p>")
    changed = sorted(set(steps) - set(graph.steps))
    note = (f'<p class="muted">Steps of this run that are no longer in the pipeline: '
            f'{html.escape(", ".join(changed))}.</p>') if changed else ""
    links = {name: f"#step-{_anchor(name)}" for name in steps if name in graph.steps}
    return plot.html(graph, view, links) + note


def _anchor(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "-", name)


def _audit_rows(audit: dict[str, Any] | None) -> list[tuple[str, str]]:
    """Who ran it, with what: the run's audit record (see nbflow.audit)."""
    if not audit:
        return []
    git = audit.get("git")
    if git:
        code = f"<code>{html.escape(git['commit'])}</code>"
        if git.get("dirty"):
            files = ", ".join(f"<code>{html.escape(f)}</code>" for f in git.get("changed", [])[:10])
            code += f' <span class="muted">with {git.get("changed_count", 0)} changed file(s): {files}</span>'
    else:
        code = '<span class="muted">not in a git repository</span>'
    packages = audit.get("packages") or {}
    key = ", ".join(f"{html.escape(n)} {html.escape(v)}" for n, v in (packages.get("key") or {}).items())
    return [("commit", code),
            ("by", html.escape(f"{audit.get('user')} on {audit.get('host')}, Python {audit.get('python')}")),
            ("started by", f"<code>{html.escape(str(audit.get('call')))}</code>"),
            ("packages", (key or "–") + (f' <span class="muted">(all: sha256 {packages["sha256"][:12]})</span>'
                                         if packages.get("sha256") else ""))]


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
    ] + _audit_rows(run.get("audit"))
    table = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    return (f'<h1>Run <code>{html.escape(run["run_id"])}</code></h1>\n'
            f'<table class="header">{table}</table>')


def _value(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v, default=repr)


def _href(target: Path, report_dir: Path) -> str:
    try:
        relative = Path(os.path.relpath(target, report_dir)).as_posix()
    except ValueError:  # another drive (Windows)
        return target.as_uri()
    return urllib.parse.quote(relative)


def _notebook_link(root: Path, notebook: str | None, report_dir: Path) -> str:
    if not notebook:
        return '<span class="muted">–</span>'
    target = root / notebook
    shown = html.escape(notebook)
    if not target.exists():
        return f'<span class="muted" title="removed since (nbflow clean?)">{shown} (removed)</span>'
    return f'<a href="{html.escape(_href(target, report_dir), quote=True)}">{shown}</a>'


def _one_line_error(r: dict[str, Any]) -> str:
    error = _error(r)
    if error is None:
        return ""
    where = f" at {error.where}" if error.where and error.where not in error.evalue else ""
    return (f'<div class="error">{html.escape(error.ename)}: {html.escape(error.evalue)}'
            f'<span class="cell">{html.escape(where)}</span></div>')


def _steps_table(root: Path, steps: dict[str, dict[str, Any]], report_dir: Path) -> str:
    head = "".join(f"<th>{h}</th>" for h in ("step", "status", "attempts", "duration", "executed notebook",
                                             "why it ran / error"))
    body = []
    for name, r in steps.items():
        reasons = html.escape("; ".join(r["reasons"] or []))
        detail = _one_line_error(r) + (f'<div class="muted">{reasons}</div>' if r["error_name"] and reasons
                                       else reasons)
        earlier = r.get("earlier_errors") or []
        if earlier and r["status"] == "succeeded":
            detail += "".join(f'<div class="muted">attempt {e["attempt"]} failed: '
                              f'{html.escape(e["error_name"])}: {html.escape(e["error_value"] or "")}</div>'
                              for e in earlier)
        if r.get("worker"):  # run on a dask cluster: where
            detail += f'<div class="muted">ran on worker <code>{html.escape(r["worker"])}</code></div>'
        body.append(
            f'<tr id="row-{_anchor(name)}"><td><a href="#step-{_anchor(name)}"><code>{html.escape(name)}</code></a>'
            f"</td><td>{_badge(r['status'])}</td><td class=num>{r['attempt'] or '–'}</td>"
            f"<td class=num>{_duration(r['duration_s'])}</td>"
            f"<td>{_notebook_link(root, r['notebook'], report_dir)}</td><td>{detail}</td></tr>")
    return f'<table class="steps"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


# -- one section per step -----------------------------------------------------------------

def _step_section(root: Path, run: dict[str, Any], name: str, r: dict[str, Any], rows: list[dict[str, Any]],
                  report_dir: Path, shown: _Shown, secrets: set[str]) -> str:
    source = shown.earlier.get(name, r)  # a fresh step shows the run that made its outputs
    content: NotebookContent | None = None
    problem = ""
    notebook = root / source["notebook"] if source["notebook"] else None
    if notebook is not None and notebook.is_file():
        try:
            content = notebook_content.read(notebook, shown.outputs, shown.inputs, source["error_cell"])
        except (OSError, ValueError) as e:
            problem = f"cannot read the executed notebook {source['notebook']}: {e}"
    elif notebook is not None:
        problem = f"the executed notebook {source['notebook']} was removed since (nbflow clean?)"
    title = f' <span class="title">{html.escape(content.title)}</span>' if content and content.title else ""
    parts = [f'<section class="step" id="step-{_anchor(name)}">',
             f"<h3><code>{html.escape(name)}</code> {_badge(r['status'])}{title}</h3>",
             _meta(root, run, name, r, rows, source, report_dir, shown)]
    if r["reasons"] and r["status"] not in ("skipped", "not_run"):
        parts.append(f'<p class="muted">why it ran: {html.escape("; ".join(r["reasons"]))}</p>')
    if content is not None:
        parts.append(_parameters(content, source["parameters"] or {}, secrets))
    if r["status"] in ("failed", "cancelled", "interrupted") and r["error_name"]:
        parts.append(_failure(r, content))
    if problem:
        parts.append(f'<p class="muted">{html.escape(problem)}</p>')
    if content is not None and shown.outputs != "none":
        parts.append(_outputs(name, content.cells, shown))
    parts.append("</section>")
    return "\n".join(p for p in parts if p)


def _meta(root: Path, run: dict[str, Any], name: str, r: dict[str, Any], rows: list[dict[str, Any]],
          source: dict[str, Any], report_dir: Path, shown: _Shown) -> str:
    bits = []
    if source is not r:
        bits.append(f"fresh, not re-run: its outputs come from run <code>{html.escape(source['run_id'])}</code> "
                    f"({html.escape(_when(source['finished_at']))}, {_duration(source['duration_s'])})")
    elif r["status"] == "not_run":
        bits.append(html.escape("; ".join(r["reasons"] or ["not run"])))
    elif r["status"] == "skipped":
        bits.append("fresh, not re-run (no earlier successful run recorded)")
    else:
        attempts = f"{r['attempt']} attempts" if r["attempt"] > 1 else "1 attempt"
        start = "" if r["started_at"] is None else (
            f", started {format_duration(r['started_at'] - run['started_at'])} into the run")
        bits.append(f"{attempts}, {_duration(r['duration_s'])}{start}")
    if source["notebook"]:
        bits.append("executed notebook " + _notebook_link(root, source["notebook"], report_dir))
    if name in shown.exported:
        bits.append(f'<a href="{html.escape(_href(shown.exported[name], report_dir), quote=True)}">as HTML</a>')
    meta = f'<p class="meta">{" · ".join(bits)}</p>'
    layout = StateLayout(root)
    failed = [row for row in rows if row["step"] == name and row["error_name"] and row["attempt"] < r["attempt"]]
    for row in failed:
        kept = layout.attempt(run["run_id"], name, row["attempt"])
        link = (f' (<a href="{html.escape(_href(kept, report_dir), quote=True)}">its notebook</a>)'
                if kept.is_file() else "")
        meta += (f'<p class="muted">attempt {row["attempt"]} failed after {_duration(row["duration_s"])}: '
                 f'{html.escape(row["error_name"])}: {html.escape(row["error_value"] or "")}{link}</p>')
    return meta


def _parameters(content: NotebookContent, given: dict[str, Any], secrets: set[str]) -> str:
    names = dict(content.parameters)
    for name in given:
        names.setdefault(name, "")
    if not names:
        return ""
    rows = []
    for name, default in names.items():
        secret = is_secret_parameter(name, secrets) or given.get(name) == MASK
        if name in given:
            value = MASK if secret else _value(given[name])
            note = "" if secret or not default else f' <span class="muted">(default {html.escape(default)})</span>'
            rows.append(f"<tr><th><code>{html.escape(name)}</code></th><td><code>{html.escape(value)}</code>{note}"
                        '</td><td class="muted">set for this run</td></tr>')
        else:
            value = MASK if secret else default
            rows.append(f"<tr><th><code>{html.escape(name)}</code></th><td><code>{html.escape(value)}</code></td>"
                        '<td class="muted">default</td></tr>')
    return f'<table class="params">{"".join(rows)}</table>'


def _failure(r: dict[str, Any], content: NotebookContent | None) -> str:
    error = _error(r)
    assert error is not None
    failed = content.failed if content is not None else None
    cell = error.cell or (failed.number if failed else None)
    same = failed is not None and failed.number == cell
    # In [n] as everywhere; a failure recorded before the ledger kept it: as its executed notebook numbers it
    label = cell_label(error.execution_count or (failed.execution if failed is not None and same else None), cell)
    where = f"at {label}" if label and label not in error.evalue else ""
    if failed is not None and same and failed.line:
        where += f", line {failed.line}" if where else f"line {failed.line}"
    headline = (f'<p class="error">{html.escape(error.ename)}: {html.escape(error.evalue)} '
                f'<span class="cell">{html.escape(where)}</span></p>')
    parts = ['<div class="failure">', headline]
    if failed is not None and (cell is None or failed.number == cell):
        lines = failed.source.split("\n")
        numbered = "".join(
            f'<span class="line{" failing" if i == failed.line else ""}"><span class="ln">{i}</span>'
            f"{html.escape(text) or ' '}</span>" for i, text in enumerate(lines, start=1))
        parts.append(f'<pre class="source failed-cell" title="{html.escape(label)}">{numbered}</pre>')
    trace = _ANSI.sub("", error.traceback).strip() or (failed.traceback.strip() if failed else "")
    if trace:
        parts.append(f"<details><summary>traceback</summary><pre>{html.escape(trace)}</pre></details>")
    parts.append("</div>")
    return "".join(parts)


def _outputs(name: str, cells: tuple[ShownCell, ...], shown: _Shown) -> str:
    if not cells:
        what = "outputs" if shown.outputs == "all" else "figures, tables or printed metrics"
        return f'<p class="muted">No {what} to show; see the executed notebook.</p>'
    parts = []
    for cell in cells:
        label = cell_label(cell.execution, cell.number)
        parts.append(f'<div class="cell"><div class="cellno">{label}</div>')
        if cell.source is not None:
            parts.append(f'<pre class="source">{html.escape(cell.source)}</pre>')
        parts += [_output(name, cell.number, output, shown) for output in cell.outputs]
        parts.append("</div>")
    return "\n".join(parts)


def _output(name: str, number: int, output: Output, shown: _Shown) -> str:
    note = f'<p class="muted cut">{html.escape(output.note)}</p>' if output.note else ""
    if output.kind == "image":
        first = shown.images.get(output.digest)
        if first is not None:
            return (f'<p class="muted">The same figure as in <a href="#fig-{output.digest}">'
                    f"{html.escape(first)}</a>.</p>")
        shown.images[output.digest] = name
        size = "".join(f' {k}="{v}"' for k, v in (("width", output.width), ("height", output.height)) if v)
        title = f' title="{html.escape(output.title, quote=True)}"' if output.title else ""
        return (f'<img id="fig-{output.digest}" class="figure" src="{output.data}" '
                f'alt="figure from cell {number} of {html.escape(name, quote=True)}"{title}{size}>')
    if output.kind == "html":
        return f'<div class="html-output">{output.data}</div>{note}'
    if output.kind == "metrics":
        return f'{note}<pre class="metrics">{html.escape(output.data)}</pre>'
    css = "error-output" if output.kind == "error" else "text-output"
    return f'<pre class="{css}">{html.escape(output.data)}</pre>{note}' if output.data else note


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
       'Helvetica Neue', Arial, sans-serif; font-size: 14px; line-height: 1.45; max-width: 1200px; }
h1 { font-size: 20px; margin: 0 0 12px; } h2 { font-size: 16px; margin: 28px 0 8px; }
h3 { font-size: 15px; margin: 0 0 4px; } h3 .title { font-weight: normal; color: #495057; margin-left: 6px; }
code, pre { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, 'DejaVu Sans Mono', monospace;
            font-size: 12.5px; }
a { color: #1971c2; }
table { border-collapse: collapse; }
th, td { text-align: left; vertical-align: top; padding: 4px 12px 4px 0; }
table.steps th, table.files th { border-bottom: 1px solid #dee2e6; color: #495057; font-weight: 600; }
table.steps td, table.files td { border-bottom: 1px solid #f1f3f5; }
table.header th { color: #495057; font-weight: 600; padding-right: 20px; }
td.num { text-align: right; white-space: nowrap; }
.badge { display: inline-block; padding: 0 8px; border-radius: 10px; font-size: 12px; font-weight: normal;
         white-space: nowrap; vertical-align: 1px; }
.muted { color: #868e96; }
.error { color: #c92a2a; font-weight: 600; } .error .cell { color: #495057; font-weight: normal; }
ul.params { margin: 0; padding-left: 18px; }
details pre { background: #f8f9fa; padding: 8px; overflow-x: auto; max-width: 100%; }
.scroll { overflow-x: auto; max-width: 100%; }
section.step { border-top: 1px solid #dee2e6; padding: 14px 0 6px; margin-top: 10px; }
section.step p { margin: 2px 0 6px; }
table.params { margin: 4px 0 8px; } table.params th { font-weight: normal; padding-right: 8px; }
table.params td { padding-right: 16px; }
.failure { border-left: 3px solid #e03131; background: #fff5f5; padding: 6px 12px; margin: 8px 0; }
.failure .error { margin: 4px 0 8px; }
pre.source { background: #f8f9fa; border: 1px solid #e9ecef; padding: 6px 8px; overflow-x: auto; margin: 4px 0; }
pre.failed-cell .line { display: block; } pre.failed-cell .failing { background: #ffe3e3; }
pre.failed-cell .ln { display: inline-block; width: 2.5em; color: #adb5bd; user-select: none; }
.cell { margin: 10px 0 14px; } .cellno { color: #adb5bd; font-size: 11px; margin-bottom: 2px; }
pre.metrics { background: #f4fce3; border-left: 3px solid #94d82d; padding: 6px 10px; margin: 4px 0;
              white-space: pre-wrap; }
pre.text-output, pre.error-output { margin: 4px 0; white-space: pre-wrap; max-height: 40em; overflow: auto; }
pre.error-output { background: #fff5f5; padding: 6px; }
img.figure { display: block; max-width: 100%; height: auto; margin: 4px 0; }
.html-output { overflow-x: auto; max-width: 100%; margin: 4px 0; }
.html-output table { font-size: 12px; border: none; }
.html-output th, .html-output td { padding: 3px 8px; text-align: right; border: none;
                                   border-bottom: 1px solid #e9ecef; }
.html-output thead th { border-bottom: 1px solid #adb5bd; }
.html-output tbody tr:nth-child(odd) { background: #f8f9fa; }
.cut { font-size: 12px; }
:target { background: #fff9db; }
"""


def _page(title: str, body: str) -> str:
    return ('<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">\n'
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n{body}\n"
            '<p class="muted" style="margin-top:32px">Made by nbflow from '
            f"{STATE_DIR}/history.sqlite and the executed notebooks.</p>\n</body>\n</html>\n")
