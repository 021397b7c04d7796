"""The run widget in a real browser: JupyterLab and Notebook 7, Debian's Chromium, Playwright.

One Jupyter server on 127.0.0.1 under a sub-path (`--ServerApp.base_url=/sub/`), in
its own process group with private config, runtime, settings and workspace
folders. The notebooks that call `nbflow.run` sit in a folder (`class/`), so
that a link relative to the page's URL would go wrong. Each test runs a
notebook from the Run menu and checks what a user sees:

- a blocking run moves live, ends as static HTML (what the saved file keeps);
  after a page reload a link opens the executed notebook as a tab inside Lab;
  saved, its kernel shut down and reopened, the final state shows and no error,
  in Lab, in Notebook 7 and through nbconvert;
- a failure (with a 47-character step name) shows its error, its In [n] and its
  traceback on demand; at 350 px of output width every row's state, link and
  error stay reachable; the legend in the dark theme;
- Cancel during a blocking run on the kernel's ipykernel (7 here) and during a
  background run while another cell waits in `handle.wait()`; the kernel's
  interrupt still cancels a blocking run;
- a grid of 48 instances folds into one row and one node of the graph.

Screenshots of the output area go to tests/artifacts/. NBFLOW_TEST_KERNEL_PYTHON
names another interpreter (with nbflow and e.g. ipykernel 6, with or without
jupyter-ui-poll) for the kernels; every test passes with each.

Needs `pip install jupyterlab notebook playwright==1.65.*` and Chromium at
/usr/lib/chromium/chromium (Debian's `chromium` package); Playwright's own
browser download is never used. Without them the tests skip, except under CI
(the CI environment variable is set), where they fail.
"""

from __future__ import annotations

import base64
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
BASE = "/sub/"  # the server's base_url: every URL and API call of the front end goes below it
LONG_NAME = "total_of_all_the_numbers_that_numbers_wrote_out"  # 47 characters
pytestmark = pytest.mark.slow


def _missing() -> str | None:
    if not CHROMIUM.exists():
        return f"Chromium is not installed at {CHROMIUM} (apt-get install chromium)"
    try:
        import jupyterlab  # noqa: F401, PLC0415
        import notebook  # noqa: F401, PLC0415
        import playwright.sync_api  # noqa: F401, PLC0415
    except ImportError as e:
        return f"{e.name} is not installed (pip install jupyterlab notebook playwright==1.65.*)"
    return None


if (_reason := _missing()) is not None:
    if os.environ.get("CI"):
        pytest.fail(f"browser tests cannot run under CI: {_reason}", pytrace=False)
    pytest.skip(_reason, allow_module_level=True)

from playwright.sync_api import Locator, Page, expect, sync_playwright  # noqa: E402


@dataclass
class Lab:
    url: str  # up to and with the base_url, without its last slash
    token: str
    root: Path
    server_pid: int
    ipykernel: str  # the kernels' ipykernel version
    ui_poll: bool  # a blocking run processes widget messages while it waits (jupyter-ui-poll on ipykernel 6)

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

    def kernel_id(self, notebook: str) -> str | None:
        found = [s for s in self.api("GET", "/api/sessions") if s["path"] == notebook]
        return found[0]["kernel"]["id"] if found else None

    def wait_until_stopped(self, kernel_id: str, others: set[psutil.Process]) -> None:
        """Wait until a kernel, and everything started since `others` were running, has exited."""
        deadline = time.time() + 15
        while time.time() < deadline:
            # a kernel the server still manages (Lab may start one for a notebook it keeps open) is not a
            # leftover of the kernel shut down; anything else new is
            alive = {k["id"] for k in self.api("GET", "/api/kernels")} - {kernel_id}
            managed = set()
            for p in self.processes():
                try:
                    if any(f"kernel-{other}.json" in arg for other in alive for arg in p.cmdline()):
                        managed |= {p, *p.children(recursive=True)}
                except psutil.Error:
                    pass
            left = []
            for p in self.processes() - managed:
                try:
                    if p not in others or any(kernel_id in arg for arg in p.cmdline()):
                        left.append(p)
                except psutil.Error:
                    pass
            if not left:
                return
            time.sleep(0.1)
        described = []
        for p in left:
            try:
                described.append(f"{p.pid} (parent {p.ppid()}): {' '.join(p.cmdline())[:200]}")
            except psutil.Error:
                described.append(str(p))
        raise AssertionError(f"still running after the kernel was shut down: {described}")


def _notebook(path: Path, *sources: str, parameters: str | None = None) -> None:
    cells = []
    if parameters is not None:
        cells.append({"cell_type": "code", "id": "parameters", "metadata": {"tags": ["parameters"]},
                      "execution_count": None, "outputs": [], "source": parameters})
    cells += [{"cell_type": "code", "id": f"c{i}", "metadata": {}, "execution_count": None, "outputs": [],
               "source": source} for i, source in enumerate(sources)]
    nb = {"cells": cells,
          "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                       "language_info": {"name": "python"}},
          "nbformat": 4, "nbformat_minor": 5}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(nb, indent=1))


