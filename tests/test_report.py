"""The HTML report of a run, made from the ledger and the executed notebooks: header, timeline, coloured
graph, steps, what each notebook showed (figures, the last table, metric lines), errors with their cell,
files, links, and the optional export of each notebook to HTML."""

from __future__ import annotations

import base64
import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from click.testing import CliRunner

from nbflow.cli import main
from nbflow.errors import CommandError, NbflowError, PipelineError
from nbflow.events import (
    FileRecord,
    PlannedStep,
    RunFinished,
    RunResult,
    RunStarted,
    RunStatus,
    StepError,
    StepFailed,
    StepNotRun,
    StepResult,
    StepSkipped,
    StepStarted,
    StepStatus,
    StepSucceeded,
)
from nbflow.state import Ledger, LedgerRecorder
from nbflow.ui import notebook_content, plot, report
from nbflow.ui.sanitize import clean_html

SHA_A = "a" * 12 + "0" * 52
SHA_B = "b" * 12 + "1" * 52


def record_run(root: Path, run_id: str, started: float, *, fail_c: bool = True) -> None:
    """Write one run of the diamond pipeline into its ledger, as the Runner's events would."""
    runs = root / "_nbflow" / "runs" / run_id
    runs.mkdir(parents=True, exist_ok=True)
    for name in ("b", "c"):
        (runs / f"{name}.ipynb").write_text("{}")
    ledger = Ledger(root / "_nbflow")
    recorder = LedgerRecorder(ledger, ("api_token",))
    nb = f"_nbflow/runs/{run_id}"
    error = StepError("exception", "ValueError", "no rows left", cell=4, source_line="check(df)",
                      traceback="\x1b[0;31mValueError\x1b[0m: no rows left", execution_count=5)
    plan = (PlannedStep("a", "skip", ("fresh",)), PlannedStep("b", "run", ("parameter offset 1 -> 5",)),
            PlannedStep("c", "run", ("never run",)), PlannedStep("d", "run", ("never run",)))
    events = [
        RunStarted(run_id, str(root), started, plan, {"offset": 5, "api_token": "s3cret"}),
        StepSkipped("a", ("fresh",)),
        StepStarted("b", 1, f"{nb}/b.ipynb", 3, started + 1, ("parameter offset 1 -> 5",)),
        StepFailed("b", 1, 0.5, f"{nb}/b.ipynb", StepError("kernel_died", "DeadKernelError", "kernel died"),
                   will_retry=True, retry_in_s=1),
        StepStarted("b", 2, f"{nb}/b.ipynb", 3, started + 2, ("parameter offset 1 -> 5",)),
        StepSucceeded("b", 2, 1.5, f"{nb}/b.ipynb", "fp", {}, {"offset": 5},
                      (FileRecord("data/a.txt", "data/a.txt", SHA_A, 3),),
                      (FileRecord("data/b.txt", "data/b.txt", SHA_B, 2048),), started + 2),
    ]
    if fail_c:
        events += [StepStarted("c", 1, f"{nb}/c.ipynb", 5, started + 1),
                   StepFailed("c", 1, 2.0, f"{nb}/c.ipynb", error, started_at=started + 1),
                   StepNotRun("d", "c")]
        status = RunStatus.FAILED
    else:
        events += [StepSkipped("c", ("fresh",)), StepSkipped("d", ("fresh",))]
        status = RunStatus.SUCCEEDED
    for e in events:
        recorder(e)
    recorder(RunFinished(RunResult(run_id, str(root), status, {"a": StepResult("a", StepStatus.SKIPPED)},
                                   started, started + 4.25)))
    ledger.close()


@pytest.fixture
def recorded(fixture_pipeline):
    root = fixture_pipeline("diamond")
    record_run(root, "20250101T060000-aaaaaa", 1735711200.0)
    record_run(root, "20250102T060000-bbbbbb", 1735797600.0, fail_c=False)
    return root


def svg_of(page: str, kind: str = "nbflow-graph") -> ET.Element:
    """The graph's SVG (inside its div), or the timeline's (kind="nbflow-gantt")."""
    if kind == "nbflow-gantt":
        return ET.fromstring(re.search(r'<svg[^>]*class="nbflow-gantt".*?</svg>', page, re.S).group(0))
    return ET.fromstring(re.search(r'<div class="nbflow-graph".*?(<svg.*?</svg>)', page, re.S).group(1))


