"""nbflow as a papermill engine (nbflow/papermill_engine.py), checked against papermill's default engine.

The parity test runs papermill's own test notebooks (tests/notebooks/papermill_parity/)
through `papermill.execute_notebook` twice, with the default engine (nbclient)
and with `engine_name="nbflow"`, and compares the notebooks papermill wrote,
cell by cell, and how each call ended (PapermillExecutionError with the same
cell, ename and evalue; the same timeout). Only what differs between any two
runs is normalised: cell ids, times and durations, the output paths, memory
addresses, and where the kernel split a stream into messages.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import nbclient.exceptions
import papermill as pm
import psutil
import pytest
from papermill.engines import papermill_engines
from papermill.exceptions import PapermillException, PapermillExecutionError

from conftest import FIXTURES, write_notebook
from nbflow import papermill_engine
from nbflow.papermill_engine import NbflowEngine

# integration: runs with the full suite (`pytest -m "slow or not slow"`, what CI runs)
pytestmark = pytest.mark.slow

PARITY = FIXTURES / "papermill_parity"
_ADDRESS = re.compile(r"0x[0-9a-f]{6,16}")
_CELL_FILE = re.compile(r"/tmp/ipykernel_\d+/\d+\.py")  # IPython's name for a cell's code in a traceback

# How papermill's own tests call each notebook (papermill/tests/test_execute.py); kernel_name="python3" for all,
# as there. The notebooks not listed run without parameters.
CALLS: dict[str, dict[str, Any]] = {
    "simple_execute.ipynb": {"parameters": {"msg": "Hello"}},
    "no_parameters.ipynb": {"parameters": {"msg": "Hello"}},
    "s3-simple_notebook.ipynb": {"parameters": {"msg": "Hello"}},
    "nb_version_4.4.ipynb": {"parameters": {"var": "It works"}},
    "blank-vscode.ipynb": {"parameters": {"var": "It works"}},
    "complex_parameters.ipynb": {"parameters": {"msg": "Hello", "a": 3.5}},
    "result_no_exec.ipynb": {"parameters": {"foo": 2, "bar": "world"}},
    "report_mode_test.ipynb": {"parameters": {"a": 0}, "report_mode": True},
    "keyboard_interrupt.ipynb": {"execution_timeout": 1},  # sleep(60): both engines time the cell out
}
# Run in the quick suite; the others are marked slow (each notebook costs a second or two with the default engine).
QUICK = {"simple_execute.ipynb", "broken2.ipynb", "sysexit.ipynb", "sysexit1.ipynb", "keyboard_interrupt.ipynb"}
DIFFERENT: dict[str, str] = {}  # notebook -> why nbflow's result differs (a strict xfail)


@pytest.fixture(autouse=True)
def engine_stopped(no_leaked_processes: None) -> Any:
    """The engine keeps its fork server (and a kernel for the next call) until exit: stop them after each test."""
    yield
    papermill_engine.shutdown()


def notebooks() -> list:
    params = []
    for path in sorted(PARITY.glob("*.ipynb")):
        marks = [] if path.name in QUICK else [pytest.mark.slow]
        if path.name in DIFFERENT:
            marks.append(pytest.mark.xfail(reason=DIFFERENT[path.name], strict=True))
        params.append(pytest.param(path.name, id=path.stem, marks=marks))
    return params


def execute(name: str, engine: str | None, tmp_path: Path) -> tuple[dict, str]:
    """Run one parity notebook with papermill; the notebook it wrote and how the call ended."""
    out = tmp_path / f"{engine or 'default'}-{name}"
    cwd = tmp_path / "cwd"  # read_check.ipynb prints its directory and asserts check.txt is there
    cwd.mkdir(exist_ok=True)
    (cwd / "check.txt").write_text("exists")
    try:
        pm.execute_notebook(str(PARITY / name), str(out), engine_name=engine, kernel_name="python3",
                            progress_bar=False, cwd=str(cwd), **CALLS.get(name, {}))
        ended = "finished"
    except PapermillExecutionError as e:
        ended = f"PapermillExecutionError at cell {e.cell_index} (In [{e.exec_count}]): {e.ename}: {e.evalue}"
    except nbclient.exceptions.CellTimeoutError as e:
        ended = f"CellTimeoutError: {e}"
    return json.loads(out.read_text()), ended


def normalised(nb: dict) -> dict:
    nb = json.loads(json.dumps(nb))
    meta = nb["metadata"]["papermill"]
    for key in ("start_time", "end_time", "duration", "input_path", "output_path"):
        meta[key] = "<normalised>" if meta.get(key) is not None else None
    for cell in nb["cells"]:
        cell.pop("id", None)
        cell.get("metadata", {}).pop("execution", None)  # nbclient's timings; CellRunner's are in test_cells_parity
        cell_meta = cell.get("metadata", {}).get("papermill", {})
        for key in ("start_time", "end_time", "duration"):
            if cell_meta.get(key) is not None:
                cell_meta[key] = "<normalised>"
        if "outputs" in cell:
            cell["outputs"] = normalised_outputs(cell["outputs"])
    return nb


def normalised_outputs(outputs: list[dict]) -> list[dict]:
    def plain(text: str) -> str:
        return _CELL_FILE.sub("<cell>", _ADDRESS.sub("<HEXADDR>", text))

    merged: list[dict] = []
    for output in outputs:
        for key in ("text", "evalue"):
            if key in output:
                output[key] = plain("".join(output[key]))
        if "text/plain" in output.get("data", {}):
            output["data"]["text/plain"] = plain("".join(output["data"]["text/plain"]))
        if "traceback" in output:
            output["traceback"] = [plain(line) for line in output["traceback"]]
        last = merged[-1] if merged else None
        if last and last["output_type"] == output["output_type"] == "stream" and last["name"] == output["name"]:
            last["text"] += output["text"]  # the kernel's flush timer decides where a stream is split
        else:
            merged.append(output)
    return merged


def test_papermill_finds_the_engine_by_its_entry_point() -> None:
    assert papermill_engines.get_engine("nbflow") is NbflowEngine


@pytest.mark.parametrize("name", notebooks())
def test_papermill_writes_the_same_notebook_with_either_engine(name: str, tmp_path: Path) -> None:
    by_default, ended_default = execute(name, None, tmp_path)
    by_nbflow, ended_nbflow = execute(name, "nbflow", tmp_path)
    assert ended_nbflow == ended_default
    assert normalised(by_nbflow) == normalised(by_default)


def test_every_papermill_test_notebook_is_checked_or_left_out_with_a_reason() -> None:
    readme = (PARITY / "README.md").read_text()
    for name in ("binder.ipynb", "notimplemented_translator.ipynb"):
        assert f"`{name}`" in readme
    assert len(list(PARITY.glob("*.ipynb"))) == 22


def test_a_loop_of_calls_forks_every_kernel_from_one_fork_server(tmp_path: Path) -> None:
    nb = write_notebook(tmp_path / "ppid.ipynb", "alpha = 0", "import os\nprint(os.getppid(), alpha)")
    parents = []
    for alpha in range(3):
        done = pm.execute_notebook(str(nb), str(tmp_path / f"out{alpha}.ipynb"), parameters={"alpha": alpha},
                                   engine_name="nbflow", progress_bar=False)
        ppid, seen = done.cells[-1].outputs[0].text.split()
        assert seen == str(alpha)
        parents.append(int(ppid))
    assert len(set(parents)) == 1 and parents[0] != os.getpid()  # not our child: forked by the server
    server = psutil.Process(parents[0])
    assert server.ppid() == os.getpid()


def test_the_notebook_is_saved_when_execution_starts_and_ends_not_after_every_cell(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import papermill.engines
    import papermill.execute

    saves: list[str] = []
    for module in (papermill.engines, papermill.execute):
        original = module.write_ipynb
        monkeypatch.setattr(module, "write_ipynb", lambda nb, path, original=original: (saves.append(path),
                                                                                        original(nb, path)))
    nb = write_notebook(tmp_path / "five.ipynb", "n = 1", *[f"x{i} = {i}" for i in range(5)])
    out = str(tmp_path / "out.ipynb")
    pm.execute_notebook(str(nb), out, engine_name="nbflow", progress_bar=False)
    assert saves == [out] * 3  # notebook_start, notebook_complete, execute_notebook's final write
    saves.clear()
    pm.execute_notebook(str(nb), out, progress_bar=False)
    assert len(saves) == 3 + 2 * 6  # the default engine: also before and after each of the 6 cells


def test_autosave_writes_the_notebook_between_cells_of_a_long_run(tmp_path: Path) -> None:
    nb = write_notebook(tmp_path / "slow.ipynb", None, "import time\nprint('first')", "time.sleep(1.2)", "1")
    out = tmp_path / "out.ipynb"
    seen: list[str] = []

    def watch() -> None:
        while not done.is_set():
            if out.exists() and "first" in out.read_text() and '"status": "running"' not in out.read_text():
                seen.append(out.read_text())
                return
            time.sleep(0.05)

    done = threading.Event()
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        pm.execute_notebook(str(nb), str(out), engine_name="nbflow", progress_bar=False, autosave_cell_every=1)
    finally:
        done.set()
        watcher.join()
    assert seen, "the first cell's output was not saved before the run ended"
    mid_run = json.loads(seen[0])
    assert mid_run["metadata"]["papermill"]["end_time"] is None  # saved while it ran, not the final save


def test_log_output_and_stream_files_get_each_cells_output(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    nb = write_notebook(tmp_path / "talks.ipynb", None, "import sys\nprint('to stdout')",
                        "print('to stderr', file=sys.stderr)", "6 * 7")
    stdout, stderr = io.StringIO(), io.StringIO()
    with caplog.at_level("INFO", logger="papermill"):
        pm.execute_notebook(str(nb), str(tmp_path / "out.ipynb"), engine_name="nbflow", progress_bar=False,
                            log_output=True, stdout_file=stdout, stderr_file=stderr)
    assert stdout.getvalue() == "to stdout\n"
    assert stderr.getvalue() == "to stderr\n"
    logged = [r.getMessage() for r in caplog.records]
    assert "to stdout\n" in logged and "to stderr\n" in logged and "42" in logged


def test_an_nbclient_option_the_engine_does_not_have_is_refused_by_name(tmp_path: Path) -> None:
    nb = write_notebook(tmp_path / "a.ipynb", None, "1")
    with pytest.raises(PapermillException, match="does not take allow_errors"):
        pm.execute_notebook(str(nb), str(tmp_path / "out.ipynb"), engine_name="nbflow", progress_bar=False,
                            allow_errors=True)


def test_a_dead_kernel_is_nbclients_dead_kernel_error(tmp_path: Path) -> None:
    nb = write_notebook(tmp_path / "dies.ipynb", None, "import os\nos._exit(1)", "1")
    with pytest.raises(nbclient.exceptions.DeadKernelError):
        pm.execute_notebook(str(nb), str(tmp_path / "out.ipynb"), engine_name="nbflow", progress_bar=False)
    saved = json.loads((tmp_path / "out.ipynb").read_text())
    assert saved["metadata"]["papermill"]["end_time"] is not None  # saved on the way out


def test_ctrl_c_stops_the_kernel_and_saves_the_notebook(tmp_path: Path) -> None:
    nb = write_notebook(tmp_path / "hangs.ipynb", None, "print('started', flush=True)", "import time\ntime.sleep(60)")
    threading.Timer(2.0, os.kill, (os.getpid(), signal.SIGINT)).start()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        pm.execute_notebook(str(nb), str(tmp_path / "out.ipynb"), engine_name="nbflow", progress_bar=False)
    assert time.monotonic() - started < 30
    saved = json.loads((tmp_path / "out.ipynb").read_text())
    assert "".join(saved["cells"][0]["outputs"][0]["text"]) == "started\n"
    # and no kernel is left: the autouse leak check fails the test otherwise


def _processes_with(marker: str) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get("NBFLOW_TEST_MARKER") == marker:
                found.append(process)
        except psutil.Error:
            pass
    return found


def test_the_papermill_command_line_runs_with_engine_nbflow(tmp_path: Path) -> None:
    ok = write_notebook(tmp_path / "ok.ipynb", "alpha = 0.1", "print(alpha * 2)")
    broken = write_notebook(tmp_path / "broken.ipynb", "alpha = 0.1", "1 / 0")
    papermill = shutil.which("papermill", path=str(Path(sys.executable).parent))
    assert papermill is not None
    marker = uuid.uuid4().hex
    env = {**os.environ, "NBFLOW_TEST_MARKER": marker}

    def run(source: Path, out: Path) -> subprocess.CompletedProcess:
        return subprocess.run([papermill, str(source), str(out), "-p", "alpha", "0.5", "--engine", "nbflow"],
                              capture_output=True, text=True, env=env, timeout=120, check=False)

    done = run(ok, tmp_path / "ok-out.ipynb")
    assert done.returncode == 0, done.stderr
    nb = json.loads((tmp_path / "ok-out.ipynb").read_text())
    assert nb["metadata"]["papermill"]["parameters"] == {"alpha": 0.5}
    injected = [c for c in nb["cells"] if "injected-parameters" in c["metadata"].get("tags", [])]
    assert injected and "alpha = 0.5" in "".join(injected[0]["source"])
    assert "".join(nb["cells"][-1]["outputs"][0]["text"]) == "1.0\n"

    failed = run(broken, tmp_path / "broken-out.ipynb")
    assert failed.returncode == 1
    assert "PapermillExecutionError" in failed.stderr and "ZeroDivisionError" in failed.stderr
    nb = json.loads((tmp_path / "broken-out.ipynb").read_text())
    assert "papermill-error-cell-tag" in nb["cells"][0]["metadata"]["tags"]
    assert "In [3]" in "".join(nb["cells"][0]["source"])  # parameters, injected parameters, 1 / 0
    # the fork server and every kernel it forked went with the papermill process
    deadline = time.monotonic() + 10
    while _processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _processes_with(marker)


@pytest.mark.slow
def test_the_benchmark_times_both_engines_in_one_process(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, str(FIXTURES.parent.parent / "benchmarks" / "run.py"), "--smoke", "--only",
                           "engine", "--work", str(tmp_path / "work"), "--json", str(out)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    [row] = results["rows"]
    assert row["workload"] == "2 papermill.execute_notebook calls, engine nbflow"
    raw = results["raw"]["papermill_engine"]
    assert len(raw["default"]) == len(raw["nbflow"]) == 2
