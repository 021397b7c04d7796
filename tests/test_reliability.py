"""Execution faults: every way a run can go wrong loses no work and says what happened.

One test (or more) per line of the reliability catalogue (issue 6): a cell that
raises, transient failures and retries, hangs and timeouts, dying kernels,
Ctrl-C / SIGTERM, nbflow itself killed, a second concurrent run, half-written
outputs, secrets, and a `_nbflow/` that is read-only or full. Fixture pipelines
are in tests/notebooks/<behaviour>/. Signals are sent to a real `nbflow run`
subprocess once its step is running (seen in the ledger and by a marker file
the notebook writes).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import nbformat
import psutil
import pytest
from click.testing import CliRunner

import nbflow
from nbflow.cli import main as cli_main
from nbflow.errors import StateError
from nbflow.events import (
    MAX_EVALUE,
    MAX_TRACEBACK,
    CellFinished,
    RunFinished,
    RunResult,
    RunStarted,
    RunStatus,
    StepError,
    StepFailed,
    StepNotRun,
    StepStarted,
)
from nbflow.executed import ERROR_MARKER_TAG
from nbflow.state import Ledger, LedgerRecorder

NBFLOW = [sys.executable, "-m", "nbflow.cli"]


# -- helpers ------------------------------------------------------------------------------------

def statuses(result) -> dict[str, str]:
    return {name: s.status.value for name, s in result.steps.items()}


def cli(*args: str):
    result = CliRunner().invoke(cli_main, [str(a) for a in args], catch_exceptions=False)
    return result


def query(root: Path, sql: str, *params) -> list[tuple]:
    conn = sqlite3.connect(root / "_nbflow" / "history.sqlite")
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def step_rows(root: Path, run_id: str) -> list[dict]:
    ledger = Ledger(root / "_nbflow", create=False)
    try:
        return ledger.step_runs(run_id)
    finally:
        ledger.close()


def wait_for(predicate, what: str, timeout: float = 90.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def read_pids(path: Path) -> list[int]:
    return [int(p) for p in path.read_text().split()]


def running(pid: int) -> bool:
    """Is `pid` a live process (zombies waiting to be reaped do not count)?"""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_gone(pids, what: str, timeout: float = 15.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and any(running(p) for p in pids):
        time.sleep(0.05)
    alive = [p for p in pids if running(p)]
    for p in alive:
        with contextlib.suppress(psutil.Error):
            psutil.Process(p).kill()
    assert not alive, f"{what} still running: {alive}"


def start_run(root: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`nbflow run ROOT ARGS` in its own session, as a terminal would start it; output to files."""
    out = open(root.parent / f"{root.name}.stdout", "w")  # noqa: SIM115 - closed by finish()
    err = open(root.parent / f"{root.name}.stderr", "w")  # noqa: SIM115
    proc = subprocess.Popen([*NBFLOW, "run", str(root), *args], stdout=out, stderr=err, start_new_session=True,
                            env={**os.environ, "NO_COLOR": "1", **(env or {})})
    proc.files = (out, err)  # type: ignore[attr-defined]
    return proc


def finish(proc: subprocess.Popen, root: Path, timeout: float = 90.0) -> tuple[int, str, str]:
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail("nbflow run did not end")
    for f in proc.files:  # type: ignore[attr-defined]
        f.close()
    return (code, (root.parent / f"{root.name}.stdout").read_text(),
            (root.parent / f"{root.name}.stderr").read_text())


def wait_until_slow_step_runs(root: Path, proc: subprocess.Popen) -> tuple[str, list[int]]:
    """Wait until the `slow` step's kernel is inside its long cell; return the run id and kernel+child pids."""
    def step_running():
        if proc.poll() is not None:
            pytest.fail(f"nbflow run ended early with exit code {proc.returncode}")
        if not (root / "started.marker").exists() or not (root / "_nbflow" / "history.sqlite").exists():
            return None
        rows = query(root, "SELECT run_id FROM step_runs WHERE step='slow' AND status='running'")
        return rows[0][0] if rows else None

    run_id = wait_for(step_running, "the slow step to be running")
    return run_id, read_pids(root / "slow.pids")


def executed_notebook(root: Path, rel: str) -> nbformat.NotebookNode:
    nb = nbformat.read(root / rel, as_version=4)
    nbformat.validate(nb)
    return nb


def text_of(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*.ipynb")
            if "_nbflow" not in p.parts}


@pytest.fixture
def private_tempdir(monkeypatch):
    """A temp folder of the test's own for nbflow and the processes it starts (TMPDIR).

    Short, unlike tmp_path: the kernels' Unix socket paths inside it must stay under 108 bytes.
    """
    folder = Path(tempfile.mkdtemp(prefix="nbflow-test-"))
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    monkeypatch.setenv("TMPDIR", str(folder))
    yield folder
    import shutil

    shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def mounted(target: Path, *args: str):
    """Mount something on `target` for the test (needs root and CAP_SYS_ADMIN; else the test is skipped)."""
    target.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", *args, str(target)], check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount here ({proc.stderr.strip() or proc.returncode}); "
                    "test_ledger_write_failure_stops_the_run_cleanly simulates the same failure without mount")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=True)


