"""The run report in a real browser with JavaScript disabled: Debian's Chromium, Playwright.

Runs the example pipeline (a copy of notebooks/) once as it is and once with a
parameter that makes `clean` fail, writes the report of each run, opens them
as files with scripts disabled and checks what a colleague who receives the
page sees: the report step's chart, the tables, the timeline with one bar per
step, the failed step's error with its cell and line; and that the page of the
example pipeline stays under its 2 MB budget. Screenshots go to
tests/artifacts/report-*.png and the report's size to
tests/artifacts/report-size.txt.

Needs `pip install playwright==1.65.*` and Chromium at /usr/lib/chromium/chromium
(Debian's `chromium` package); Playwright's own browser download is never
used. Without them the tests skip, except under CI, where they fail.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/lib/chromium/chromium")
ROOT = Path(__file__).parent.parent.parent
ARTIFACTS = ROOT / "tests" / "artifacts"
BUDGET = 2 * 1024 * 1024  # bytes: the report of the example pipeline, every image inlined
pytestmark = pytest.mark.slow


def _missing() -> str | None:
    if not CHROMIUM.exists():
        return f"Chromium is not installed at {CHROMIUM} (apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401, PLC0415
    except ImportError:
        return "playwright is not installed (pip install playwright==1.65.*)"
    return None


if (_reason := _missing()) is not None:
    if os.environ.get("CI"):
        pytest.fail(f"browser tests cannot run under CI: {_reason}", pytrace=False)
    pytest.skip(_reason, allow_module_level=True)

from playwright.sync_api import Page, expect, sync_playwright  # noqa: E402


def nbflow(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nbflow.cli", *args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict[str, Path]:
    """The example pipeline run twice (succeeded, then `clean` failed) and the report of each run."""
    base = tmp_path_factory.mktemp("report_browser")
    pipeline = base / "notebooks"
    shutil.copytree(ROOT / "notebooks", pipeline,
                    ignore=shutil.ignore_patterns("_nbflow", "tutorial_work", "staging", "clean", "marts", "warehouse",
                                                  "reports", "forecasts", ".ipynb_checkpoints"))
    ok = nbflow("run", str(pipeline), "--json")
    assert ok.returncode == 0, ok.stderr
    failed = nbflow("run", str(pipeline), "-p", "clean.min_year=2030", "--json")
    assert failed.returncode == 1, failed.stderr
    out = base / "site"
    paths = {"ok": out / "report.html", "failed": out / "failed.html"}
    made = nbflow("report", str(pipeline), json.loads(ok.stdout)["run_id"], "-o", str(paths["ok"]),
                  "--notebooks-html")
    assert made.returncode == 0, made.stderr
    made = nbflow("report", str(pipeline), json.loads(failed.stdout)["run_id"], "-o", str(paths["failed"]))
    assert made.returncode == 0, made.stderr
    paths["ran"] = sum(step["attempts"] for step in json.loads(ok.stdout)["steps"])  # one bar per attempt
    return paths


@pytest.fixture
def page():
    """A page with JavaScript disabled, in a browser of its own (each test stops every process it starts)."""
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM))
        context = chromium.new_context(java_script_enabled=False, viewport={"width": 1280, "height": 900})
        yield context.new_page()
        chromium.close()


def shot(page: Page, selector: str | None, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    target = ARTIFACTS / f"report-{name}.png"
    if selector is None:
        page.screenshot(path=str(target), full_page=True)
    else:
        page.locator(selector).screenshot(path=str(target))


def test_the_report_shows_the_chart_tables_and_timeline_without_javascript(reports, page):
    size = reports["ok"].stat().st_size
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "report-size.txt").write_text(f"{reports['ok'].name}: {size} bytes ({size / 1024:.0f} KB) for the "
                                               f"example pipeline; budget {BUDGET} bytes\n")
    print(f"report of the example pipeline: {size / 1024:.0f} KB")
    assert size < BUDGET
    page.goto(reports["ok"].as_uri())
    expect(page.locator("h1")).to_contain_text("Run ")

    chart = page.locator("#step-report img.figure")
    expect(chart).to_have_count(1)
    expect(chart).to_be_visible()
    box = chart.bounding_box()
    assert box is not None and box["width"] > 300 and box["height"] > 100
    assert chart.evaluate("img => img.complete && img.naturalWidth > 0")  # decoded, not a broken image
    assert chart.get_attribute("src").startswith("data:image/png;base64,")

    gantt = page.locator("svg.nbflow-gantt")
    expect(gantt).to_be_visible()
    ran = reports["ran"]  # the example's steps, its grid's instances too, one attempt each
    assert ran >= 6
    expect(gantt.locator("g.gantt-bar")).to_have_count(ran)
    bars = gantt.locator("g.gantt-bar rect")
    assert all((bars.nth(i).bounding_box() or {}).get("width", 0) >= 2 for i in range(ran))

    table = page.locator("#step-by_weather .html-output table")
    expect(table).to_be_visible()
    expect(table).to_contain_text("fog")
    expect(page.locator("#step-report pre.metrics")).to_contain_text("Warmest month")
    expect(page.locator("svg[aria-label='nbflow pipeline graph']")).to_be_visible()

    shot(page, None, "example")
    shot(page, "#step-report", "example-report-step")
    shot(page, "svg.nbflow-gantt", "example-timeline")

    # the executed notebook, exported to HTML beside the report, opens from its link
    page.locator("#step-report a", has_text="as HTML").click()
    expect(page.locator("img").first).to_be_visible()
    assert page.url.endswith("/report_notebooks/report.html")


def test_a_failed_step_shows_its_error_and_cell_without_javascript(reports, page):
    page.goto(reports["failed"].as_uri())
    failure = page.locator("#step-clean .failure")
    expect(failure).to_be_visible()
    expect(failure.locator("p.error")).to_contain_text("ValueError: no rows left with min_year=2030")
    expect(failure.locator("p.error")).to_contain_text("at In [7]")  # as the executed notebook numbers it
    failing = failure.locator(".failing")
    expect(failing).to_be_visible()
    expect(failing).to_contain_text('raise ValueError(f"no rows left with min_year={min_year}")')
    expect(page.locator("svg.nbflow-gantt g.gantt-bar")).to_have_count(1)  # only clean ran
    # a fresh step shows what the run that made its outputs showed
    expect(page.locator("#step-extract")).to_contain_text("fresh, not re-run")
    expect(page.locator("#step-extract .html-output table")).to_be_visible()
    shot(page, None, "failed")
    shot(page, "#step-clean", "failed-step")