def section(page: str, step: str) -> str:
    return re.search(rf'<section class="step" id="step-{step}">.*?</section>', page, re.S).group(0)


def test_report_of_a_named_run_has_header_graph_steps_and_files(recorded, tmp_path):
    out = tmp_path / "out" / "report.html"
    path, run_id = report.write(recorded, out, "20250101")
    assert (path, run_id) == (out, "20250101T060000-aaaaaa")
    page = out.read_text()
    assert "<script" not in page and "<link" not in page and not re.search(r"src=|url\(", page)
    assert "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'" in page
    # header
    assert "<h1>Run <code>20250101T060000-aaaaaa</code></h1>" in page
    assert "4.2 s" in page and "failed" in page
    assert "<code>offset</code> = <code>5</code>" in page
    assert "s3cret" not in page and "<code>api_token</code> = <code>***</code>" in page
    # graph, coloured by this run
    svg = svg_of(page)
    fills = {g.find("{http://www.w3.org/2000/svg}text").text: g.find("{http://www.w3.org/2000/svg}rect").get("fill")
             for g in svg.iter("{http://www.w3.org/2000/svg}g") if g.get("class") == "nbflow-step"}
    assert fills["a"] == plot.STATUS_STYLES["skipped"].fill
    assert fills["b"] == plot.STATUS_STYLES["succeeded"].fill
    assert fills["c"] == plot.STATUS_STYLES["failed"].fill
    assert fills["d"] == plot.STATUS_STYLES["not_run"].fill
    assert fills["sub/e"] == "#ffffff"  # not part of this run
    assert 'href="#step-c"' in page and 'id="step-c"' in page
    # steps: status, attempts, duration, error with its cell, the notebook relative to the report
    row_c = re.search(r'<tr id="row-c">.*?</tr>', page, re.S).group(0)
    assert "ValueError" in row_c and "no rows left" in row_c and "at In [5]" in row_c and "cell 4" not in row_c
    assert '<a href="../diamond/_nbflow/runs/20250101T060000-aaaaaa/c.ipynb">' in row_c
    section_c = section(page, "c")
    assert "ValueError: no rows left" in section_c and "at In [5]" in section_c and "cell 4" not in section_c
    assert "\x1b" not in section_c and "<summary>traceback</summary>" in section_c
    assert (out.parent / "../diamond/_nbflow/runs/20250101T060000-aaaaaa/c.ipynb").resolve().exists()
    row_b = re.search(r'<tr id="row-b">.*?</tr>', page, re.S).group(0)
    assert "<td class=num>2</td>" in row_b and "1.5 s" in row_b and "attempt 1 failed: DeadKernelError" in row_b
    assert "parameter offset 1 -&gt; 5" in row_b
    row_d = re.search(r'<tr id="row-d">.*?</tr>', page, re.S).group(0)
    assert "not run" in row_d and "upstream c did not succeed" in row_d
    # files with short hashes
    assert "<code>data/a.txt</code>" in page and f'title="{SHA_A}">{SHA_A[:12]}</code>' in page
    assert f">{SHA_B[:12]}</code>" in page and "2.0 KB" in page


def test_latest_run_is_the_default(recorded, tmp_path):
    _, run_id = report.write(recorded, tmp_path / "r.html")
    assert run_id == "20250102T060000-bbbbbb"
    assert "succeeded" in (tmp_path / "r.html").read_text()


def test_a_removed_notebook_is_named_not_linked(recorded, tmp_path):
    (recorded / "_nbflow" / "runs" / "20250101T060000-aaaaaa" / "c.ipynb").unlink()
    report.write(recorded, tmp_path / "r.html", "20250101T060000-aaaaaa")
    page = (tmp_path / "r.html").read_text()
    row_c = re.search(r'<tr id="row-c">.*?</tr>', page, re.S).group(0)
    assert "(removed)" in row_c and "c.ipynb\">" not in row_c
    assert "was removed since" in section(page, "c")