# -- a cell raises --------------------------------------------------------------------------------

def test_cell_raises_fails_the_step_keeps_its_notebook_and_says_where(fixture_pipeline):
    root = fixture_pipeline("cell_raises")
    sources = snapshot(root)
    events = []
    result = nbflow.run(root, listeners=[events.append], jobs=1, display=False)

    assert statuses(result) == {"extract": "succeeded", "sidecar": "succeeded", "transform": "failed",
                                "report": "not_run"}
    assert result.status.value == "failed" and not result.ok
    error = result.steps["transform"].error
    assert (error.kind, error.ename, error.evalue, error.cell) == ("exception", "ValueError", "bad row 2", 4)
    assert error.source_line == 'raise ValueError(f"bad row {numbers[1]}")'
    assert error.summary() == "ValueError: bad row 2 (In [4])"

    # the widget's events carry the error and the failing cell
    failed = [e for e in events if isinstance(e, StepFailed)]
    assert [(e.step, e.error.ename, e.error.evalue, e.error.cell) for e in failed] == [
        ("transform", "ValueError", "bad row 2", 4)]
    assert failed[0].notebook == result.steps["transform"].notebook
    assert [(e.cell, e.ok) for e in events if isinstance(e, CellFinished) and e.step == "transform"] == [
        (1, True), (2, True), (3, True), (4, False)]
    assert [(e.step, e.because) for e in events if isinstance(e, StepNotRun)] == [("report", "transform")]

    # the executed notebook: papermill's banner on top, the anchor before the failing cell, partial outputs
    nb = executed_notebook(root, result.steps["transform"].notebook)
    banner = nb.cells[0]
    assert banner.cell_type == "markdown" and ERROR_MARKER_TAG in banner.metadata.tags
    assert "**nbflow:** ValueError: bad row 2 (In [4])" in banner.source
    failing = next(i for i, c in enumerate(nb.cells) if c.source.startswith("raise ValueError"))
    assert 'id="papermill-error-cell"' in nb.cells[failing - 1].source
    assert nb.cells[failing].metadata.papermill.status == "failed"
    assert nb.cells[failing].metadata.papermill.exception is True
    assert [o.ename for o in nb.cells[failing].outputs if o.output_type == "error"] == ["ValueError"]
    assert "read 3 numbers" in text_of(nb.cells[failing - 2])  # the cell before ran, its output is kept
    assert nb.cells[failing + 1].metadata.papermill.status == "pending"  # never ran
    assert nb.metadata.papermill.exception is True

    # the ledger
    rows = {r["step"]: r for r in step_rows(root, result.run_id)}
    t = rows["transform"]
    assert (t["status"], t["error_kind"], t["error_name"], t["error_value"], t["error_cell"]) == (
        "failed", "exception", "ValueError", "bad row 2", 4)
    assert t["notebook"] == result.steps["transform"].notebook and "ValueError" in t["error_traceback"]
    assert t["files"] == []  # a failed step records no output
    assert rows["report"]["status"] == "not_run"
    assert rows["report"]["reasons"] == ["upstream transform did not succeed"]
    assert not (root / "clean.txt").exists() and (root / "side.txt").read_text() == "independent"
    assert snapshot(root) == sources  # the source notebooks are never modified


def test_cell_raises_is_reported_in_json_with_exit_code_1(fixture_pipeline):
    root = fixture_pipeline("cell_raises")
    result = cli("run", root, "--json", "-j", "2")
    assert result.exit_code == 1
    out = json.loads(result.stdout)  # nothing but the JSON object on stdout
    steps = {s["name"]: s for s in out["steps"]}
    assert out["status"] == "failed"
    assert steps["transform"]["status"] == "failed"
    assert steps["transform"]["notebook"] == f"_nbflow/runs/{out['run_id']}/transform.ipynb"
    assert steps["transform"]["error"] == {
        "kind": "exception", "ename": "ValueError", "evalue": "bad row 2", "cell": 4, "execution_count": 4,
        "source_line": 'raise ValueError(f"bad row {numbers[1]}")', "message": "ValueError: bad row 2 (In [4])"}
    assert steps["report"]["status"] == "not_run" and steps["report"]["error"] is None
    assert steps["sidecar"]["status"] == steps["extract"]["status"] == "succeeded"