def _prints_while_it_sleeps(path: Path) -> None:
    """Each cell that sleeps says so first (stdout) and after (stderr): what the widget shows of a running step."""
    nb = json.loads(path.read_text())
    for cell in nb["cells"]:
        source = "".join(cell["source"])
        if "time.sleep(delay)" in source:
            cell["source"] = (source.replace("time.sleep(delay)", "print('sleeping', delay, 's', flush=True)\n"
                                             "time.sleep(delay)\nimport sys\nprint('slept', file=sys.stderr)"))
    path.write_text(json.dumps(nb))


def _grid(folder: Path) -> None:
    """A grid of 12 x 4 = 48 instances of train.ipynb (nbflow.yaml), alpha=5,seed=3 fails; summary reads them all."""
    _notebook(folder / "train.ipynb",
              "if (alpha, seed) == (5, 3):\n    raise ValueError('alpha=5, seed=3 diverges')\n"
              "open(outputs['score'], 'w').write(str(alpha * seed))",
              parameters='inputs = {}\noutputs = {"score": "scores/score.txt"}\nalpha = 0\nseed = 0')
    _notebook(folder / "summary.ipynb", "import os\nopen(outputs['n'], 'w').write(str(len(list(os.walk('scores')))))",
              parameters='inputs = {"scores": "scores/"}\noutputs = {"n": "n.txt"}')
    (folder / "nbflow.yaml").write_text(f"steps:\n  train:\n    grid:\n      alpha: {list(range(12))}\n"
                                        "      seed: [0, 1, 2, 3]\n")


def _chain(folder: Path, n: int = 15) -> None:
    """A chain of n steps, each reading the one before; the last fails."""
    for i in range(1, n + 1):
        reads = f'{{"x": "data/step_{i - 1:02d}.txt"}}' if i > 1 else "{}"
        fail = "raise RuntimeError('the last step fails')\n" if i == n else ""
        _notebook(folder / f"step_{i:02d}_of_the_chain.ipynb",
                  "import os\nos.makedirs('data', exist_ok=True)",
                  fail + f"open(outputs['y'], 'w').write('{i}')",
                  parameters=f'inputs = {reads}\noutputs = {{"y": "data/step_{i:02d}.txt"}}')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    base = tmp_path_factory.mktemp("lab")
    root = base / "root"
    work = root / "class"
    work.mkdir(parents=True)
    for name, fixture in [("slow", "widget_slow_steps"), ("raises", "widget_step_raises"),
                          ("background", "widget_slow_steps"), ("interrupt", "widget_slow_steps"),
                          ("blocking", "widget_slow_steps"), ("nb7", "widget_slow_steps")]:
        shutil.copytree(FIXTURES / fixture, work / name)
    (work / "raises" / "total.ipynb").rename(work / "raises" / f"{LONG_NAME}.ipynb")
    _prints_while_it_sleeps(work / "slow" / "numbers.ipynb")
    _grid(work / "grid")
    _chain(work / "chain")
    _notebook(work / "run_slow.ipynb", 'import nbflow\nresult = nbflow.run("slow")')
    _notebook(work / "run_raises.ipynb", 'import nbflow\nresult = nbflow.run("raises")')
    _notebook(work / "run_grid.ipynb", 'import nbflow\nresult = nbflow.run("grid")')
    _notebook(work / "run_chain.ipynb", 'import nbflow\nresult = nbflow.run("chain")')
    outside = base / "outside"  # a pipeline outside the server's folder: no request file can reach it
    shutil.copytree(FIXTURES / "widget_slow_steps", outside)
    _notebook(work / "run_outside.ipynb",
              f'import nbflow\nresult = nbflow.run({str(outside)!r}, parameters={{"delay": 3}})', NEXT_CELL)
    _notebook(work / "run_nb7.ipynb",
              'import nbflow\nresult = nbflow.run("nb7", parameters={"total.delay": 5})', NEXT_CELL)
    _notebook(work / "run_interrupt.ipynb",
              'import nbflow\nresult = nbflow.run("interrupt", parameters={"delay": 3})\nprint(result.status)',
              NEXT_CELL)
    _notebook(work / "run_blocking.ipynb",
              'import nbflow\nresult = nbflow.run("blocking", parameters={"delay": 3})', NEXT_CELL)
    _notebook(work / "run_background.ipynb",
              'import nbflow\nhandle = nbflow.run("background", parameters={"total.delay": 3}, background=True)',
              'result = handle.wait()\nprint("waited:", result.status)')
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
             "--allow-root", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
             f"--ServerApp.base_url={BASE}"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    started = Lab(f"http://127.0.0.1:{port}{BASE.rstrip('/')}", token, root, server.pid, ipykernel,
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
                "path": f"class/{nb.name}", "name": nb.name, "type": "notebook", "kernel": {"name": "python3"}}),
                work.glob("*.ipynb")))
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
def browser(lab: Lab):
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM))
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def lab_page(lab: Lab, browser):
    """One JupyterLab page for the module, in the class/ folder: loading Lab is the slow part."""
    context = browser.new_context(viewport={"width": 1500, "height": 1000})
    page = context.new_page()
    page.goto(f"{lab.url}/lab/tree/class?token={lab.token}")
    expect(page.locator('.jp-DirListing-item[title^="Name: run_slow.ipynb"]')).to_be_visible(timeout=60_000)
    yield page
    context.close()