def test_unknown_run_no_runs_and_a_bad_suffix_are_errors_that_say_what_to_do(recorded, fixture_pipeline, tmp_path):
    # one resolution of run ids for show and report (Ledger.find_run): exit code 2 either way
    with pytest.raises(CommandError, match=r"no run '2024'.*nbflow history"):
        report.write(recorded, tmp_path / "r.html", "2024")
    with pytest.raises(CommandError, match="matches 2 runs; give more of the id"):
        report.write(recorded, tmp_path / "r.html", "2025")
    with pytest.raises(CommandError, match="no runs recorded yet.*nbflow run"):
        report.write(fixture_pipeline("step_raises"), tmp_path / "r.html")
    with pytest.raises(PipelineError, match=r"name it with \.html"):
        report.write(recorded, tmp_path / "r.pdf")


def test_an_invalid_pipeline_still_gets_its_report_without_the_graph(recorded, tmp_path):
    (recorded / "nbflow.yaml").write_text("jobz: 2\n")
    report.write(recorded, tmp_path / "r.html")
    page = (tmp_path / "r.html").read_text()
    assert "The graph cannot be drawn" in page and "jobz" in page and 'class="nbflow-graph"' not in page
    assert 'id="step-b"' in page and 'id="row-b"' in page


def test_cli_report(recorded, tmp_path):
    out = tmp_path / "report.html"
    result = CliRunner().invoke(main, ["report", str(recorded), "20250101T06", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "20250101T060000-aaaaaa" in result.output and out.exists()
    missing = CliRunner().invoke(main, ["report", str(recorded), "nope", "-o", str(out)])
    assert missing.exit_code == 2 and "no run 'nope'" in missing.output


# -- what the notebooks showed ----------------------------------------------------------------

PNG = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==")
SVG = '<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>'
RUN_1 = "20250101T060000-aaaaaa"


def code(source: str, *outputs: dict, count: int | None = None, tags: tuple[str, ...] = ()) -> dict:
    return {"cell_type": "code", "id": f"c{abs(hash((source, count))) % 10**8}",
            "metadata": {"tags": list(tags)} if tags else {}, "execution_count": count, "outputs": list(outputs),
            "source": source}


def stream(text: str, name: str = "stdout") -> dict:
    return {"output_type": "stream", "name": name, "text": text}


def display(data: dict, metadata: dict | None = None) -> dict:
    return {"output_type": "display_data", "data": data, "metadata": metadata or {}}


def table(marker: str) -> dict:
    html = (f'<div><style scoped>.dataframe {{ color: red }}</style><table border="1" class="dataframe" id="T_1">'
            f"<thead><tr><th>name</th></tr></thead><tbody><tr><td>{marker}</td></tr></tbody></table></div>")
    return {"output_type": "execute_result", "data": {"text/html": html, "text/plain": marker}, "metadata": {},
            "execution_count": 1}


def executed(path: Path, *cells: dict, title: str = "# Step b: adds the offset") -> Path:
    """Write an executed notebook as nbflow keeps it: the banner and injected cells are not the notebook's own."""
    nb = {"cells": [{"cell_type": "markdown", "id": "title", "metadata": {}, "source": title},
                    code("offset = 1\nlabel = 'b'\napi_token = 'dev'\n", count=1, tags=("parameters",)),
                    code("# Parameters\noffset = 5\n", count=2, tags=("injected-parameters",)),
                    *cells],
          "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                       "language_info": {"name": "python"}},
          "nbformat": 4, "nbformat_minor": 5}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(nb))
    return path


def notebook_of(root: Path, step: str, run_id: str = RUN_1) -> Path:
    return root / "_nbflow" / "runs" / run_id / f"{step}.ipynb"


def page_for(root: Path, tmp_path: Path, run_id: str = RUN_1, **options) -> str:
    out = tmp_path / "out" / "report.html"
    report.write(root, out, run_id, **options)
    return out.read_text()


def test_figures_are_inlined_once_each_and_the_last_table_is_shown(recorded, tmp_path):
    executed(notebook_of(recorded, "b"),
             code("plot()", display({"image/png": PNG, "text/plain": "<Figure size 640x480 with 1 Axes>"},
                                    {"image/png": {"width": 320, "height": 240}}), count=3),
             code("again()", display({"image/png": PNG + "\n", "text/plain": "<Figure>"}), count=4),
             code("vector()", display({"image/svg+xml": SVG, "text/plain": "<Figure>"}), count=5),
             code("first_table", table("FIRST-TABLE"), count=6),
             code("last_table", table("LAST-TABLE"), count=7),
             code("hidden", display({"image/png": PNG[:-4] + "AAAA"}), count=8, tags=("remove-output",)))
    page = page_for(recorded, tmp_path)
    b = section(page, "b")
    assert b.count(f'src="data:image/png;base64,{PNG}"') == 1  # the same picture twice: once in the page
    assert 'The same figure as in <a href="#fig-' in b
    svg_uri = "data:image/svg+xml;base64," + base64.b64encode(SVG.encode()).decode()
    assert f'src="{svg_uri}"' in b
    assert 'width="320" height="240"' in b and 'title="&lt;Figure size 640x480 with 1 Axes&gt;"' in b
    assert "LAST-TABLE" in b and "FIRST-TABLE" not in b
    assert '<table border="1" class="dataframe">' in b  # the table's id and its <style> are gone
    assert "<style" not in b and "color: red" not in b
    assert b.count("<img") == 2  # the remove-output cell shows nothing
    assert "Step b: adds the offset" in b and "In [3]" in b and "In [7]" in b
    assert "plot()" not in b  # inputs are hidden by default


def test_printed_lines_that_look_like_metrics_are_kept_the_rest_is_not():
    lines = {"rmse: 0.31": True, "accuracy = 93%": True, "1461 rows from staging": True,
             "0 of 1461 rows are unusable and dropped": True, "wrote data/clean.parquet: 1461 rows": True,
             "- Total precipitation: 4426.0 mm": True, "epoch 3 loss 0.25": True,
             "columns and row count OK": False, "loading the data...": False, "": False,
             "# Seattle weather summary": False}
    assert {line: notebook_content.is_metric(line) for line in lines} == lines


def test_metric_lines_come_from_stdout_bounded_to_the_last_ones(recorded, tmp_path):
    many = "".join(f"step {i}: loss {1 / (i + 1):.4f}\n" for i in range(50))
    executed(notebook_of(recorded, "b"),
             code("train()", stream("starting\n" + many + "progress 10%\rprogress 100%\n"), count=3),
             code("warn()", stream("DeprecationWarning: rows 12 and 13\n", "stderr"), count=4),
             code("report()", stream("rmse: 0.31\nall done\n" + "x" * 1000 + " = 5\n"), count=5))
    b = section(page_for(recorded, tmp_path), "b")
    metrics = "\n".join(re.findall(r'<pre class="metrics">(.*?)</pre>', b, re.S))
    assert "rmse: 0.31" in metrics and "progress 100%" in metrics and "progress 10%" not in metrics
    assert "starting" not in metrics and "all done" not in metrics and "DeprecationWarning" not in metrics
    kept = metrics.splitlines()
    assert len(kept) == notebook_content.MAX_METRIC_LINES
    assert "step 49: loss" in metrics and "step 0: loss" not in metrics
    assert max(len(line) for line in kept) <= notebook_content.MAX_LINE
    assert "earlier lines in the notebook" in b


def test_scripts_and_event_handlers_from_outputs_never_reach_the_page(recorded, tmp_path):
    evil = ('<table onclick="steal()"><tr><td onmouseover="x()">cell</td></tr></table>'
            "<script>alert(1)</script><img src=x onerror=alert(2)><a href=\"javascript:alert(3)\">link</a>"
            '<iframe src="https://example.com"><p>inside</p></iframe><svg><script>alert(4)</script></svg>'
            '<div style="background:url(https://example.com/x.png)">styled</div></section></body>')
    executed(notebook_of(recorded, "b"),
             code("evil", {"output_type": "execute_result", "data": {"text/html": evil, "text/plain": "evil"},
                           "metadata": {}, "execution_count": 3}, count=3),
             code("js", display({"application/javascript": "alert(5)", "text/plain": "<IPython.Javascript>"}),
                  count=4))
    for mode in ("summary", "all"):
        page = page_for(recorded, tmp_path, outputs=mode)
        lowered = page.lower()
        for bad in ("<script", "onclick", "onmouseover", "onerror", "javascript:", "<iframe", "alert(",
                    "example.com", "url("):
            assert bad not in lowered, (mode, bad)
        b = section(page, "b")
        assert "<td>cell</td>" in b and "inside" not in b
        assert b.count("<section") == 1 and page.count("</section>") == page.count("<section")  # not closed early
    assert "styled" in section(page, "b") and "link" in section(page, "b")


def test_clean_html_keeps_tables_and_safe_links_only():
    assert clean_html('<table class="dataframe"><tr><th colspan="2">a &amp; b</th></tr></table>') == \
        '<table class="dataframe"><tr><th colspan="2">a &amp; b</th></tr></table>'
    assert clean_html('<a href="https://x.org/a?b=1&c=2" target="_blank">x</a>') == \
        '<a href="https://x.org/a?b=1&amp;c=2" rel="noopener noreferrer">x</a>'
    assert clean_html('<a href=" java\tscript:alert(1)">x</a>') == "<a>x</a>"
    assert clean_html('<img src="data:image/png;base64,AAAA" onload="x()">') == \
        '<img src="data:image/png;base64,AAAA">'
    assert clean_html('<img src="https://tracker.example/p.gif">x') == "x"
    assert clean_html("<b>unclosed <i>tags") == "<b>unclosed <i>tags</i></b>"
    assert clean_html("</div></td>text<!-- c --><?pi?>") == "text"
    assert clean_html('<span style="color: rgb(1,2,3)">a</span><span style="color: expression(x)">b</span>') == \
        '<span style="color: rgb(1,2,3)">a</span><span>b</span>'
    assert clean_html("<textarea><img src=x onerror=y()></textarea><object><b>x</b></object>after") == "after"


def test_the_timeline_has_one_bar_per_step_attempt(recorded, tmp_path):
    page = page_for(recorded, tmp_path)
    gantt = svg_of(page, "nbflow-gantt")
    ns = "{http://www.w3.org/2000/svg}"
    bars = [(g.get("data-step"), g.get("data-attempt"), g.get("data-status"))
            for g in gantt.iter(f"{ns}g") if g.get("class") == "gantt-bar"]
    assert bars == [("b", "1", "failed"), ("b", "2", "succeeded"), ("c", "1", "failed")]
    rects = {(g.get("data-step"), g.get("data-attempt")): g.find(f"{ns}rect") for g in gantt.iter(f"{ns}g")
             if g.get("class") == "gantt-bar"}
    assert rects[("b", "2")].get("fill") == plot.STATUS_STYLES["succeeded"].fill
    assert rects[("c", "1")].get("fill") == plot.STATUS_STYLES["failed"].fill
    # the run started at t0; b's second attempt at t0 + 2 for 1.5 s, c's at t0 + 1 for 2 s: same scale
    x_b, w_b = float(rects[("b", "2")].get("x")), float(rects[("b", "2")].get("width"))
    x_c, w_c = float(rects[("c", "1")].get("x")), float(rects[("c", "1")].get("width"))
    assert x_b > x_c and w_c / w_b == pytest.approx(2 / 1.5, rel=0.02)
    assert (x_b - x_c) / w_b == pytest.approx(1 / 1.5, rel=0.02)
    words = [t.text for t in gantt.iter(f"{ns}text") if t.get("class") == "gantt-none"]
    assert words == ["skipped (fresh)", "not run"]  # a and d
    assert "b, attempt 1: failed" in ET.tostring(gantt, encoding="unicode")


def test_a_failed_step_shows_its_error_the_cell_and_the_line(recorded, tmp_path):
    ansi_trace = ["\x1b[31mValueError\x1b[39m  Traceback (most recent call last)",
                  ("\x1b[36mCell\x1b[39m\x1b[36m \x1b[39m\x1b[32mIn[5]\x1b[39m\x1b[32m, line 2\x1b[39m\n"
                   "      1 df = load()\n----> 2 check(df)\n"),
                  "\x1b[31mValueError\x1b[39m: no rows left"]
    executed(notebook_of(recorded, "c"),
             code("df = load()", stream("1461 rows loaded\n"), count=3),
             {"cell_type": "markdown", "id": "marker", "metadata": {"tags": ["papermill-error-cell-tag"]},
              "source": '<span id="papermill-error-cell">stopped here</span>'},
             code("df = load()\ncheck(df)\n", {"output_type": "error", "ename": "ValueError",
                                                 "evalue": "no rows left", "traceback": ansi_trace}, count=5),
             code("never()", count=None))
    c = section(page_for(recorded, tmp_path), "c")
    # one number, the executed notebook's: In [5] (the source notebook's cell 4 is not named)
    assert "ValueError: no rows left" in c and "at In [5], line 2" in c and "cell 4" not in c
    assert '<span class="line failing"><span class="ln">2</span>check(df)</span>' in c
    assert "1461 rows loaded" in c  # what ran before the failure is still shown
    assert "\x1b" not in c


def test_parameters_show_defaults_and_this_runs_values_with_secrets_hidden(recorded, tmp_path):
    executed(notebook_of(recorded, "b"), code("pass", count=3))
    b = section(page_for(recorded, tmp_path), "b")
    assert re.search(r"<code>offset</code></th><td><code>5</code> .*?\(default 1\).*?set for this run", b)
    assert re.search(r'<code>label</code></th><td><code>&#x27;b&#x27;</code></td><td class="muted">default', b)
    assert "<code>api_token</code></th><td><code>***</code>" in b and "dev" not in b


def test_inputs_and_output_modes(recorded, tmp_path):
    executed(notebook_of(recorded, "b"),
             code("print('hello')\nprint('rmse: 1')", stream("hello\nrmse: 1\n"), count=3),
             code("secret_sauce()", stream("chatter\n"), count=4, tags=("remove-input",)),
             code("gone()", stream("removed: 1\n"), count=5, tags=("remove-cell",)))
    summary = section(page_for(recorded, tmp_path), "b")
    assert "rmse: 1" in summary and "hello" not in summary and "print(" not in summary
    with_code = section(page_for(recorded, tmp_path, inputs=True), "b")
    assert "print(&#x27;hello&#x27;)" in with_code
    everything = section(page_for(recorded, tmp_path, outputs="all", inputs=True), "b")
    assert "hello" in everything and "chatter" in everything and "secret_sauce" not in everything
    assert "removed: 1" not in everything and "gone()" not in everything
    nothing = section(page_for(recorded, tmp_path, outputs="none"), "b")
    assert "rmse" not in nothing and "<pre" not in nothing and "offset" in nothing
    with pytest.raises(PipelineError, match="outputs must be one of summary, all, none"):
        report.write(recorded, tmp_path / "r.html", outputs="some")


def test_a_fresh_step_shows_the_outputs_of_the_run_that_made_them(fixture_pipeline, tmp_path):
    root = fixture_pipeline("diamond")
    record_run(root, RUN_1, 1735711200.0, fail_c=False)  # b succeeds; c and d are fresh
    record_run(root, "20250102T060000-bbbbbb", 1735797600.0, fail_c=False)  # now b is run again
    executed(notebook_of(root, "b"), code("print('rmse: 0.5')", stream("rmse: 0.5\n"), count=3))
    # in a third run every step is fresh
    ledger = Ledger(root / "_nbflow")
    recorder = LedgerRecorder(ledger)
    run_id, started = "20250103T060000-cccccc", 1735884000.0
    recorder(RunStarted(run_id, str(root), started, tuple(PlannedStep(s, "skip", ("fresh",)) for s in "abcd"), {}))
    for s in "abcd":
        recorder(StepSkipped(s, ("fresh",)))
    recorder(RunFinished(RunResult(run_id, str(root), RunStatus.SUCCEEDED, {}, started, started + 1)))
    ledger.close()
    (notebook_of(root, "b", "20250102T060000-bbbbbb")).unlink()  # the newer success's notebook was cleaned
    page = page_for(root, tmp_path, run_id)
    b = section(page, "b")
    assert "fresh, not re-run: its outputs come from run <code>20250102T060000-bbbbbb</code>" in b
    assert "was removed since" in b
    record_run(root, "20250104T060000-dddddd", 1735970400.0, fail_c=False)  # b's notebook exists again
    executed(notebook_of(root, "b", "20250104T060000-dddddd"), code("x", stream("rmse: 0.7\n"), count=3))
    assert "rmse: 0.5" not in page_for(root, tmp_path, "20250104")  # a run shows its own outputs


def test_outputs_are_bounded_so_the_page_stays_small(recorded, tmp_path):
    huge_table = "<table>" + "".join(f"<tr><td>{i}</td><td>{'v' * 50}</td></tr>" for i in range(20_000)) + "</table>"
    executed(notebook_of(recorded, "b"),
             code("print(log)", stream("".join(f"line {i} of the log\n" for i in range(100_000))), count=3),
             code("big_table", {"output_type": "execute_result", "execution_count": 4, "metadata": {},
                                "data": {"text/html": huge_table, "text/plain": "a big frame\n" * 5000}}, count=4))
    notebook_size = notebook_of(recorded, "b").stat().st_size
    for mode in ("summary", "all"):
        page = page_for(recorded, tmp_path, outputs=mode)
        assert len(page.encode()) < 150_000 < notebook_size, mode
    b = section(page, "b")
    assert "more lines in the notebook" in b and "a big frame" in b


def test_notebooks_exported_to_html_on_request_and_linked(recorded, tmp_path):
    executed(notebook_of(recorded, "b"), code("print('rmse: 1')", stream("rmse: 1\n"), count=3))
    executed(notebook_of(recorded, "c"), code("1 / 0", count=3))
    out = tmp_path / "out" / "report.html"
    result = CliRunner().invoke(main, ["report", str(recorded), RUN_1, "-o", str(out), "--notebooks-html"])
    assert result.exit_code == 0, result.output
    assert re.search(r"wrote .*report\.html \(run 20250101T060000-aaaaaa, \d+ KB; notebooks as HTML in "
                     r".*report_notebooks\)", result.output)
    exported = out.parent / "report_notebooks"
    assert sorted(p.name for p in exported.iterdir()) == ["b.html", "c.html"]
    b_html = (exported / "b.html").read_text()
    assert "<html" in b_html and "rmse: 1" in b_html and ">print<" in b_html  # the whole notebook, code too
    page = out.read_text()
    assert '<a href="report_notebooks/b.html">as HTML</a>' in section(page, "b")
    assert '<a href="report_notebooks/c.html">as HTML</a>' in section(page, "c")


def test_notebooks_html_without_nbconvert_names_the_extra_and_writes_nothing(recorded, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "nbconvert", None)  # import nbconvert now raises ImportError
    out = tmp_path / "report.html"
    with pytest.raises(NbflowError, match=r'needs nbconvert: pip install "nbflow\[html\]"'):
        report.write(recorded, out, notebooks_html=True)
    assert not out.exists() and not report.notebooks_dir(out).exists()
    result = CliRunner().invoke(main, ["report", str(recorded), "-o", str(out), "--notebooks-html"])
    assert result.exit_code == 1 and 'pip install "nbflow[html]"' in result.output


def test_a_ledger_of_the_previous_version_still_shows_its_failures_with_their_cell(tmp_path):
    """Schema 2 kept a failure's cell as the source notebook numbers it (markdown counted): such a row reads
    'cell 4'; the ledger gains the In [n] column and new failures are named In [n]."""
    import sqlite3  # noqa: PLC0415

    from nbflow import state  # noqa: PLC0415

    folder = tmp_path / "_nbflow"
    folder.mkdir()
    old = sqlite3.connect(folder / "history.sqlite")
    old.executescript(state._SCHEMA.replace(",\n    error_execution INTEGER", "") + "PRAGMA user_version=2;")
    old.execute("INSERT INTO runs (run_id, started_at, finished_at, status) VALUES ('r1', 1, 2, 'failed')")
    old.execute("INSERT INTO step_runs (run_id, step, attempt, status, error_kind, error_name, error_value, error_cell)"
                " VALUES ('r1', 'c', 1, 'failed', 'exception', 'ValueError', 'no rows left', 4)")
    old.commit()
    old.close()
    ledger = Ledger(folder)
    try:
        [row] = ledger.step_runs("r1")
        assert (row["error_cell"], row["error_execution"], row["error_where"]) == (4, None, "cell 4")
        assert "ValueError: no rows left<span class=\"cell\"> at cell 4</span>" in report._one_line_error(row)
        recorder = LedgerRecorder(ledger)
        recorder(RunStarted("r2", str(tmp_path), 3.0, ()))
        recorder(StepStarted("c", 1, "_nbflow/runs/r2/c.ipynb", 5, 3.0))
        recorder(StepFailed("c", 1, 1.0, "_nbflow/runs/r2/c.ipynb",
                            StepError("exception", "ValueError", "no rows left", cell=4, execution_count=5)))
        [row] = ledger.step_runs("r2")
        assert (row["error_cell"], row["error_execution"], row["error_where"]) == (4, 5, "In [5]")
        assert "at In [5]" in report._one_line_error(row)
    finally:
        ledger.close()
