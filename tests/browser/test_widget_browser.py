"""The run widget in a real browser: JupyterLab, Debian's Chromium, Playwright.

Starts JupyterLab on 127.0.0.1 in its own process group (private config,
runtime, settings and workspace folders), opens notebooks that call
`nbflow.run` on small fixture pipelines whose steps take about a second, runs
them from the Run menu and checks what a user sees: the widget moving while the
cell blocks, success (and what the saved notebook keeps), a failure with its
error, a background run cancelled from the widget's button, and a blocking run
stopped with the widget's button or with the kernel's interrupt, after which the
next cell runs. Screenshots of the cell's output area go to tests/artifacts/.

A blocking run's Cancel button works where jupyter-ui-poll can hand the click
to the waiting cell: ipykernel 6. With ipykernel 7 the widget points to the
kernel's interrupt instead, and the button test skips. NBFLOW_TEST_KERNEL_PYTHON
names another interpreter (with nbflow and e.g. ipykernel 6) for the
notebooks' kernels.

Needs `pip install jupyterlab playwright==1.65.*` and Chromium at
/usr/lib/chromium/chromium (Debian's `chromium` package); Playwright's own
browser download is never used. Without them the tests skip, except under CI
(the CI environment variable is set), where they fail.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

CHROMIUM = Path("/usr/lib/chromium/chromium")
HERE = Path(__file__).parent
FIXTURES = HERE.parent / "notebooks"
ARTIFACTS = HERE.parent / "artifacts"
KERNEL = "Python 3 (ipykernel)"
pytestmark = pytest.mark.slow


def _missing() -> str | None:
    if not CHROMIUM.exists():
        return f"Chromium is not installed at {CHROMIUM} (apt-get install chromium)"
    try:
        import jupyterlab  # noqa: F401, PLC0415
        import playwright.sync_api  # noqa: F401, PLC0415
    except ImportError as e:
        return f"{e.name} is not installed (pip install jupyterlab playwright==1.65.*)"
    return None


if (_reason := _missing()) is not None:
    if os.environ.get("CI"):
        pytest.fail(f"browser tests cannot run under CI: {_reason}", pytrace=False)
    pytest.skip(_reason, allow_module_level=True)

from playwright.sync_api import Locator, Page, expect, sync_playwright  # noqa: E402


@dataclass
class Lab:
    url: str
    token: str
    root: Path
    server_pid: int
    ipykernel: str  # the kernels' ipykernel version
    ui_poll: bool  # a blocking run's Cancel button works (jupyter-ui-poll on ipykernel 6)

    def api(self, method: str, path: str, body: dict | None = None) -> Any:
        request = urllib.request.Request(f"{self.url}{path}", method=method,
                                         data=None if body is None else json.dumps(body).encode(),
                                         headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            answer = response.read()
        return json.loads(answer) if answer else None

    def processes(self) -> set[psutil.Process]:
        return {p for p in psutil.Process(self.server_pid).children(recursive=True)
                if p.status() != psutil.STATUS_ZOMBIE}

    def kernel_id(self, notebook: str) -> str:
        [session] = [s for s in self.api("GET", "/api/sessions") if s["path"] == notebook]
        return session["kernel"]["id"]

    def wait_until_stopped(self, kernel_id: str, others: set[psutil.Process]) -> None:
        """Wait until a kernel, and everything started since `others` were running, has exited."""
        deadline = time.time() + 15
        while time.time() < deadline:
            left = []
            for p in self.processes():
                try:
                    if p not in others or any(kernel_id in arg for arg in p.cmdline()):
                        left.append(p)
                except psutil.Error:
                    pass
            if not left:
                return
            time.sleep(0.1)
        raise AssertionError(f"still running after the kernel was shut down: {left}")


def _driver(path: Path, *sources: str) -> None:
    nb = {"cells": [{"cell_type": "code", "id": f"c{i}", "metadata": {}, "execution_count": None, "outputs": [],
                     "source": source} for i, source in enumerate(sources)],
          "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                       "language_info": {"name": "python"}},
          "nbformat": 4, "nbformat_minor": 5}
    path.write_text(json.dumps(nb, indent=1))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    base = tmp_path_factory.mktemp("lab")
    root = base / "root"
    root.mkdir()
    for name, fixture in [("slow", "widget_slow_steps"), ("raises", "widget_step_raises"),
                          ("background", "widget_slow_steps"), ("interrupt", "widget_slow_steps"),
                          ("blocking", "widget_slow_steps")]:
        shutil.copytree(FIXTURES / fixture, root / name)
    _driver(root / "run_slow.ipynb", 'import nbflow\nresult = nbflow.run("slow")')
    _driver(root / "run_raises.ipynb", 'import nbflow\nresult = nbflow.run("raises")')
    _driver(root / "run_interrupt.ipynb",
            'import nbflow\nresult = nbflow.run("interrupt", parameters={"delay": 3})\nprint(result.status)',
            NEXT_CELL)
    _driver(root / "run_blocking.ipynb", 'import nbflow\nresult = nbflow.run("blocking", parameters={"delay": 3})',
            NEXT_CELL)
    _driver(root / "run_background.ipynb",
            'import nbflow\nhandle = nbflow.run("background", parameters={"delay": 3}, background=True)')
    env = dict(os.environ)
    for var, folder in [("JUPYTER_CONFIG_DIR", "config"), ("JUPYTER_RUNTIME_DIR", "runtime"),
                        ("JUPYTERLAB_SETTINGS_DIR", "settings"), ("JUPYTERLAB_WORKSPACES_DIR", "workspaces")]:
        env[var] = str(base / folder)
    kernel_python = os.environ.get("NBFLOW_TEST_KERNEL_PYTHON", sys.executable)
    if kernel_python != sys.executable:  # a "python3" kernelspec of our own, found before the server's own
        spec = base / "data" / "kernels" / "python3"
        spec.mkdir(parents=True)
        (spec / "kernel.json").write_text(json.dumps({
            "argv": [kernel_python, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": KERNEL, "language": "python"}))
        env["JUPYTER_PATH"] = os.pathsep.join(filter(None, [str(base / "data"), env.get("JUPYTER_PATH")]))
    probe = "import importlib.util as u, ipykernel\nprint(ipykernel.__version__, bool(u.find_spec('jupyter_ui_poll')))"
    ipykernel, ui_poll = subprocess.run([kernel_python, "-c", probe], check=True, capture_output=True,
                                        text=True).stdout.split()
    # no "would you like news?" toast over the notebook
    (base / "config" / "labconfig").mkdir(parents=True)
    (base / "config" / "labconfig" / "page_config.json").write_text(
        json.dumps({"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}))
    port, token = _free_port(), secrets.token_hex(16)
    with open(base / "server.log", "wb") as log:  # the server keeps its own copy of the file descriptor
        server = subprocess.Popen(
            [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
             "--allow-root", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    started = Lab(f"http://127.0.0.1:{port}", token, root, server.pid, ipykernel,
                  ui_poll == "True" and int(ipykernel.split(".")[0]) < 7)
    try:
        deadline = time.time() + 60
        while True:
            try:
                started.api("GET", "/api/status")
                break
            except (urllib.error.URLError, ConnectionError):
                if server.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"JupyterLab did not start:\n{(base / 'server.log').read_text()}") from None
                time.sleep(0.1)
        with ThreadPoolExecutor() as pool:  # each notebook's kernel, started together, before the tests
            list(pool.map(lambda nb: started.api("POST", "/api/sessions", {
                "path": nb.name, "name": nb.name, "type": "notebook", "kernel": {"name": "python3"}}),
                root.glob("*.ipynb")))
        yield started
    finally:
        leftovers = psutil.Process(server.pid).children(recursive=True) if server.poll() is None else []
        os.killpg(server.pid, signal.SIGTERM)  # the server and its process group; kernels have their own
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(5)
        for process in leftovers:
            try:
                process.kill()
            except psutil.Error:
                pass


@pytest.fixture(scope="module")
def lab_page(lab: Lab):
    """One JupyterLab page for the module: loading Lab is the slow part, opening a notebook in it is not."""
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM))
        page = browser.new_page(viewport={"width": 1500, "height": 1000})
        page.goto(f"{lab.url}/lab?token={lab.token}")
        expect(page.locator(".jp-DirListing-item").first).to_be_visible(timeout=60_000)
        yield page
        browser.close()


@pytest.fixture
def open_notebook(lab: Lab, lab_page: Page):
    """Open a notebook from the file browser; at the end, shut its kernel down from the Kernel menu."""
    running = lab.processes()
    opened: list[str] = []

    def open_(name: str) -> Locator:
        opened.append(name)
        lab_page.locator(f'.jp-DirListing-item[title^="Name: {name}"]').dblclick()
        panel = lab_page.locator(".jp-NotebookPanel:not(.lm-mod-hidden):has(.jp-Notebook)")
        expect(lab_page.locator(".lm-TabBar-tab.lm-mod-current .lm-TabBar-tabLabel", has_text=name)).to_be_visible()
        # For a moment the toolbar reads idle with "No Kernel": running then asks for a kernel.
        expect(panel.locator(".jp-KernelName")).to_have_text(KERNEL, timeout=60_000)
        expect(panel.locator(".jp-Notebook-ExecutionIndicator")).to_have_attribute("data-status", "idle",
                                                                                   timeout=60_000)
        return panel

    yield open_
    if not opened:  # the test skipped first
        return
    [name] = opened
    kernel_id = lab.kernel_id(name)
    menu(lab_page, "Kernel", "Shut Down Kernel")
    lab.wait_until_stopped(kernel_id, running)


# the second cell of the blocking runs' notebooks: it must run once the run is over, with nothing of it left
NEXT_CELL = """import os, threading, psutil
kernels = []  # the steps' kernels: below the kernel's own children (the fork server)
for p in psutil.Process().children(recursive=True):
    try:
        if p.ppid() != os.getpid() and p.status() != psutil.STATUS_ZOMBIE:
            kernels.append(p)
    except psutil.Error:
        pass