@pytest.mark.slow
def test_a_failing_cell_that_printed_30_mb_leaves_a_small_ledger_and_bounded_errors(fixture_pipeline):
    root = fixture_pipeline("loud_failure")
    result = cli("run", root, "--json")
    assert result.exit_code == 1
    error = json.loads(result.stdout)["steps"][0]["error"]
    assert error == {"kind": "exception", "ename": "ValueError", "evalue": "failed after printing 30 MB", "cell": 2,
                     "execution_count": 2,
                     "source_line": 'raise ValueError(f"failed after printing {megabytes} MB")',
                     "message": "ValueError: failed after printing 30 MB (In [2])"}
    assert len(result.stdout) < 2_000

    ledger = root / "_nbflow" / "history.sqlite"
    assert ledger.stat().st_size < 1_000_000  # was 31 MB: the error held everything the cell printed
    row = step_rows(root, json.loads(result.stdout)["run_id"])[0]
    assert row["error_value"] == "failed after printing 30 MB"
    assert "xxxxxxxxxx" not in row["error_traceback"]  # the kernel's traceback, not the cell's output
    assert row["error_traceback"].rstrip().endswith("ValueError: failed after printing 30 MB")
    assert "----> 2 raise ValueError" in row["error_traceback"]
    shown = cli("show", root, "latest")
    assert shown.exit_code == 0 and len(shown.stdout) < 2_000
    report = root.parent / "report.html"
    assert cli("report", root, "-o", report).exit_code == 0
    assert report.stat().st_size < 1_000_000

    nb = executed_notebook(root, row["notebook"])  # all of it is kept where it belongs
    failing = next(c for c in nb.cells if c.cell_type == "code" and c.source.startswith("print("))
    printed = "".join(o.text for o in failing.outputs if o.output_type == "stream")
    assert printed == "x" * 30_000_000 + "\n"
    assert [o.evalue for o in failing.outputs if o.output_type == "error"] == ["failed after printing 30 MB"]


def test_a_step_error_is_bounded_and_says_where_the_rest_is():
    huge = StepError("exception", "ValueError", "v" * 30_000_000, 2, "line one\n" + "w" * 1_000,
                     "t" * 30_000_000 + "\nValueError: the end")
    assert len(huge.evalue) <= MAX_EVALUE and huge.evalue.startswith("v" * 1_000)
    assert huge.evalue.endswith("more characters cut; the executed notebook has all of them]")
    assert len(huge.traceback) <= MAX_TRACEBACK and huge.traceback.endswith("\nValueError: the end")
    assert huge.traceback.startswith("[") and "characters cut here; the executed notebook has the full output]\n" \
        in huge.traceback
    assert huge.source_line == "line one"
    assert len(huge.summary()) < MAX_EVALUE + 100 and len(json.dumps(huge.to_json())) < 2 * MAX_EVALUE + 500
    again = StepError(huge.kind, huge.ename, huge.evalue, huge.cell, huge.source_line, huge.traceback)
    assert again == huge  # bounding what is bounded changes nothing (the report rebuilds errors from the ledger)
    long_line = StepError("exception", "E", "", source_line="z" * 1_000).source_line
    assert long_line is not None and len(long_line) == 300 and long_line.endswith("…")

    # a secret is masked before the cut, so a cut cannot leave a piece of it
    secret = "s3cr3t-VALUE"
    keep = StepError("exception", "E", "a" * 12_000).evalue.index(" [... ")
    through_the_secret = "a" * (keep - 5) + secret + "b" * (12_000 - keep + 5 - len(secret))
    assert "s3cr3" in StepError("exception", "E", through_the_secret).evalue
    assert "s3cr3" not in StepError("exception", "E", through_the_secret, secrets=(secret,)).evalue
    assert StepError("exception", "E", "x s3cr3t-VALUE y", secrets=("s3cr3t", secret)).evalue == "x *** y"


def test_fail_fast_starts_no_new_step_after_a_failure(tmp_path, notebook_factory):
    root = tmp_path / "ff"
    notebook_factory(root / "a_fails.ipynb", 'outputs = {}', 'raise RuntimeError("first step breaks")')
    notebook_factory(root / "b_independent.ipynb", 'outputs = {"o": "b.txt"}', 'open(outputs["o"], "w").write("b")')
    notebook_factory(root / "c_independent.ipynb", 'outputs = {"o": "c.txt"}', 'open(outputs["o"], "w").write("c")')
    result = cli("run", root, "--fail-fast", "-j", "1", "--json")
    assert result.exit_code == 1
    steps = {s["name"]: s["status"] for s in json.loads(result.stdout)["steps"]}
    assert steps == {"a_fails": "failed", "b_independent": "not_run", "c_independent": "not_run"}
    assert not (root / "b.txt").exists() and not (root / "c.txt").exists()
    run_id = json.loads(result.stdout)["run_id"]
    reasons = {r["step"]: r["reasons"] for r in step_rows(root, run_id)}
    assert reasons["b_independent"] == reasons["c_independent"] == ["--fail-fast: another step failed"]


# -- transient failures ---------------------------------------------------------------------------