@pytest.fixture
def open_notebook(lab: Lab, lab_page: Page):
    """Open a notebook from the file browser; at the end, shut its kernel down from the Kernel menu."""
    running = lab.processes()
    kernels = {k["id"] for k in lab.api("GET", "/api/kernels")}
    opened: list[str] = []

    def open_(name: str) -> Locator:
        opened.append(name)
        return open_in_lab(lab_page, name)

    yield open_
    if not opened:  # the test skipped first
        return
    close_all(lab_page)
    # the notebook's kernel, and those of the notebooks its links opened
    stop = {lab.kernel_id(f"class/{name}") for name in opened}
    stop |= {k["id"] for k in lab.api("GET", "/api/kernels") if k["id"] not in kernels}
    for kernel_id in stop - {None}:
        lab.api("DELETE", f"/api/kernels/{kernel_id}")
    for kernel_id in stop - {None}:
        lab.wait_until_stopped(kernel_id, running)


def shut_down(lab: Lab, notebook: str, others: set[psutil.Process]) -> None:
    """Shut the notebook's kernel down (as Kernel -> Shut Down Kernel does) and wait until nothing of it runs."""
    kernel_id = lab.kernel_id(notebook)
    if kernel_id is not None:
        lab.api("DELETE", f"/api/kernels/{kernel_id}")
        lab.wait_until_stopped(kernel_id, others)


def close_all(page: Page) -> None:
    menu(page, "File", "Close All Tabs")
    for _ in range(5):  # "Save your work?" for a notebook Lab marked changed: no
        discard = page.locator(".jp-Dialog button", has_text=re.compile("^(Discard|Don't Save|No)$"))
        try:
            discard.first.click(timeout=1_000)
        except Exception:  # noqa: BLE001 - no dialog (left)
            break


def open_in_lab(page: Page, name: str, kernel: bool = True) -> Locator:
    page.locator(f'.jp-DirListing-item[title^="Name: {name}"]').dblclick()
    panel = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden):has(.jp-Notebook)")
    expect(page.locator(".lm-TabBar-tab.lm-mod-current .lm-TabBar-tabLabel", has_text=name)).to_be_visible()
    if kernel:
        # For a moment the toolbar reads idle with "No Kernel": running then asks for a kernel.
        expect(panel.locator(".jp-KernelName")).to_have_text(KERNEL, timeout=60_000)
        expect(panel.locator(".jp-Notebook-ExecutionIndicator")).to_have_attribute("data-status", "idle",
                                                                                   timeout=60_000)
    return panel


def menu(page: Page, top: str, item: str) -> None:
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(f"^{top}$")).click()
    page.locator(".lm-Menu-itemLabel", has_text=re.compile(f"^{re.escape(item)}$")).click()


def widget(panel: Locator) -> Locator:
    return panel.locator(".jp-OutputArea-output .nbflow-run").first


def row(panel: Locator, step: str) -> Locator:
    # by the name's tooltip: a sanitizing viewer (an untrusted notebook) drops data- attributes
    return widget(panel).locator(".nbflow-step", has=panel.page.locator(f'.nbflow-name[title="{step}"]'))


def line(panel: Locator, step: str) -> Locator:
    return row(panel, step).locator(".nbflow-line").first


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


def save(panel: Locator) -> None:
    menu(panel.page, "File", "Save Notebook")
    expect(panel.page.locator(".lm-TabBar-tab.lm-mod-current.jp-mod-dirty")).to_have_count(0)


def saved_outputs(lab: Lab, notebook: str) -> list[dict]:
    return json.loads((lab.root / "class" / notebook).read_text())["cells"][0]["outputs"]