left = sorted(t.name for t in threading.enumerate() if t.name.startswith("nbflow") or "_worker" in t.name)
print(f"next cell: {result.status.value}, threads left {left}, step kernels left {len(kernels)}")"""


def menu(page: Page, top: str, item: str) -> None:
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(f"^{top}$")).click()
    page.locator(".lm-Menu-itemLabel", has_text=re.compile(f"^{re.escape(item)}$")).click()


def widget(panel: Locator) -> Locator:
    return panel.locator(".jp-Cell-outputArea .nbflow-run").first


def row(panel: Locator, step: str) -> Locator:
    return widget(panel).locator(".nbflow-step", has=panel.page.locator(f'[data-step="{step}"]'))


def prompt(panel: Locator) -> Locator:
    return panel.locator(".jp-Cell .jp-InputArea-prompt").first


def wait_until_cell_done(panel: Locator) -> None:
    expect(prompt(panel)).to_have_text(re.compile(r"\[\d+\]"), timeout=60_000)


def expect_next_cell_ran(panel: Locator, status: str) -> None:
    """The cell queued behind the blocking run ran after it (not swallowed, not before), and found nothing running."""
    cells = panel.locator(".jp-Notebook .jp-CodeCell")
    expect(cells.nth(1).locator(".jp-InputArea-prompt")).to_have_text("[2]:", timeout=30_000)
    expect(cells.nth(0).locator(".jp-InputArea-prompt")).to_have_text("[1]:")
    expect(cells.nth(1).locator(".jp-OutputArea-output")).to_have_text(
        f"next cell: {status}, threads left [], step kernels left 0")


def saved_display(panel: Locator, lab: Lab, notebook: str) -> dict:
    """Save the notebook from the File menu and return its first output's data as stored in the file."""
    menu(panel.page, "File", "Save Notebook")
    expect(panel.page.locator(".lm-TabBar-tab.lm-mod-current.jp-mod-dirty")).to_have_count(0)
    data = json.loads((lab.root / notebook).read_text())["cells"][0]["outputs"][0]["data"]
    return {mime: "".join(value) if isinstance(value, list) else value for mime, value in data.items()}