def test_transient_failures_are_retried_with_backoff_and_every_attempt_is_kept(fixture_pipeline):
    root = fixture_pipeline("transient")
    events = []
    result = nbflow.run(root, listeners=[events.append], jobs=2, display=False)

    assert statuses(result) == {"always_fails": "failed", "flaky": "succeeded"}
    assert result.steps["flaky"].attempts == 3 and result.steps["always_fails"].attempts == 2
    assert (root / "flaky.txt").read_text() == "ok after 3 attempts"

    # retry_delay 0.05 doubles after each failed attempt; the last attempt is not retried
    failed = [(e.step, e.attempt, e.will_retry, e.retry_in_s) for e in events if isinstance(e, StepFailed)]
    assert sorted(failed) == [("always_fails", 1, True, 0.05), ("always_fails", 2, False, 0.0),
                              ("flaky", 1, True, 0.05), ("flaky", 2, True, 0.1)]
    assert sorted((e.step, e.attempt) for e in events if isinstance(e, StepStarted)) == [
        ("always_fails", 1), ("always_fails", 2), ("flaky", 1), ("flaky", 2), ("flaky", 3)]

    # every attempt is one ledger row, pointing at its own executed notebook
    rows = step_rows(root, result.run_id)
    flaky = [(r["attempt"], r["status"], r["notebook"]) for r in rows if r["step"] == "flaky"]
    run_dir = f"_nbflow/runs/{result.run_id}"
    attempts = f"_nbflow/attempts/{result.run_id}"  # outside runs/<id>/: no step name can collide with it
    assert flaky == [(1, "failed", f"{attempts}/attempt-1/flaky.ipynb"),
                     (2, "failed", f"{attempts}/attempt-2/flaky.ipynb"),
                     (3, "succeeded", f"{run_dir}/flaky.ipynb")]
    for attempt, _, rel in flaky:
        nb = executed_notebook(root, rel)
        assert f"attempt {attempt}" in "".join(text_of(c) for c in nb.cells if c.cell_type == "code")
        assert nb.metadata.papermill.exception is (attempt < 3)
    first = executed_notebook(root, flaky[0][2])
    assert "ConnectionError: service unavailable (attempt 1)" in first.cells[0].source  # its own banner
    assert result.steps["flaky"].notebook == f"{run_dir}/flaky.ipynb"

    always = [(r["attempt"], r["status"], r["notebook"], r["error_name"]) for r in rows if r["step"] == "always_fails"]
    assert always == [(1, "failed", f"{attempts}/attempt-1/always_fails.ipynb", "TimeoutError"),
                      (2, "failed", f"{run_dir}/always_fails.ipynb", "TimeoutError")]
    assert result.steps["always_fails"].notebook == f"{run_dir}/always_fails.ipynb"
    assert all((root / r[2]).exists() for r in always)


# -- hangs ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_step_and_cell_timeouts_kill_the_kernel_and_what_it_started(fixture_pipeline):
    root = fixture_pipeline("hangs")
    result = nbflow.run(root, jobs=2, display=False)

    assert statuses(result) == {"hang_cell": "failed", "hang_step": "failed"}
    step_error = result.steps["hang_step"].error
    assert (step_error.kind, step_error.ename) == ("timeout", "StepTimeout")
    assert step_error.evalue == "timed out after 8 s at In [3]" and step_error.cell == 3
    assert step_error.summary() == "StepTimeout: timed out after 8 s at In [3]"
    cell_error = result.steps["hang_cell"].error
    assert (cell_error.kind, cell_error.ename, cell_error.cell) == ("timeout", "CellTimeoutError", 3)
    assert cell_error.summary() == "CellTimeoutError: cell timed out after 2 s (cell_timeout) (In [3])"

    # the kernels and the `sleep` processes they started are gone
    pids = read_pids(root / "hang_step.pids") + read_pids(root / "hang_cell.pids")
    wait_gone(pids, "a timed-out kernel or its child", timeout=5)

    nb = executed_notebook(root, result.steps["hang_step"].notebook)  # saved, with what ran so far
    assert "timed out after 8 s" in nb.cells[0].source
    assert any("waiting forever" in text_of(c) for c in nb.cells if c.cell_type == "code")
    rows = {r["step"]: r for r in step_rows(root, result.run_id)}
    assert rows["hang_step"]["error_value"] == "timed out after 8 s at In [3]"
    assert rows["hang_cell"]["error_kind"] == "timeout"


@pytest.mark.slow
@pytest.mark.parametrize("forkserver", ["1", "0"], ids=["forkserver", "ordinary-kernels"])
def test_a_process_a_step_started_in_its_own_session_is_killed_when_the_step_ends(fixture_pipeline, monkeypatch,
                                                                                 forkserver):
    """In its own session (exec'd, or only forked), so not killed with the kernel's process group.

    Found by the variables it inherited; a fork-server kernel shows its own in /proc, not the server's.
    """
    monkeypatch.setenv("NBFLOW_FORKSERVER", forkserver)
    root = fixture_pipeline("detached_child")
    detached = []
    try:
        result = nbflow.run(root, jobs=2, display=False)
        detached = read_pids(root / "finishes.pid") + read_pids(root / "times_out.pid")
        assert statuses(result) == {"finishes": "succeeded", "times_out": "failed"}
        assert result.steps["times_out"].error.evalue == "timed out after 8 s at In [3]"  # after the child started
    finally:
        wait_gone(detached, "a process a step started in its own session", timeout=0)  # gone when the run ends