def screenshot(target: Locator, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    target.screenshot(path=str(ARTIFACTS / name))


def output_area(panel: Locator) -> Locator:
    return panel.locator(".jp-Cell-outputArea").first


def no_error_text(panel: Locator) -> None:
    expect(panel.locator(".jp-OutputArea-output", has_text="Error displaying widget")).to_have_count(0)
    expect(panel.locator(".jp-OutputArea-output", has_text="model not found")).to_have_count(0)


def expect_opened_in_lab(page: Page, name: str, pages_before: int) -> None:
    """The notebook opened as a tab of this Lab: no browser tab, no 'Cannot open' dialog."""
    expect(page.locator(".lm-TabBar-tab.lm-mod-current .lm-TabBar-tabLabel", has_text=name)).to_be_visible(
        timeout=15_000)
    expect(page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook")).to_be_visible()
    expect(page.locator(".jp-Dialog")).to_have_count(0)
    assert len(page.context.pages) == pages_before


def test_a_run_ends_as_static_html_that_survives_reload_reopening_and_nbconvert(lab: Lab, lab_page: Page, browser,
                                                                               open_notebook):
    panel = open_notebook("run_slow.ipynb")
    menu(panel.page, "Run", "Run All Cells")
    view = widget(panel)
    expect(view).to_be_visible(timeout=30_000)
    expect(panel.locator(".nbflow-widget")).to_have_count(1)  # the live widget (anywidget) while it runs
    numbers = row(panel, "numbers")
    expect(numbers.locator(".nbflow-state")).to_have_text(re.compile("running"), timeout=30_000)
    expect(numbers.locator(".nbflow-cells")).to_have_text(re.compile(r"^[1-9]\d*/\d+$"))  # cell by cell
    expect(numbers.locator(".nbflow-note")).to_contain_text(re.compile(r"running In \[\d\]: "))  # the cell's line
    printed = numbers.locator(".nbflow-printed")  # and the last lines it printed, under the row
    expect(printed).to_contain_text("sleeping 0.5 s")
    expect(printed.locator(".nbflow-stderr").first).to_have_text("slept", timeout=10_000)
    expect(prompt(panel)).to_have_text("[*]:")
    totals = view.locator(".nbflow-totals")
    ticking = totals.inner_text()
    expect(totals).not_to_have_text(ticking, timeout=3_000)  # the timer moves the elapsed time
    expect(prompt(panel)).to_have_text("[*]:")
    screenshot(output_area(panel), "widget-running.png")

    wait_until_cell_done(panel)
    for step in ("numbers", "total"):
        expect(row(panel, step).locator(".nbflow-state")).to_have_text(re.compile("succeeded"))
        expect(row(panel, step).locator(".nbflow-cells")).to_have_text(re.compile(r"^(\d+)/\1$"))
    expect(view.locator(".nbflow-totals")).to_contain_text("2 succeeded")
    expect(view.locator(".nbflow-graph img")).to_be_visible()
    expect(panel.locator(".nbflow-widget")).to_have_count(0)  # replaced by the static HTML
    expect(panel.locator(".nbflow-run-static")).to_have_count(1)
    save(panel)
    [output] = saved_outputs(lab, "run_slow.ipynb")
    assert "application/vnd.jupyter.widget-view+json" not in output["data"]
    assert "succeeded" in "".join(output["data"]["text/html"])
    screenshot(output_area(panel), "widget-succeeded.png")

    # a reload: Lab's URL is the folder's, a relative href would open 'Cannot open' in a new browser tab
    lab_page.reload()
    panel = lab_page.locator(".jp-NotebookPanel:not(.lm-mod-hidden):has(.jp-Notebook)")
    expect(widget(panel)).to_be_visible(timeout=60_000)
    no_error_text(panel)
    expect(panel.locator(".jp-Notebook-ExecutionIndicator")).to_have_attribute("data-status", "idle",
                                                                               timeout=60_000)
    link = row(panel, "numbers").locator("a.nbflow-link")
    expect(link).to_have_text("numbers.ipynb")
    # Jupyter's renderer has taken the link over: it points to the file's download URL, a click opens it in Lab
    expect(link).to_have_attribute("href", re.compile(r"/sub/files/class/slow/_nbflow/runs/[^/]+/numbers\.ipynb"))
    executed = "class/" + (link.get_attribute("data-nbflow-path") or "")
    pages = len(lab_page.context.pages)
    link.click()
    expect_opened_in_lab(lab_page, "numbers.ipynb", pages)

    # saved, the kernel shut down, closed and opened again: the final state, no error
    close_all(lab_page)
    others = lab.processes()
    for notebook in ("class/run_slow.ipynb", executed):
        shut_down(lab, notebook, others)
    panel = open_in_lab(lab_page, "run_slow.ipynb", kernel=False)
    expect(row(panel, "total").locator(".nbflow-state")).to_have_text(re.compile("succeeded"), timeout=30_000)
    no_error_text(panel)
    screenshot(output_area(panel), "widget-reopened-lab.png")

    # Notebook 7, under the same sub-path, in a browser of its own
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    page = context.new_page()
    page.goto(f"{lab.url}/notebooks/class/run_slow.ipynb?token={lab.token}")
    nb7 = page.locator(".jp-NotebookPanel")
    expect(row(nb7, "total").locator(".nbflow-state")).to_have_text(re.compile("succeeded"), timeout=60_000)
    no_error_text(nb7)
    screenshot(nb7.locator(".jp-Cell-outputArea").first, "widget-reopened-notebook7.png")
    with context.expect_page() as opened:  # Notebook 7 opens a document in a browser tab of its own
        row(nb7, "numbers").locator("a.nbflow-link").click()
    opened.value.wait_for_load_state()
    assert re.search(r"/sub/notebooks/class/slow/_nbflow/runs/[^/]+/numbers\.ipynb", opened.value.url), \
        opened.value.url
    expect(opened.value.locator(".jp-Notebook")).to_be_visible(timeout=60_000)
    context.close()

    # nbconvert: the static table, a plain file link
    converted = subprocess.run([sys.executable, "-m", "jupyter", "nbconvert", "--to", "html", "--stdout",
                                str(lab.root / "class" / "run_slow.ipynb")], capture_output=True, text=True,
                               check=True).stdout
    assert "succeeded" in converted and "model not found" not in converted
    assert re.search(r'href="slow/_nbflow/runs/[^/"]+/numbers\.ipynb"', converted)


def test_failure_error_traceback_and_a_narrow_output(lab: Lab, open_notebook):
    panel = open_notebook("run_raises.ipynb")
    menu(panel.page, "Run", "Run All Cells")
    wait_until_cell_done(panel)
    view = widget(panel)
    expect(row(panel, "numbers").locator(".nbflow-state")).to_have_text(re.compile("succeeded"))
    failed = row(panel, LONG_NAME)
    expect(failed.locator(".nbflow-state")).to_have_text(re.compile("failed"))
    expect(failed.locator(".nbflow-cells").first).to_have_text("3/5")  # the cell that raised did not complete
    error = failed.locator(".nbflow-error")
    expect(error).to_contain_text("ValueError: the numbers add up to 55, not 54")
    expect(error).to_contain_text("In [4]: raise")  # as the executed notebook numbers it
    expect(error).to_contain_text('raise ValueError(f"the numbers add up to {sum(numbers)}, not 54")')
    traceback = error.locator(".nbflow-traceback pre")
    expect(traceback).to_be_hidden()  # on demand
    error.locator(".nbflow-traceback summary").click()
    expect(traceback).to_be_visible()
    expect(traceback).to_contain_text("Traceback")
    expect(row(panel, "report").locator(".nbflow-state")).to_have_text(re.compile("not run"))
    expect(view.locator(".nbflow-totals")).to_contain_text("1 failed")
    expect(view.locator(".nbflow-rerun")).to_contain_text(f"nbflow.run('raises', ['{LONG_NAME}', 'report'])")
    link = failed.locator("a.nbflow-link")
    expect(link).to_have_attribute("data-nbflow-path",
                                   re.compile(rf"^raises/_nbflow/runs/[^/]+/{LONG_NAME}\.ipynb$"))
    screenshot(output_area(panel), "widget-failed.png")
    error.locator(".nbflow-traceback summary").click()

    # 350 px of output: every row's state, link and error stay on screen, inside the output
    output = panel.locator(".jp-OutputArea-output").first
    output.evaluate("node => { node.style.width = '350px'; node.style.flex = '0 0 350px'; }")
    bounds = output.bounding_box()
    assert bounds is not None and abs(bounds["width"] - 350) < 1, bounds
    for step in ("numbers", LONG_NAME, "report"):
        for part in (".nbflow-name", ".nbflow-state", "a.nbflow-link", ".nbflow-error"):
            found = row(panel, step).locator(part)
            if found.count() == 0:
                assert part in ("a.nbflow-link", ".nbflow-error") and step != LONG_NAME, (step, part)
                continue
            box = found.first.bounding_box()
            assert box is not None and box["width"] > 0, (step, part)
            assert box["x"] >= bounds["x"] - 0.5 and box["x"] + box["width"] <= bounds["x"] + 350.5, (step, part, box)
    name = row(panel, LONG_NAME).locator(".nbflow-name")
    expect(name).to_have_attribute("title", LONG_NAME)  # cut with an ellipsis, whole in the tooltip
    screenshot(output, "widget-failed-350px.png")
    output.evaluate("node => { node.style.width = ''; node.style.flex = ''; }")

    # handed out: the saved notebook opened by someone else (not trusted here) still reads
    save(panel)
    handout = json.loads((lab.root / "class" / "run_raises.ipynb").read_text())
    handout["metadata"]["handed_out"] = True  # another file: Jupyter has no signature for it
    (lab.root / "class" / "handout.ipynb").write_text(json.dumps(handout))
    page = panel.page
    page.locator(".jp-DirListing-item", has_text="run_grid.ipynb").click()  # the listing refreshes
    copy = open_in_lab(page, "handout.ipynb", kernel=False)
    expect(copy.locator(".jp-OutputArea-output .nbflow-run")).to_be_visible(timeout=30_000)
    expect(row(copy, LONG_NAME).locator(".nbflow-state")).to_contain_text("failed")
    expect(row(copy, LONG_NAME).locator(".nbflow-error")).to_contain_text("ValueError")
    expect(copy.locator(".nbflow-rerun")).to_contain_text("nbflow.run(")  # the call to copy ...
    expect(copy.locator(".nbflow-rerun button")).to_be_hidden()  # ... not a button for another output's kernel
    expect(copy.locator(".nbflow-graph img")).to_be_visible()  # the graph, not its text left behind
    expect(copy.locator(".jp-OutputArea-output", has_text="status: succeeded")).to_have_count(0)
    no_error_text(copy)
    screenshot(output_area(copy), "widget-handout-untrusted.png")
    menu(page, "File", "Close Tab")
    page.locator(".lm-TabBar-tab .lm-TabBar-tabLabel", has_text="run_raises.ipynb").click()

    # the dark theme: the legend takes Jupyter's text colour
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile("^Settings$")).click()
    page.locator(".lm-Menu-itemLabel", has_text=re.compile("^Theme$")).hover()
    page.locator(".lm-Menu-itemLabel", has_text=re.compile("^JupyterLab Dark$")).click()
    expect(page.locator("body[data-jp-theme-light='false']")).to_have_count(1, timeout=15_000)
    expect(page.locator("#jupyterlab-splash")).to_have_count(0, timeout=15_000)  # the theme is in place
    # the run has ended: its graph is an image on a white card, legend included
    expect(view.locator(".nbflow-graph img")).to_be_visible()
    screenshot(output_area(panel), "widget-failed-dark.png")
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile("^Settings$")).click()
    page.locator(".lm-Menu-itemLabel", has_text=re.compile("^Theme$")).hover()
    page.locator(".lm-Menu-itemLabel", has_text=re.compile("^JupyterLab Light$")).click()
    expect(page.locator("body[data-jp-theme-light='true']")).to_have_count(1, timeout=15_000)

    # Rerun failed: a button that makes the call shown beside it, in the kernel, in the background; the rerun's
    # widget takes this output, below the failed run's record
    rerun = view.get_by_role("button", name="↻ Rerun failed")
    expect(rerun).to_be_visible()
    rerun.click()
    output = panel.locator(".jp-OutputArea-output").first
    expect(output.locator(".nbflow-earlier .nbflow-rerun")).to_contain_text("rerun below", timeout=30_000)
    current = output.locator(".nbflow-run").last  # the rerun's
    expect(current.locator(".nbflow-totals")).to_contain_text("1 failed", timeout=30_000)  # it fails again
    expect(current).to_contain_text("the background run ended at")
    expect(current.locator(f'.nbflow-name[title="{LONG_NAME}"]')).to_be_visible()
    expect(current.locator(".nbflow-totals")).to_contain_text("1 not run")
    expect(current.get_by_role("button", name="↻ Rerun failed")).to_be_visible()  # and can be rerun again
    screenshot(output_area(panel), "widget-rerun.png")


