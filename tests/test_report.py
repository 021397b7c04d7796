"""The HTML report of a run, made from the ledger: header, coloured graph, steps, files, links."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from click.testing import CliRunner

from nbflow.cli import main
from nbflow.errors import PipelineError
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
from nbflow.ui import plot, report

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
                      traceback="\x1b[0;31mValueError\x1b[0m: no rows left")
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


def svg_of(page: str) -> ET.Element:
    return ET.fromstring(re.search(r"<svg.*?</svg>", page, re.S).group(0))


def test_report_of_a_named_run_has_header_graph_steps_and_files(recorded, tmp_path):
    out = tmp_path / "out" / "report.html"
    path, run_id = report.write(recorded, out, "20250101")
    assert (path, run_id) == (out, "20250101T060000-aaaaaa")
    page = out.read_text()
    assert "<script" not in page and "<link" not in page and not re.search(r"src=|url\(", page)
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
    row_c = re.search(r'<tr id="step-c">.*?</tr>', page, re.S).group(0)
    assert "ValueError" in row_c and "no rows left" in row_c and "in cell 4" in row_c
    assert "\x1b" not in row_c and "traceback" in row_c
    assert '<a href="../diamond/_nbflow/runs/20250101T060000-aaaaaa/c.ipynb">' in row_c
    assert (out.parent / "../diamond/_nbflow/runs/20250101T060000-aaaaaa/c.ipynb").resolve().exists()
    row_b = re.search(r'<tr id="step-b">.*?</tr>', page, re.S).group(0)
    assert "<td class=num>2</td>" in row_b and "1.5 s" in row_b and "attempt 1 failed: DeadKernelError" in row_b
    assert "parameter offset 1 -&gt; 5" in row_b
    row_d = re.search(r'<tr id="step-d">.*?</tr>', page, re.S).group(0)
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
    row_c = re.search(r'<tr id="step-c">.*?</tr>', (tmp_path / "r.html").read_text(), re.S).group(0)
    assert "(removed)" in row_c and "<a href" not in row_c


def test_unknown_run_no_runs_and_a_bad_suffix_are_errors_that_say_what_to_do(recorded, fixture_pipeline, tmp_path):
    with pytest.raises(PipelineError, match=r"no run '2024'.*nbflow history"):
        report.write(recorded, tmp_path / "r.html", "2024")
    with pytest.raises(PipelineError, match="matches 2 runs; give more of the id"):
        report.write(recorded, tmp_path / "r.html", "2025")
    with pytest.raises(PipelineError, match="no runs recorded yet.*nbflow run"):
        report.write(fixture_pipeline("step_raises"), tmp_path / "r.html")
    with pytest.raises(PipelineError, match=r"name it with \.html"):
        report.write(recorded, tmp_path / "r.pdf")


def test_an_invalid_pipeline_still_gets_its_report_without_the_graph(recorded, tmp_path):
    (recorded / "nbflow.yaml").write_text("jobz: 2\n")
    report.write(recorded, tmp_path / "r.html")
    page = (tmp_path / "r.html").read_text()
    assert "The graph cannot be drawn" in page and "jobz" in page and "<svg" not in page
    assert 'id="step-b"' in page


def test_cli_report(recorded, tmp_path):
    out = tmp_path / "report.html"
    result = CliRunner().invoke(main, ["report", str(recorded), "20250101T06", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "20250101T060000-aaaaaa" in result.output and out.exists()
    missing = CliRunner().invoke(main, ["report", str(recorded), "nope", "-o", str(out)])
    assert missing.exit_code == 2 and "no run 'nope'" in missing.output
