"""Watch mode (nbflow.watch, `nbflow run --watch`): real edits to files of a temporary pipeline, on disk."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from rich.console import Console

import nbflow
from nbflow import watcher as watch_module
from nbflow.errors import NbflowError
from nbflow.events import RunStatus, StepStatus, WatchCycleFinished, WatchCycleStarted, WatchStopped
from nbflow.graph import build_graph
from nbflow.ui.log import WatchLog
from nbflow.ui.terminal import WatchProgress
from nbflow.ui.watch_widget import WatchWidget

# integration: runs with the full suite (`pytest -m "slow or not slow"`, what CI runs)
pytestmark = pytest.mark.slow

NBFLOW = str(Path(sys.executable).parent / "nbflow")


def wait_until(predicate, timeout: float = 60.0, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def edit_code(path: Path, cell: int, source: str) -> None:
    """Save a notebook with one code cell's source changed, in place, as Jupyter's contents manager writes it."""
    nb = json.loads(path.read_text())
    nb["cells"][cell]["source"] = source
    with open(path, "w", encoding="utf-8") as f:  # truncate and write: a reader may see it half-written
        f.write(json.dumps(nb, indent=1))


@pytest.fixture
def pipeline(tmp_path, notebook_factory):
    """raw.csv -> load (imports helpers.py) -> report; a pipeline of its own (nbflow.yaml)."""
    root = tmp_path / "pipe"
    root.mkdir()
    (root / "nbflow.yaml").write_text("jobs: 1\n")
    (root / "raw.csv").write_text("1,2,3\n")
    (root / "helpers.py").write_text("def double(x):\n    return 2 * x\n")
    notebook_factory(root / "load.ipynb", 'inputs = {"raw": "raw.csv"}\noutputs = {"n": "data/n.txt"}',
                     "import os\nos.makedirs('data', exist_ok=True)",
                     'open(outputs["n"], "w").write(str(len(open(inputs["raw"]).read().split(","))))')
    notebook_factory(root / "report.ipynb", 'inputs = {"n": "data/n.txt"}\noutputs = {"r": "report.txt"}',
                     "from helpers import double",
                     'open(outputs["r"], "w").write(str(double(int(open(inputs["n"]).read()))))')
    return root


class Recorder:
    """Keeps every event a watch gives its listeners."""

    def __init__(self):
        self.events = []
        self.lock = threading.Lock()

    def __call__(self, event):
        with self.lock:
            self.events.append(event)

    def of(self, kind):
        with self.lock:
            return [e for e in self.events if isinstance(e, kind)]

    @property
    def finished(self) -> list[WatchCycleFinished]:
        return self.of(WatchCycleFinished)


@pytest.fixture
def watching():
    """Start watches that are stopped, whatever happens, at the end of the test."""
    handles = []

    def start(root: Path, **options):
        recorder = Recorder()
        handle = nbflow.watch(root, listeners=[recorder, *options.pop("listeners", [])], display=False, **options)
        handles.append(handle)
        return handle, recorder

    yield start
    for handle in handles:
        handle.stop()
        handle.wait(timeout=60)


def test_a_watch_reruns_what_each_edit_makes_stale_and_only_that(pipeline, watching):
    handle, seen = watching(pipeline)
    wait_until(lambda: len(seen.finished) == 1, what="the first cycle")
    first = seen.finished[0]
    assert first.changed == () and first.reran == ("load", "report") and first.result.ok
    assert (pipeline / "report.txt").read_text() == "6"

    # the notebook: cell 3 of load now counts lines, not commas
    edit_code(pipeline / "load.ipynb", 2, 'open(outputs["n"], "w").write(str(len(open(inputs["raw"]).read()) * 0 + 4))')
    wait_until(lambda: len(seen.finished) == 2, what="the cycle after a notebook save")
    assert seen.finished[1].changed == ("load.ipynb",)
    assert seen.finished[1].reran == ("load", "report") and (pipeline / "report.txt").read_text() == "8"

    # an imported project module: only its importer reruns
    (pipeline / "helpers.py").write_text("def double(x):\n    return 3 * x\n")
    wait_until(lambda: len(seen.finished) == 3, what="the cycle after a module edit")
    assert seen.finished[2].changed == ("helpers.py",) and seen.finished[2].reran == ("report",)
    assert (pipeline / "report.txt").read_text() == "12"

    # a declared input: a cycle, in which nothing is stale when its content is the same
    os.utime(pipeline / "raw.csv")
    (pipeline / "raw.csv").write_text("1,2,3\n")
    wait_until(lambda: len(seen.finished) == 4, what="the cycle after an input edit")
    assert seen.finished[3].changed == ("raw.csv",) and seen.finished[3].reran == ()
    assert seen.finished[3].result.ok and seen.finished[3].result.steps["load"].status == StepStatus.SKIPPED

    # what the runs wrote (data/n.txt, report.txt, _nbflow/) started no cycle of its own
    time.sleep(1.0)
    assert len(seen.finished) == 4
    assert [c.number for c in seen.of(WatchCycleStarted)] == [1, 2, 3, 4]
    assert handle.cycles == seen.finished

    handle.stop()
    assert handle.wait(timeout=60) and handle.done
    assert seen.of(WatchStopped) == [WatchStopped(4)]
    assert len(nbflow.history(pipeline)) == 4  # each cycle is an ordinary run in the ledger


def test_a_save_storm_is_one_cycle(pipeline, watching):
    handle, seen = watching(pipeline)
    wait_until(lambda: len(seen.finished) == 1, what="the first cycle")
    for i in range(6):  # an editor saving as you type, and a formatter after it
        edit_code(pipeline / "report.ipynb", 1, f"from helpers import double  # {i}")
        time.sleep(0.02)
    wait_until(lambda: len(seen.finished) == 2, what="the storm's cycle")
    time.sleep(1.0)
    assert len(seen.finished) == 2
    assert seen.finished[1].changed == ("report.ipynb",) and seen.finished[1].reran == ("report",)


def test_an_edit_during_a_run_queues_exactly_one_more_cycle(pipeline, watching):
    edit_code(pipeline / "load.ipynb", 1, "import os, time\nos.makedirs('data', exist_ok=True)\ntime.sleep(1.5)")
    handle, seen = watching(pipeline)
    wait_until(lambda: any(getattr(e, "step", None) == "load" and type(e).__name__ == "CellStarted"
                           for e in seen.events), what="load running")
    for i in range(3):  # saved three times while the first cycle runs
        edit_code(pipeline / "report.ipynb", 1, f"from helpers import double  # edit {i}")
        time.sleep(0.3)
    assert not seen.finished  # never two runs at once: the first one is still going
    wait_until(lambda: len(seen.finished) == 2, what="the queued cycle")
    time.sleep(1.0)
    assert len(seen.finished) == 2
    assert seen.finished[1].changed == ("report.ipynb",)
    # the first run read report.ipynb when it started it (or after): the queued one reruns what it still finds stale
    assert seen.finished[1].result.ok
    starts = [e for e in seen.events if isinstance(e, (WatchCycleStarted, WatchCycleFinished))]
    assert [type(e).__name__ for e in starts] == ["WatchCycleStarted", "WatchCycleFinished"] * 2


def test_a_notebook_saved_half_way_is_that_cycles_error_and_the_watch_goes_on(pipeline, watching):
    handle, seen = watching(pipeline)
    wait_until(lambda: len(seen.finished) == 1, what="the first cycle")
    good = (pipeline / "report.ipynb").read_text()
    (pipeline / "report.ipynb").write_text(good[: len(good) // 2])  # what a reader may catch mid-save
    wait_until(lambda: len(seen.finished) == 2, what="the cycle with the broken notebook")
    broken = seen.finished[1]
    assert broken.result is None and "report.ipynb" in broken.error and "not valid notebook JSON" in broken.error
    assert not handle.done
    (pipeline / "report.ipynb").write_text(good.replace("double  #", "double #"))
    edit_code(pipeline / "report.ipynb", 1, "from helpers import double  # whole again")
    wait_until(lambda: len(seen.finished) >= 3 and seen.finished[-1].result is not None, what="the repaired cycle")
    assert seen.finished[-1].result.ok and "report" in seen.finished[-1].reran


def test_stop_during_a_run_cancels_it_and_ends_the_watch_cleanly(pipeline, watching):
    edit_code(pipeline / "load.ipynb", 1, "import time\ntime.sleep(60)")
    handle, seen = watching(pipeline)
    wait_until(lambda: any(type(e).__name__ == "CellStarted" and e.index == 2 for e in seen.events),
               what="the sleeping cell")
    handle.stop()
    assert handle.wait(timeout=60)
    (cycle,) = seen.finished
    assert cycle.result.status == RunStatus.CANCELLED and cycle.reran == ("load",)
    assert seen.of(WatchStopped) == [WatchStopped(1)]
    assert nbflow.history(pipeline).status.iloc[0] == "cancelled"


def test_what_a_watch_follows_and_what_never_starts_a_cycle(pipeline, tmp_path, notebook_factory):
    outside = tmp_path / "shared"
    outside.mkdir()
    (outside / "lookup.csv").write_text("x\n")
    (outside / "parts").mkdir()
    notebook_factory(pipeline / "extra.ipynb", 'inputs = {"l": "../shared/lookup.csv", "p": "../shared/parts/"}',
                     "pass")
    followed = watch_module.follow(build_graph(pipeline), pipeline)
    assert pipeline / "helpers.py" in followed.files and pipeline / "nbflow.yaml" in followed.files
    assert outside / "lookup.csv" in followed.files and outside / "parts" in followed.folders
    assert followed.recursive_roots == (outside / "parts", pipeline) or set(followed.recursive_roots) == {
        outside / "parts", pipeline}
    assert followed.flat_roots == (outside,)
    counts = followed.counts
    assert counts(pipeline / "load.ipynb") and counts(pipeline / "sub" / "new.ipynb")
    assert counts(outside / "lookup.csv") and counts(outside / "parts" / "p1.csv")
    assert counts(pipeline / "raw.csv") and counts(pipeline / "helpers.py")
    assert not counts(outside / "other.csv") and not counts(pipeline / "notes.txt")
    for ignored in ("_nbflow/runs/r/load.ipynb", ".ipynb_checkpoints/load-checkpoint.ipynb",
                    "__pycache__/helpers.cpython-311.pyc", ".~load.ipynb", "sub/.hidden.ipynb"):
        assert not counts(pipeline / ignored), ignored
    # a declared output (also an input of report): written during a cycle -> the cycle's own write
    out = pipeline / "data" / "n.txt"
    out.parent.mkdir()
    out.write_text("3")
    now = time.time()
    assert not counts(out, [(now - 1, now)])
    assert counts(out, [(now - 100, now - 50)])  # modified at another time: by someone else
    out.unlink()
    assert counts(out, [(now - 1, now)])  # deleted: the step's output is missing, it must rerun


def test_the_terminal_says_per_cycle_what_changed_and_what_reran(pipeline, watching):
    screen = io.StringIO()
    handle, seen = watching(pipeline, listeners=[WatchProgress(Console(file=screen, force_terminal=True, width=120))])
    wait_until(lambda: len(seen.finished) == 1, what="the first cycle")
    (pipeline / "helpers.py").write_text("def double(x):\n    return 5 * x\n")
    wait_until(lambda: len(seen.finished) == 2, what="the second cycle")
    handle.stop()
    handle.wait(timeout=60)
    log = io.StringIO()
    for event in seen.events:  # off a terminal, the same events as log lines
        WatchLog(log)(event)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.getvalue())
    assert re.search(r"\d\d:\d\d:\d\d cycle 1: running what is stale", text)
    assert re.search(r"cycle 1: ✔ reran load, report: succeeded in [\d.]+ s", text)
    assert re.search(r"cycle 2: changed helpers.py", text)
    assert re.search(r"cycle 2: ✔ reran report: succeeded in [\d.]+ s, 1 fresh", text)
    assert "watching 6 files and folders for changes (Ctrl-C stops)" in text
    assert "watch stopped after 2 cycle(s)" in text
    lines = log.getvalue().splitlines()
    assert any(line.endswith("cycle 2: changed helpers.py") for line in lines)
    assert not any("load: skipped" in line for line in lines)  # fresh steps stay out of a watch's log


def test_the_widget_shows_cycles_and_its_stop_button_ends_the_watch(pipeline, watching, monkeypatch):
    monkeypatch.delenv("JPY_SESSION_NAME", raising=False)
    widget = WatchWidget(pipeline)
    handle, seen = watching(pipeline, listeners=[widget])
    widget.attach(handle.stop)
    wait_until(lambda: len(seen.finished) == 1, what="the first cycle")
    assert widget.model.controls["label"] == "Stop watching" and widget.model.controls["attached"]
    edit_code(pipeline / "report.ipynb", 1, "from helpers import double  # widget")
    wait_until(lambda: len(seen.finished) == 2, what="the second cycle")
    body = widget.model.body
    assert "watching for changes" in body
    assert re.search(r"cycle 2</span> · changed report.ipynb · <span[^>]*>✔ reran report: succeeded", body)
    assert "cycle 1</span> · running what is stale" in body
    assert 'data-step="report"' in body and 'data-status="succeeded"' in body  # the latest run's rows
    widget._on_message(None, {"cancel": True}, None)  # the Stop button's click, as the front end sends it
    assert handle.wait(timeout=60)
    assert widget.state == "stopped" and widget.model.controls["finished"]
    static = widget.static_html()
    assert "nbflow watch" in static and "stopped" in static and "<style>" in static


def test_the_stop_request_file_ends_the_watch(pipeline, watching, monkeypatch):
    monkeypatch.setattr("nbflow.ui.watch_widget.TICK_S", 0.05)
    widget = WatchWidget(pipeline)
    handle, seen = watching(pipeline, listeners=[widget])
    widget.attach(handle.stop)
    wait_until(lambda: len(seen.finished) == 1, what="the first cycle")
    widget.stop_file.write_text("stop\n")  # what the front end writes through the Jupyter server
    assert handle.wait(timeout=60)
    assert not widget.stop_file.exists()


def test_cli_watch_cycles_until_ctrl_c_and_exits_0(pipeline):
    proc = subprocess.Popen([NBFLOW, "run", str(pipeline), "--watch"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        wait_until(lambda: any("watching" in line for line in lines), what="the first cycle's end")
        edit_code(pipeline / "report.ipynb", 1, "from helpers import double  # cli")
        wait_until(lambda: sum("watching" in line for line in lines) == 2, what="the second cycle's end")
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    reader.join(timeout=10)
    assert proc.returncode == 0, proc.stderr.read()
    text = "".join(lines)
    assert "cycle 1: running what is stale" in text and "cycle 2: changed report.ipynb" in text
    assert "cycle 2: ✔ reran report: succeeded" in text and "watch stopped after 2 cycle(s)" in text


def test_cli_watch_refuses_json_and_force(pipeline):
    for extra in (["--json"], ["--force"]):
        done = subprocess.run([NBFLOW, "run", str(pipeline), "--watch", *extra], capture_output=True, text=True)
        assert done.returncode == 2 and "--watch" in done.stderr


def test_without_watchfiles_the_error_names_the_extra(pipeline, monkeypatch):
    monkeypatch.setitem(sys.modules, "watchfiles", None)
    with pytest.raises(NbflowError, match=r'pip install "nbflow\[watch\]"'):
        nbflow.watch(pipeline, display=False)