def test_cancel_button_stops_a_blocking_run(lab: Lab, open_notebook):
    panel = open_notebook("run_blocking.ipynb")
    menu(panel.page, "Run", "Run All Cells")  # the second cell is queued behind the blocking run
    view = widget(panel)
    expect(row(panel, "numbers").locator(".nbflow-cells")).to_have_text(re.compile(r"^[2-9]/\d+$"), timeout=30_000)
    expect(prompt(panel)).to_have_text("[*]:")
    button = view.get_by_role("button", name="Cancel")
    expect(button).to_be_enabled()  # on ipykernel 7 too: the click goes through the Jupyter server
    screenshot(output_area(panel), "widget-blocking-running.png")
    started = time.time()
    button.click()
    expect(view.get_by_role("button", name="Cancelling…")).to_be_disabled()
    expect(view.locator(".nbflow-runstate")).to_contain_text("cancelled", timeout=30_000)
    assert time.time() - started < 10
    wait_until_cell_done(panel)
    numbers = row(panel, "numbers")
    expect(numbers.locator(".nbflow-state")).to_have_text(re.compile("cancelled"))
    expect(row(panel, "total").locator(".nbflow-state")).to_have_text(re.compile("not started|not run"))
    link = numbers.locator("a.nbflow-link")  # the running step's executed notebook is kept
    expect(link).to_have_attribute("data-nbflow-path", re.compile(r"^blocking/_nbflow/runs/[^/]+/numbers\.ipynb$"))
    expect_next_cell_ran(panel, "cancelled")
    assert not list((lab.root / "class" / "blocking" / "_nbflow").glob("cancel-*"))  # the request is gone
    screenshot(output_area(panel), "widget-blocking-cancelled.png")