# -- the kernel dies --------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_dying_kernel_fails_the_step_with_the_last_cell_that_ran(fixture_pipeline):
    root = fixture_pipeline("kernel_dies")
    handle = nbflow.run(root, jobs=3, display=False, background=True)
    result = handle.wait(timeout=120)
    assert handle.done and result is not None, "a dead kernel made the run hang"

    assert statuses(result) == dict.fromkeys(["exits", "oom_killed", "segfaults"], "failed")
    for name in ("exits", "oom_killed", "segfaults"):
        error = result.steps[name].error
        assert (error.kind, error.ename, error.cell) == ("kernel_died", "DeadKernelError", 3), name
        assert error.evalue == ("kernel died at In [3]; the last cell that completed was In [2] "
                                "(crash, os._exit, or killed for memory?)"), name
        nb = executed_notebook(root, result.steps[name].notebook)
        assert "kernel died at In [3]" in nb.cells[0].source
    rows = {r["step"]: r for r in step_rows(root, result.run_id)}
    assert {r["error_kind"] for r in rows.values()} == {"kernel_died"}


# -- Ctrl-C and SIGTERM -------------------------------------------------------------------------------

@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_cancels_the_run_saves_notebooks_and_leaves_no_kernel(fixture_pipeline, signum):
    root = fixture_pipeline("slow")
    proc = start_run(root, "-j", "1")
    run_id, (kernel_pid, child_pid) = wait_until_slow_step_runs(root, proc)
    family = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]  # fork server, kernels
    os.killpg(proc.pid, signum)  # what Ctrl-C in a terminal does: the whole foreground process group
    code, stdout, stderr = finish(proc, root)

    assert code == 1
    assert "slow: cancelled" in stdout and f"run {run_id}: cancelled" in stdout
    assert "Traceback" not in stderr and "Task was destroyed" not in stderr
    wait_gone([kernel_pid, child_pid, *family], "a kernel, its child or the fork server")

    assert query(root, "SELECT status FROM runs WHERE run_id=?", run_id) == [("cancelled",)]
    rows = {r["step"]: r for r in step_rows(root, run_id)}
    assert rows["slow"]["status"] == "cancelled" and rows["after_slow"]["status"] == "cancelled"
    assert rows["slow"]["files"] == []  # the half-written table is not recorded
    nb = executed_notebook(root, rows["slow"]["notebook"])  # saved with what ran so far
    cells = [c for c in nb.cells if c.cell_type == "code"]
    assert any("half written" in text_of(c) for c in cells)
    assert [c.metadata.papermill.status for c in cells if "time.sleep(sleep_s)" in c.source] == ["cancelled"]
    assert "run cancelled at In [3]" in nb.cells[0].source
    assert (root / "_nbflow" / "lock").read_text() == ""  # released


# -- nbflow itself killed ---------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("forkserver", ["1", "0"], ids=["forkserver", "ordinary-kernels"])
def test_nbflow_killed_mid_run_is_recovered_by_the_next_run(fixture_pipeline, forkserver, private_tempdir):
    root = fixture_pipeline("slow")
    first = nbflow.run(root, parameters={"sleep_s": 0}, display=False)
    assert first.ok
    recorded = Ledger(root / "_nbflow", create=False)
    good_sha = recorded.lineage("table.csv")["sha256"]
    recorded.close()
    for leftover in ("started.marker", "slow.pids"):  # written by the first run
        (root / leftover).unlink()

    proc = start_run(root, "-p", "sleep_s=300", env={"NBFLOW_FORKSERVER": forkserver})
    run_id, (kernel_pid, child_pid) = wait_until_slow_step_runs(root, proc)
    proc.kill()  # kill -9 nbflow: no handler runs, nothing is cleaned up
    finish(proc, root)
    # its kernels' connection files (with their keys) and sockets are left in the temp folder
    assert list(private_tempdir.glob("nbflow-kernels-*/kernel-*.json"))

    holder = json.loads((root / "_nbflow" / "lock").read_text())  # the stale lock
    assert holder["pid"] == proc.pid and holder["run_id"] == run_id
    assert query(root, "SELECT status FROM runs WHERE run_id=?", run_id) == [("running",)]
    assert (root / "table.csv").read_text() == "a,b\n1,2\n"  # half written ...
    ledger = Ledger(root / "_nbflow", create=False)
    try:  # ... and never recorded as produced
        assert ledger.lineage("table.csv")["run_id"] == first.run_id
        assert ledger.lineage("table.csv")["sha256"] == good_sha
    finally:
        ledger.close()
    states = {s.name: s for s in nbflow.Pipeline(root).status({"sleep_s": 0})}
    assert "output table.csv changed since it was made" in states["slow"].reasons
    if forkserver == "1":  # the fork server kills its kernels when its driver dies
        wait_gone([kernel_pid, child_pid], "the orphaned kernel or its child")
    else:  # ipykernel exits when its parent dies (JPY_PARENT_PID); what it started is left over
        wait_gone([kernel_pid], "the orphaned kernel")

    events = []
    second = nbflow.run(root, parameters={"sleep_s": 0}, listeners=[events.append], display=False)
    assert second.ok and statuses(second) == {"slow": "succeeded", "after_slow": "skipped"}
    wait_gone([child_pid], "a process the orphaned kernel started", timeout=2)  # reaped by the next run
    assert query(root, "SELECT status FROM runs WHERE run_id=?", run_id) == [("interrupted",)]
    assert [r["status"] for r in step_rows(root, run_id)] == ["interrupted"]
    started = next(e for e in events if isinstance(e, StepStarted) and e.step == "slow")
    assert f"last run interrupted ({run_id})" in started.reasons
    assert (root / "table.csv").read_text() == "a,b\n1,2\n3,4\n"
    assert (root / "_nbflow" / "lock").read_text() == ""
    # the next run removed what the killed one left in the temp folder, and its own files on the way out
    assert sorted(p.name for p in private_tempdir.iterdir()) == []