def screenshot(panel: Locator, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    panel.locator(".jp-Cell-outputArea").first.screenshot(path=str(ARTIFACTS / name))


def test_widget_updates_while_the_cell_blocks_and_ends_succeeded(lab: Lab, open_notebook):
    panel = open_notebook("run_slow.ipynb")
    menu(panel.page, "Run", "Run All Cells")
    view = widget(panel)
    expect(view).to_be_visible(timeout=30_000)
    expect(view.locator(".widget-hprogress")).to_have_count(2)
    for step in ("numbers", "total"):
        expect(row(panel, step)).to_be_visible()

    # while the cell is still running ([*]) the widget moves: comm messages arrive from the busy kernel
    numbers = row(panel, "numbers")
    expect(numbers.locator(".nbflow-state")).to_have_text(re.compile("running"), timeout=30_000)
    expect(numbers.locator(".nbflow-cells")).to_have_text(re.compile(r"^[1-9]\d*/\d+$"))  # cell by cell
    expect(prompt(panel)).to_have_text("[*]:")
    header = view.locator(".nbflow-header")
    ticking = header.inner_text()
    expect(header).not_to_have_text(ticking, timeout=3_000)  # the timer moves the elapsed time
    expect(prompt(panel)).to_have_text("[*]:")
    screenshot(panel, "widget-running.png")

    wait_until_cell_done(panel)
    for step in ("numbers", "total"):
        expect(row(panel, step).locator(".nbflow-state")).to_have_text(re.compile("succeeded"))
        expect(row(panel, step).locator(".progress-bar-success")).to_have_count(1)
        expect(row(panel, step).locator(".nbflow-cells")).to_have_text(re.compile(r"^(\d+)/\1$"))
    expect(view.locator(".nbflow-header")).to_contain_text("2 succeeded")
    expect(view.locator(".nbflow-graph svg")).to_be_visible()

    # the link opens the executed notebook: relative to the calling notebook, resolved by the page's URL
    link = row(panel, "numbers").locator("a")
    href = link.get_attribute("href")
    assert href is not None and re.fullmatch(r"slow/_nbflow/runs/[^/]+/numbers\.ipynb", href), href
    assert link.get_attribute("target") == "_blank"
    resolved = urllib.parse.urlparse(link.evaluate("a => a.href")).path
    assert resolved == f"/lab/tree/{href}"
    lab.api("GET", f"/api/contents/{href}?content=0")  # the file is there for Jupyter to open
    screenshot(panel, "widget-succeeded.png")

    # the saved notebook keeps the final state for viewers without widget state (GitHub, nbviewer)
    saved = saved_display(panel, lab, "run_slow.ipynb")
    assert "application/vnd.jupyter.widget-view+json" in saved
    assert "succeeded" in saved["text/html"] and "running" not in saved["text/html"]


def test_failed_step_shows_its_error_and_cell(lab: Lab, open_notebook):
    panel = open_notebook("run_raises.ipynb")
    menu(panel.page, "Run", "Run All Cells")
    wait_until_cell_done(panel)
    view = widget(panel)
    expect(row(panel, "numbers").locator(".nbflow-state")).to_have_text(re.compile("succeeded"))
    failed = row(panel, "total")
    expect(failed.locator(".nbflow-state")).to_have_text(re.compile("failed"))
    expect(failed.locator(".progress-bar-danger")).to_have_count(1)
    expect(failed.locator(".nbflow-cells")).to_have_text("3/5")  # the cell that raised did not complete
    error = failed.locator(".nbflow-error")
    expect(error).to_contain_text("ValueError: the numbers add up to 55, not 54")
    expect(error).to_contain_text("cell 5")
    expect(error).to_contain_text('raise ValueError(f"the numbers add up to {sum(numbers)}, not 54")')
    expect(row(panel, "report").locator(".nbflow-state")).to_have_text(re.compile("not run"))
    expect(view.locator(".nbflow-header")).to_contain_text("1 failed")
    expect(failed.locator("a")).to_have_attribute("href", re.compile(r"^raises/_nbflow/runs/[^/]+/total\.ipynb$"))
    screenshot(panel, "widget-failed.png")


def test_cancel_button_stops_a_background_run(lab: Lab, open_notebook):
    panel = open_notebook("run_background.ipynb")
    menu(panel.page, "Run", "Run All Cells")
    wait_until_cell_done(panel)  # background=True: the cell ends at once, the widget goes on
    view = widget(panel)
    expect(row(panel, "numbers").locator(".nbflow-state")).to_have_text(re.compile("running"), timeout=30_000)
    view.get_by_role("button", name="Cancel").click()
    expect(view.locator(".nbflow-header")).to_contain_text("cancelled", timeout=30_000)
    expect(row(panel, "numbers").locator(".nbflow-state")).to_have_text(re.compile("cancelled"))
    expect(row(panel, "total").locator(".nbflow-state")).to_have_text(re.compile("cancelled|not run"))
    screenshot(panel, "widget-cancelled.png")
    assert "cancelled" in saved_display(panel, lab, "run_background.ipynb")["text/plain"]


def test_cancel_button_stops_a_blocking_run(lab: Lab, open_notebook):
    if not lab.ui_poll:
        pytest.skip(f"the kernels' ipykernel {lab.ipykernel} (or no jupyter-ui-poll): a blocking run holds the kernel, "
                    "so no click reaches it; the widget points to the kernel's interrupt (tested below)")
    panel = open_notebook("run_blocking.ipynb")
    menu(panel.page, "Run", "Run All Cells")  # the second cell is queued behind the blocking run
    view = widget(panel)
    expect(row(panel, "numbers").locator(".nbflow-cells")).to_have_text(re.compile(r"^[2-9]/\d+$"), timeout=30_000)
    expect(prompt(panel)).to_have_text("[*]:")
    button = view.get_by_role("button", name="Cancel")
    expect(button).to_be_enabled()
    screenshot(panel, "widget-blocking-running.png")
    button.click()
    expect(view.locator(".nbflow-header")).to_contain_text("cancelled", timeout=30_000)
    wait_until_cell_done(panel)
    numbers = row(panel, "numbers")
    expect(numbers.locator(".nbflow-state")).to_have_text(re.compile("cancelled"))
    expect(row(panel, "total").locator(".nbflow-state")).to_have_text(re.compile("cancelled|not run"))
    link = numbers.locator("a")  # the running step's executed notebook is kept
    expect(link).to_have_attribute("href", re.compile(r"^blocking/_nbflow/runs/[^/]+/numbers\.ipynb$"))
    lab.api("GET", f"/api/contents/{link.get_attribute('href')}?content=0")
    expect_next_cell_ran(panel, "cancelled")
    screenshot(panel, "widget-blocking-cancelled.png")


def test_interrupting_the_kernel_cancels_a_blocking_run(lab: Lab, open_notebook):
    panel = open_notebook("run_interrupt.ipynb")
    menu(panel.page, "Run", "Run All Cells")
    view = widget(panel)
    expect(row(panel, "numbers").locator(".nbflow-cells")).to_have_text(re.compile(r"^[2-9]/\d+$"), timeout=30_000)
    button = view.get_by_role("button")
    if lab.ui_poll:  # the button works; the kernel's interrupt does too
        expect(button).to_have_text(re.compile("^ ?Cancel$"))
        expect(button).to_be_enabled()
    else:
        expect(button).to_have_text(re.compile("Interrupt the kernel"))
        expect(button).to_be_disabled()
    menu(panel.page, "Kernel", "Interrupt Kernel")
    expect(view.locator(".nbflow-header")).to_contain_text("cancelled", timeout=30_000)
    wait_until_cell_done(panel)
    numbers = row(panel, "numbers")
    expect(numbers.locator(".nbflow-state")).to_have_text(re.compile("cancelled"))
    expect(numbers.locator("a")).to_have_attribute("href",
                                                   re.compile(r"^interrupt/_nbflow/runs/[^/]+/numbers\.ipynb$"))
    printed = panel.locator(".jp-Cell").first.locator(".jp-OutputArea-output").last  # print(result.status)
    expect(printed).to_have_text("cancelled")
    expect_next_cell_ran(panel, "cancelled")
    screenshot(panel, "widget-interrupted.png")