def test_cancel_button_stops_a_background_run_while_another_cell_waits(lab: Lab, open_notebook):
    panel = open_notebook("run_background.ipynb")
    page = panel.page
    menu(page, "Run", "Run All Cells")  # cell 1 returns at once; cell 2 waits in handle.wait()
    view = widget(panel)
    expect(row(panel, "total").locator(".nbflow-state")).to_have_text(re.compile("running"), timeout=30_000)
    cells = panel.locator(".jp-Notebook .jp-CodeCell")
    expect(cells.nth(1).locator(".jp-InputArea-prompt")).to_have_text("[*]:")  # the kernel is busy
    expect(panel.locator(".nbflow-widget")).to_have_count(1)  # still the live widget

    # folded to its summary line, it stays folded while the run updates it; Cancel stays within reach. The
    # click is held longer than the updates' interval (the elapsed time changes every second): an update
    # replacing the summary between press and release lost such clicks; it now waits for the release
    title = view.locator("summary.nbflow-header .nbflow-title").bounding_box()
    assert title is not None
    page.mouse.move(title["x"] + 5, title["y"] + title["height"] / 2)
    page.mouse.down()
    page.wait_for_timeout(1_500)
    page.mouse.up()
    expect(row(panel, "total")).to_be_hidden()
    before = view.locator(".nbflow-totals").inner_text()
    expect(view.locator(".nbflow-totals")).not_to_have_text(before, timeout=5_000)  # updated meanwhile
    expect(row(panel, "total")).to_be_hidden()
    expect(view.get_by_role("button", name="Cancel")).to_be_visible()
    box = view.bounding_box()
    assert box is not None and box["height"] < 60, box
    screenshot(output_area(panel), "widget-folded.png")
    view.locator("summary.nbflow-header .nbflow-title").click()
    expect(row(panel, "total")).to_be_visible()

    # a link of the live widget opens the executed notebook as a tab of this Lab
    link = row(panel, "numbers").locator("a.nbflow-link")
    expect(link).to_have_attribute("data-commandlinker-command", "docmanager:open")
    pages = len(page.context.pages)
    link.click()
    expect_opened_in_lab(page, "numbers.ipynb", pages)
    page.locator(".lm-TabBar-tab .lm-TabBar-tabLabel", has_text="run_background.ipynb").click()
    expect(row(panel, "total").locator(".nbflow-state")).to_have_text(re.compile("running"))

    view.get_by_role("button", name="Cancel").click()
    expect(view.get_by_role("button", name="Cancelling…")).to_be_visible()  # at once, not when the kernel is free
    expect(view.locator(".nbflow-runstate")).to_contain_text("cancelled", timeout=30_000)
    expect(row(panel, "numbers").locator(".nbflow-state")).to_have_text(re.compile("succeeded"))
    expect(row(panel, "total").locator(".nbflow-state")).to_have_text(re.compile("cancelled"))
    expect(view.locator(".nbflow-notice")).to_contain_text("the background run ended")
    expect(cells.nth(1).locator(".jp-OutputArea-output")).to_have_text("waited: cancelled", timeout=30_000)
    screenshot(output_area(panel), "widget-background-cancelled.png")