# -- a second run ---------------------------------------------------------------------------------------------

def test_a_second_run_is_refused_at_once_naming_the_running_one(fixture_pipeline):
    root = fixture_pipeline("slow")
    proc = start_run(root)
    try:
        run_id, _ = wait_until_slow_step_runs(root, proc)
        holder = json.loads((root / "_nbflow" / "lock").read_text())
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["started_at"]))
        refused = cli("run", root)
        assert refused.exit_code == 1
        assert refused.stderr == (
            f"nbflow: another nbflow run of this pipeline is in progress (run {run_id}, pid {proc.pid} on "
            f"{holder['host']}, started {started}); wait for it to finish or stop it (kill {proc.pid})\n")
        assert query(root, "SELECT run_id FROM runs") == [(run_id,)]  # the refused run recorded nothing
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        code, _, _ = finish(proc, root)
    assert code == 1


# -- half-written outputs -----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_half_written_output_is_not_recorded_and_the_next_run_reruns(fixture_pipeline):
    root = fixture_pipeline("partial_output")
    broken = nbflow.run(root, display=False)
    assert statuses(broken) == {"writes": "failed", "reads": "not_run"}
    assert broken.steps["writes"].error.summary() == "ConnectionResetError: connection reset while writing (In [2])"
    assert (root / "result.csv").read_text() == "id,value\n1,10\n"  # half written by the failed step
    ledger = Ledger(root / "_nbflow", create=False)
    assert ledger.lineage("result.csv") is None and ledger.last_success("writes") is None
    ledger.close()
    assert {s.name: s.state for s in nbflow.Pipeline(root).status()} == {"writes": "stale", "reads": "stale"}

    fixed = nbflow.run(root, parameters={"fail": False}, display=False)
    assert statuses(fixed) == {"writes": "succeeded", "reads": "succeeded"}
    assert (root / "total.txt").read_text() == "3"

    again = nbflow.run(root, parameters={"fail": True}, display=False)  # fails halfway over a good output
    assert statuses(again) == {"writes": "failed", "reads": "not_run"}
    ledger = Ledger(root / "_nbflow", create=False)
    assert ledger.lineage("result.csv")["run_id"] == fixed.run_id  # still the good run's file
    ledger.close()
    reasons = {s.name: s.reasons for s in nbflow.Pipeline(root).status({"fail": False})}
    assert "output result.csv changed since it was made" in reasons["writes"]
    assert f"last run failed ({again.run_id})" in reasons["writes"]
    assert "upstream writes reruns" in reasons["reads"]
    last = nbflow.run(root, parameters={"fail": False}, display=False)
    assert statuses(last)["writes"] == "succeeded"
    assert (root / "result.csv").read_text() == "id,value\n1,10\n2,20\n"


def test_a_missing_declared_output_fails_the_step_naming_it(tmp_path, notebook_factory):
    root = tmp_path / "missing"
    notebook_factory(root / "forgets.ipynb", 'outputs = {"model": "model.pkl", "metrics": "metrics.json"}',
                     'open(outputs["metrics"], "w").write("{}")')
    result = nbflow.run(root, display=False)
    error = result.steps["forgets"].error
    assert (error.kind, error.ename) == ("missing_output", "MissingOutput")
    assert error.evalue == "declared output model.pkl was not written by the notebook; write it, or remove it from `outputs`"
    assert step_rows(root, result.run_id)[0]["files"] == []


# -- secrets --------------------------------------------------------------------------------------------------------