def test_cancel_button_interrupts_the_kernel_for_a_pipeline_outside_the_servers_folder(lab: Lab, open_notebook):
    panel = open_notebook("run_outside.ipynb")
    menu(panel.page, "Run", "Run All Cells")
    view = widget(panel)
    expect(row(panel, "numbers").locator(".nbflow-cells")).to_have_text(re.compile(r"^[2-9]/\d+$"), timeout=30_000)
    button = view.get_by_role("button", name="Cancel")
    expect(button).to_be_enabled()
    button.click()
    expect(view.locator(".nbflow-runstate")).to_contain_text("cancelled", timeout=30_000)
    expect(row(panel, "numbers").locator(".nbflow-state")).to_have_text(re.compile("cancelled"))
    expect_next_cell_ran(panel, "cancelled")


def test_interrupting_the_kernel_cancels_a_blocking_run(lab: Lab, open_notebook):
    """And in a front end with no Jupyter server to go through (VS Code), the button says to interrupt instead."""
    panel = open_notebook("run_interrupt.ipynb")
    page = panel.page
    # as VS Code's page: no Jupyter server configuration for the widget to find (Lab read its own at start)
    page.evaluate("window.__nbflowConfig = document.getElementById('jupyter-config-data');"
                  "window.__nbflowConfig.remove()")
    try:
        menu(page, "Run", "Run All Cells")
        view = widget(panel)
        expect(row(panel, "numbers").locator(".nbflow-cells")).to_have_text(re.compile(r"^[2-9]/\d+$"),
                                                                            timeout=30_000)
        button = view.get_by_role("button")
        if lab.ui_poll:  # nbflow.run waits processing widget messages: the click reaches the kernel
            expect(button).to_have_text("Cancel")
            expect(button).to_be_enabled()
        else:
            expect(button).to_have_text("Interrupt the kernel (■) to cancel")
            expect(button).to_be_disabled()
        screenshot(output_area(panel), "widget-no-server.png")
    finally:
        page.evaluate("document.head.appendChild(window.__nbflowConfig)")
    menu(page, "Kernel", "Interrupt Kernel")
    expect(view.locator(".nbflow-runstate")).to_contain_text("cancelled", timeout=30_000)
    wait_until_cell_done(panel)
    numbers = row(panel, "numbers")
    expect(numbers.locator(".nbflow-state")).to_have_text(re.compile("cancelled"))
    printed = panel.locator(".jp-Cell").first.locator(".jp-OutputArea-output").last  # print(result.status)
    expect(printed).to_have_text("cancelled")
    expect_next_cell_ran(panel, "cancelled")
    screenshot(output_area(panel), "widget-interrupted.png")


def test_a_grid_of_48_instances_is_one_row_and_one_node(lab: Lab, open_notebook):
    panel = open_notebook("run_grid.ipynb")
    menu(panel.page, "Run", "Run All Cells")
    wait_until_cell_done(panel)
    view = widget(panel)
    group = view.locator('.nbflow-group[data-group="train"]')
    expect(group.locator(".nbflow-cells").first).to_have_text("48/48")
    expect(group.locator(".nbflow-state").first).to_contain_text("failed")
    expect(group.locator("summary .nbflow-note")).to_contain_text("1 failed")
    expect(group.locator("summary .nbflow-note")).to_contain_text("47 succeeded")
    rows = group.locator(".nbflow-step")
    expect(rows.first).to_be_hidden()  # folded
    expect(row(panel, "summary").locator(".nbflow-state")).to_have_text(re.compile("not run"))  # the fan-in
    box = view.bounding_box()
    assert box is not None and box["height"] < 400, box  # one line for 48 steps, one for the fan-in, the graph
    picture = view.locator(".nbflow-graph img")  # the run has ended: the graph is an image
    drawn = base64.b64decode((picture.get_attribute("src") or "").split(",", 1)[1]).decode()
    assert drawn.count('class="nbflow-step"') == 2 and "48/48 · 1 failed" in drawn  # the grid, the fan-in
    graph_box = picture.bounding_box()
    assert graph_box is not None and graph_box["width"] <= box["width"] + 0.5
    screenshot(output_area(panel), "widget-grid-folded.png")
    group.locator("summary").first.click()
    expect(rows).to_have_count(48)
    expect(rows.first).to_have_attribute("data-step", "train[alpha=5,seed=3]")  # failures first
    expect(rows.first.locator(".nbflow-error")).to_contain_text("alpha=5, seed=3 diverges")
    screenshot(output_area(panel), "widget-grid-open.png")
    # an instance's executed notebook, named train[alpha=5,seed=3].ipynb, opens as a tab of this Lab
    pages = len(panel.page.context.pages)
    rows.first.locator("a.nbflow-link").click()
    expect_opened_in_lab(panel.page, "train[alpha=5,seed=3].ipynb", pages)


def test_a_long_chain_fits_the_width_with_its_failed_step_in_view(lab: Lab, open_notebook):
    panel = open_notebook("run_chain.ipynb")
    menu(panel.page, "Run", "Run All Cells")
    wait_until_cell_done(panel)
    view = widget(panel)
    expect(view.locator(".nbflow-totals")).to_contain_text("14 succeeded")
    picture = view.locator(".nbflow-graph img")
    natural = picture.evaluate("img => img.naturalWidth")
    area = output_area(panel).bounding_box()
    drawn = picture.bounding_box()
    assert area is not None and drawn is not None
    assert natural > area["width"], (natural, area)  # wider than the output: it had to shrink
    # the whole picture is in view, so its last step, the failed one, is too
    assert drawn["x"] >= area["x"] and drawn["x"] + drawn["width"] <= area["x"] + area["width"] + 0.5
    screenshot(output_area(panel), "widget-chain-15.png")


def test_notebook_7_live_link_and_cancel_during_a_blocking_run(lab: Lab, browser, lab_page: Page):
    """(lab_page: Chromium's own services start with it, before this test counts its processes.)"""
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    page = context.new_page()
    running = lab.processes()
    try:
        page.goto(f"{lab.url}/notebooks/class/run_nb7.ipynb?token={lab.token}")
        panel = page.locator(".jp-NotebookPanel")
        expect(panel.locator(".jp-Notebook-ExecutionIndicator")).to_have_attribute("data-status", "idle",
                                                                                   timeout=60_000)
        menu(page, "Run", "Run All Cells")
        view = widget(panel)
        expect(row(panel, "total").locator(".nbflow-state")).to_have_text(re.compile("running"), timeout=60_000)
        expect(prompt(panel)).to_have_text("[*]:")
        # Notebook 7 opens a document in a browser tab of its own
        link = row(panel, "numbers").locator("a.nbflow-link")
        expect(link).to_have_attribute("data-commandlinker-command", "docmanager:open")
        with context.expect_page() as opened:
            link.click()
        opened.value.wait_for_url(re.compile(r"/sub/notebooks/class/nb7/_nbflow/runs/[^/]+/numbers\.ipynb"),
                                  wait_until="commit")
        opened.value.close()
        expect(row(panel, "total").locator(".nbflow-state")).to_have_text(re.compile("running"))
        button = view.get_by_role("button", name="Cancel")
        expect(button).to_be_enabled()
        screenshot(panel.locator(".jp-Cell-outputArea").first, "widget-notebook7-running.png")
        button.click()
        expect(view.locator(".nbflow-runstate")).to_contain_text("cancelled", timeout=30_000)
        expect(row(panel, "total").locator(".nbflow-state")).to_have_text(re.compile("cancelled"))
        expect_next_cell_ran(panel, "cancelled")
        screenshot(panel.locator(".jp-Cell-outputArea").first, "widget-notebook7-cancelled.png")
    finally:
        context.close()
        stop = {k["id"] for k in lab.api("GET", "/api/kernels")}
        for session in lab.api("GET", "/api/sessions"):
            if session["path"] == "class/run_nb7.ipynb" or "/_nbflow/" in session["path"]:
                lab.api("DELETE", f"/api/kernels/{session['kernel']['id']}")
                lab.wait_until_stopped(session["kernel"]["id"], running)
        assert stop