def test_secrets_reach_the_kernel_through_the_environment_only(fixture_pipeline, monkeypatch):
    root = fixture_pipeline("secrets")
    values = {"api_token": "tok-SECRET-123", "db_password": "pw-SECRET-456", "warehouse": "wh-SECRET-789"}
    monkeypatch.setenv("NBFLOW_SECRET_WAREHOUSE", values["warehouse"])  # declared in nbflow.yaml `secrets:`
    result = cli("run", root, "-p", f"api_token={values['api_token']}", "-p", f"db_password={values['db_password']}",
                 "-p", "region=us", "--json")
    assert result.exit_code == 0, result.output
    assert (root / "fetched.txt").read_text() == "tok-SECRET-123|pw-SECRET-456|wh-SECRET-789|us"  # they arrived

    run_id = json.loads(result.stdout)["run_id"]
    shown = [result.stdout, cli("history", root, "--json").stdout, cli("show", root, run_id, "--json").stdout]
    written = [p.read_bytes() for p in (root / "_nbflow").rglob("*") if p.is_file()]
    for secret in values.values():
        assert all(secret not in text for text in shown), secret
        assert all(secret.encode() not in data for data in written), secret

    nb = executed_notebook(root, json.loads(result.stdout)["steps"][0]["notebook"])
    injected = next(c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", []))
    assert "api_token = __import__(\"os\").environ['NBFLOW_SECRET_API_TOKEN']" in injected.source
    assert "warehouse = __import__(\"os\").environ['NBFLOW_SECRET_WAREHOUSE']" in injected.source
    assert "region = 'us'" in injected.source
    assert query(root, "SELECT parameters FROM runs") == [
        ('{"api_token": "***", "db_password": "***", "region": "us"}',)]
    assert json.loads(query(root, "SELECT parameters FROM step_runs")[0][0]) == {
        "api_token": "***", "db_password": "***", "warehouse": "***", "region": "us"}


def test_a_secret_in_an_error_message_is_masked_wherever_nbflow_writes_the_error(fixture_pipeline, monkeypatch):
    root = fixture_pipeline("secret_in_error")
    secret = "tok-SECRET-123"
    monkeypatch.setenv("NBFLOW_SECRET_API_TOKEN", secret)  # api_token is declared in nbflow.yaml `secrets:`
    logged = cli("run", root)  # not a terminal: the log
    assert logged.exit_code == 1
    assert "leaks: FAILED after" in logged.stdout and "ValueError: bad token *** (In [4])" in logged.stdout
    as_json = cli("run", root, "--json")  # the failed step runs again
    assert as_json.exit_code == 1
    out = json.loads(as_json.stdout)
    assert out["steps"][0]["error"]["evalue"] == "bad token ***"
    report = root.parent / "report.html"
    assert cli("report", root, "-o", report).exit_code == 0

    shown = [logged.output, as_json.output, cli("show", root, out["run_id"]).output,
             cli("show", root, out["run_id"], "--json").output, cli("history", root, "--json").output,
             report.read_text()]
    assert all(secret not in text for text in shown)
    for ledger in (root / "_nbflow").glob("history.sqlite*"):
        assert secret.encode() not in ledger.read_bytes()
    row = step_rows(root, out["run_id"])[0]
    assert row["error_value"] == "bad token ***" and "ValueError: bad token ***" in row["error_traceback"]

    nb = executed_notebook(root, out["steps"][0]["notebook"])
    banner = nb.cells[0]
    assert ERROR_MARKER_TAG in banner.metadata.tags and "ValueError: bad token *** (In [4])" in banner.source
    assert secret not in json.dumps([c for c in nb.cells if c.cell_type == "markdown"])  # nbflow's own cells
    failing = next(c for c in nb.cells if c.cell_type == "code" and c.source.startswith("raise"))
    assert [o.evalue for o in failing.outputs] == [f"bad token {secret}"]  # the cell's own output is the user's


# -- a read-only or full _nbflow/ ----------------------------------------------------------------------------------------

def one_step_pipeline(root: Path, notebook_factory) -> Path:
    notebook_factory(root / "small.ipynb", 'outputs = {"o": "small.txt"}', 'open(outputs["o"], "w").write("x")')
    return root


def test_read_only_state_folder_is_a_clear_error_and_the_ledger_is_untouched(tmp_path, notebook_factory):
    root = one_step_pipeline(tmp_path / "ro", notebook_factory)
    assert nbflow.run(root, display=False).ok
    ledger_bytes = (root / "_nbflow" / "history.sqlite").read_bytes()
    state = root / "_nbflow"
    with mounted(state, "--bind", "-o", "ro", str(state)):
        refused = cli("run", root, "--force")
        assert refused.exit_code == 1
        assert refused.stderr == (f"nbflow: cannot create the run lock {state}/lock: Read-only file system; "
                                  f"check that {state} is writable\n")
        status = cli("status", root)  # reading still works
        assert status.exit_code == 0 and status.stdout.split() == ["small", "fresh"]
        assert cli("history", root).exit_code == 0
    assert (root / "_nbflow" / "history.sqlite").read_bytes() == ledger_bytes


def test_full_disk_before_the_run_is_a_clear_error(tmp_path, notebook_factory):
    root = one_step_pipeline(tmp_path / "full", notebook_factory)
    state = root / "_nbflow"
    with mounted(state, "-t", "tmpfs", "-o", "size=64k", "tmpfs"):
        with contextlib.suppress(OSError):
            (state / "filler").write_bytes(b"x" * 200_000)
        result = cli("run", root)
        assert result.exit_code == 1
        assert result.stderr == (f"nbflow: cannot write the run lock {state}/lock: No space left on device; "
                                 f"check that {state} is writable and the disk is not full\n")
        assert not (root / "small.txt").exists()  # nothing ran


@pytest.mark.slow
def test_disk_full_mid_run_is_a_clear_error_and_the_ledger_stays_consistent(tmp_path, notebook_factory):
    root = tmp_path / "fills"
    notebook_factory(root / "small.ipynb", 'outputs = {"o": "small.txt"}', 'open(outputs["o"], "w").write("x")')
    notebook_factory(root / "filler.ipynb", 'inputs = {"o": "small.txt"}\noutputs = {"b": "big.txt"}\nfill = True',
                     'if fill:  # fill the disk that holds _nbflow/\n    try:\n'
                     '        open("_nbflow/filler", "wb").write(b"x" * 2_000_000)\n    except OSError:\n        pass',
                     'open(outputs["b"], "w").write("y")')
    notebook_factory(root / "after.ipynb", 'inputs = {"b": "big.txt"}', 'x = 1')
    state = root / "_nbflow"
    with mounted(state, "-t", "tmpfs", "-o", "size=256k", "tmpfs"):
        result = cli("run", root, "-j", "1")
        assert result.exit_code == 1
        assert "Traceback" not in result.output
        assert ("nbflow: cannot write the run ledger" in result.stderr
                or "cannot save the executed notebook" in result.output), result.output
        assert "No space left on device" in result.output or "database or disk is full" in result.output
        (state / "filler").unlink()

        assert query(root, "PRAGMA integrity_check") == [("ok",)]
        rows = query(root, "SELECT step, status FROM step_runs")
        assert ("small", "succeeded") in rows and ("filler", "succeeded") not in rows
        assert query(root, "SELECT f.path FROM files f JOIN step_runs s ON s.id = f.step_run_id "
                           "WHERE f.role='output'") == [("small.txt",)]  # nothing of filler recorded

        again = nbflow.run(root, parameters={"fill": False}, display=False)
        assert statuses(again) == {"small": "skipped", "filler": "succeeded", "after": "succeeded"}
        assert {s for (s,) in query(root, "SELECT status FROM runs")} <= {"failed", "interrupted", "succeeded"}
        assert query(root, "PRAGMA integrity_check") == [("ok",)]


def test_ledger_write_failure_stops_the_run_cleanly(tmp_path, notebook_factory, monkeypatch):
    """The same failure as a full disk, simulated at the ledger: works without mount."""
    root = tmp_path / "ledger_fails"
    notebook_factory(root / "first.ipynb", 'outputs = {"o": "first.txt"}', 'open(outputs["o"], "w").write("1")')
    notebook_factory(root / "second.ipynb", 'inputs = {"o": "first.txt"}\noutputs = {"o": "second.txt"}',
                     'open(outputs["o"], "w").write("2")')

    def disk_full(self, event):
        raise StateError(f"cannot write the run ledger {self.ledger.path}: database or disk is full; "
                         "check that the folder is writable and the disk is not full")

    monkeypatch.setattr(LedgerRecorder, "_on_StepSucceeded", disk_full)
    result = cli("run", root, "-j", "1")
    assert result.exit_code == 1
    assert result.stderr == (f"nbflow: cannot write the run ledger {root}/_nbflow/history.sqlite: database or disk "
                             "is full; check that the folder is writable and the disk is not full\n")
    assert not (root / "second.txt").exists()  # the run stopped at the failure
    # the success could not be recorded: the attempt and the run are recorded cancelled, its output is not
    assert query(root, "SELECT step, status FROM step_runs") == [("first", "cancelled"), ("second", "cancelled")]
    assert query(root, "SELECT count(*) FROM files") == [(0,)]
    assert query(root, "SELECT status FROM runs") == [("cancelled",)]
    monkeypatch.undo()

    again = nbflow.run(root, display=False)
    assert statuses(again) == {"first": "succeeded", "second": "succeeded"}


def test_an_attempt_left_running_is_recorded_interrupted_by_the_next_run(tmp_path):
    """When only some ledger writes failed (disk full), a finished run can hold an attempt still `running`."""
    ledger = Ledger(tmp_path / "_nbflow")
    record = LedgerRecorder(ledger)
    record(RunStarted("r1", str(tmp_path), time.time(), ()))
    record(StepStarted("load", 1, "_nbflow/runs/r1/load.ipynb", 2, time.time()))
    record(RunFinished(RunResult("r1", str(tmp_path), RunStatus.CANCELLED, {}, time.time(), time.time())))
    assert ledger.mark_interrupted() == []  # no run was left running ...
    assert [(r["step"], r["status"]) for r in ledger.step_runs("r1")] == [("load", "interrupted")]  # ... but a step
    ledger.close()


def test_keyboard_interrupt_in_the_foreground_cancels_and_records_every_step(fixture_pipeline):
    """Ctrl-C while `nbflow.run` runs in the foreground, e.g. Jupyter's interrupt button."""
    root = fixture_pipeline("slow")

    def interrupt_once_running():
        wait_for(lambda: (root / "started.marker").exists(), "the slow step to be running")
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt_once_running, daemon=True).start()
    result = nbflow.run(root, jobs=1, display=False)
    assert result.status.value == "cancelled" and statuses(result) == dict.fromkeys(["slow", "after_slow"], "cancelled")
    assert result.steps["slow"].error.evalue == "run cancelled at In [3]"
    rows = {r["step"]: r for r in step_rows(root, result.run_id)}
    assert {name: r["status"] for name, r in rows.items()} == {"slow": "cancelled", "after_slow": "cancelled"}
    nb = executed_notebook(root, rows["slow"]["notebook"])
    assert any("half written" in text_of(c) for c in nb.cells if c.cell_type == "code")
    wait_gone(read_pids(root / "slow.pids"), "the kernel or its child")
