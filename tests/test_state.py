"""The ledger, fingerprints, freshness reasons and the run lock."""

from __future__ import annotations

import json
import pickle
import sqlite3
import subprocess
import sys

import pytest

import nbflow
from nbflow.errors import LedgerDamaged, PipelineLocked, StateError
from nbflow.events import (FileRecord, PlannedStep, RunFinished, RunResult, RunStarted, RunStatus, StepStarted,
                           StepSucceeded)
from nbflow.graph import build_graph
from nbflow.state import (SCHEMA_VERSION, Ledger, LedgerRecorder, RunLock, _cell_changes, assess, redact,
                          set_ledger_aside)


def test_schema_is_versioned_and_newer_schema_is_refused(tmp_path):
    ledger = Ledger(tmp_path / "_nbflow")
    assert ledger.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    ledger.conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    ledger.close()
    with pytest.raises(nbflow.NbflowError, match="newer nbflow"):
        Ledger(tmp_path / "_nbflow")


def test_recorder_writes_runs_steps_files_and_redacts_secrets(tmp_path):
    ledger = Ledger(tmp_path / "_nbflow")
    rec = LedgerRecorder(ledger, secrets=("user",))
    rec(RunStarted("r1", str(tmp_path), 1.0, (PlannedStep("a", "run", ("never run",)),),
                   {"api_token": "s3cr3t", "user": "me", "n": 1}))
    rec(StepStarted("a", 1, "_nbflow/runs/r1/a.ipynb", 2, 1.5))
    rec(StepSucceeded("a", 1, 0.5, "_nbflow/runs/r1/a.ipynb", "f" * 64, {"cells": []}, {"db_password": "x", "n": 2},
                      (FileRecord("in.csv", "in.csv", "1" * 64, 3),), (FileRecord("out.csv", "out.csv", "2" * 64, 4),),
                      1.5))
    rec(RunFinished(RunResult("r1", str(tmp_path), RunStatus.SUCCEEDED, {}, 1.0, 2.0)))
    [run] = ledger.runs()
    assert run["status"] == "succeeded" and run["parameters"] == {"api_token": "***", "user": "***", "n": 1}
    [step] = ledger.step_runs("r1")
    assert step["status"] == "succeeded" and step["parameters"] == {"db_password": "***", "n": 2}
    assert {(f["role"], f["path"]) for f in step["files"]} == {("input", "in.csv"), ("output", "out.csv")}
    raw = (tmp_path / "_nbflow" / "history.sqlite").read_bytes()
    assert b"s3cr3t" not in raw


def test_a_failed_transaction_leaves_nothing_half_written(tmp_path):
    ledger = Ledger(tmp_path / "_nbflow")
    rec = LedgerRecorder(ledger)
    rec(RunStarted("r1", str(tmp_path), 1.0, ()))
    rec(StepStarted("a", 1, "nb", 1, 1.0))
    bad = StepSucceeded("a", 1, 0.1, "nb", "f", {}, {}, (), (FileRecord("o", "o", "h", 1), None), 1.0)  # type: ignore
    with pytest.raises(AttributeError):
        rec(bad)
    assert ledger.conn.execute("SELECT COUNT(*) FROM files").fetchone()[0] == 0
    assert ledger.conn.execute("SELECT status FROM step_runs").fetchone()[0] == "running"


def test_cell_change_reasons():
    old = [[1, "a"], [2, "b"], [3, "c"]]
    assert _cell_changes(old, [[1, "a"], [2, "B"], [3, "c"]]) == ["cell 2 changed"]
    assert _cell_changes(old, [[1, "a"], [2, "b"], [3, "c"], [4, "d"]]) == ["cell 4 added"]
    assert _cell_changes(old, [[1, "a"], [3, "c"]]) == ["cell 2 removed"]


def test_freshness_reasons_in_words(fixture_pipeline):
    root = fixture_pipeline("diamond")
    assert nbflow.run(root, display=False).ok
    graph = build_graph(root)
    ledger = Ledger(graph.state_dir)
    assert assess(graph, "b", {}, ledger).fresh
    (root / "data" / "b.txt").unlink()
    (root / "data" / "a.txt").write_text("999")
    reasons = assess(graph, "b", {"offset": 2}, ledger).reasons
    assert reasons == ("parameter offset 1 -> 2", "input data/a.txt changed", "output data/b.txt missing")
    ledger.close()


def test_interrupted_runs_are_recorded_by_the_next_run(tmp_path, fixture_pipeline):
    root = fixture_pipeline("diamond")
    ledger = Ledger(root / "_nbflow")
    rec = LedgerRecorder(ledger)
    rec(RunStarted("dead", str(root), 1.0, ()))
    rec(StepStarted("a", 1, "nb", 1, 1.0))
    ledger.close()
    nbflow.run(root, ["a"], display=False)
    conn = sqlite3.connect(root / "_nbflow" / "history.sqlite")
    assert conn.execute("SELECT status FROM runs WHERE run_id='dead'").fetchone()[0] == "interrupted"
    assert conn.execute("SELECT status FROM step_runs WHERE run_id='dead'").fetchone()[0] == "interrupted"
    conn.close()


def test_lock_refuses_a_second_run_and_names_the_first(tmp_path):
    state = tmp_path / "_nbflow"
    first = RunLock(state)
    first.acquire("run-one")
    code = ("import sys; from nbflow.state import RunLock\n"
            "try:\n    RunLock(sys.argv[1]).acquire('two')\nexcept Exception as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code, str(state)], capture_output=True, text=True).stdout
    assert "another nbflow run of this pipeline is in progress (run run-one" in out and "pid " in out
    with pytest.raises(PipelineLocked):
        # the same process, a second open file description: flock refuses too
        RunLock(state).acquire("again")
    first.release()
    again = RunLock(state)
    again.acquire("now free")
    again.release()


def test_redact():
    assert redact({"token": 1, "api_key": 2, "x": 3}, {"x"}) == {"token": "***", "api_key": "***", "x": "***"}
    assert json.dumps(redact({"min_year": 2012})) == '{"min_year": 2012}'
    assert redact({"total.delay": 1, "db.password": 2, "total.x": 3}, ("delay",)) == {
        "total.delay": "***", "db.password": "***", "total.x": 3}  # STEP.NAME, as -p and parameters= take them


# -- a damaged ledger -------------------------------------------------------------------------------------------

def recorded_ledger(state_dir):
    ledger = Ledger(state_dir)
    record = LedgerRecorder(ledger)
    record(RunStarted("r1", str(state_dir.parent), 1.0, ()))
    record(StepStarted("a", 1, "_nbflow/runs/r1/a.ipynb", 2, 1.5))
    ledger.close()
    return state_dir / "history.sqlite"


def test_a_file_that_is_not_a_database_is_damaged_not_unwritable(tmp_path):
    path = recorded_ledger(tmp_path / "_nbflow")
    path.write_bytes(b"these are not the pages of an sqlite database " * 100)
    for create in (False, True):
        with pytest.raises(LedgerDamaged) as caught:
            Ledger(tmp_path / "_nbflow", create=create)
        assert caught.value.detail == "file is not a database" and caught.value.ledger == str(path)
        assert "writable" not in str(caught.value) and f"nbflow repair {tmp_path}" in str(caught.value)


def test_damage_found_by_a_query_or_a_read_of_rows_is_ledger_damaged(tmp_path):
    path = recorded_ledger(tmp_path / "_nbflow")
    data = path.read_bytes()
    path.write_bytes(data[:4096] + b"\x0d" * (len(data) - 4096))  # the schema survives, the tables do not
    ledger = Ledger(tmp_path / "_nbflow", create=False)
    try:
        with pytest.raises(LedgerDamaged, match="database disk image is malformed"):
            ledger.runs()
        with pytest.raises(LedgerDamaged):
            for _ in ledger.conn.execute("SELECT * FROM step_runs"):
                pass
    finally:
        ledger.close()


def test_ledger_damaged_survives_pickling():
    error = LedgerDamaged("/p/_nbflow/history.sqlite", "file is not a database", "/p")
    again = pickle.loads(pickle.dumps(error))
    assert str(again) == str(error) and isinstance(again, StateError) and again.exit_code == 1


def test_a_busy_ledger_is_not_called_damaged(tmp_path):
    writer = Ledger(tmp_path / "_nbflow")
    other = Ledger(tmp_path / "_nbflow")
    other.conn.execute("PRAGMA busy_timeout=0")
    writer.conn.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StateError) as caught, other.transaction():
            pass
        assert not isinstance(caught.value, LedgerDamaged) and "database is locked" in str(caught.value)
    finally:
        writer.conn.execute("ROLLBACK")
        writer.close()
        other.close()


def test_set_ledger_aside_moves_the_ledger_with_its_wal(tmp_path):
    state = tmp_path / "_nbflow"
    reader = Ledger(state)  # open: the -wal and -shm files exist
    names = {p.name for p in state.iterdir()}
    assert {"history.sqlite", "history.sqlite-wal", "history.sqlite-shm"} <= names
    moved = set_ledger_aside(state)
    reader.close()
    assert moved[0].name.startswith("history.sqlite.damaged-") and len(moved) == 3
    assert {p.name for p in moved} == {moved[0].name, f"{moved[0].name}-wal", f"{moved[0].name}-shm"}
    assert not (state / "history.sqlite").exists() and not (state / "history.sqlite-wal").exists()
    assert set_ledger_aside(state) == []


# -- runs left running by an nbflow that died ---------------------------------------------------------------

def test_a_run_left_running_reads_interrupted_unless_a_run_holds_the_lock(tmp_path):
    state = tmp_path / "_nbflow"
    path = recorded_ledger(state)
    ledger = Ledger(state, create=False)
    try:
        [run] = ledger.runs()
        assert run["status"] == "interrupted" and run["steps"] == {"interrupted": 1}
        assert [s["status"] for s in ledger.step_runs("r1")] == ["interrupted"]
        assert not (state / "lock").exists()  # asking created nothing
        lock = RunLock(state)
        lock.acquire("r1")
        try:
            [run] = ledger.runs()
            assert run["status"] == "running" and run["steps"] == {"running": 1}
            assert [s["status"] for s in ledger.step_runs("r1")] == ["running"]
        finally:
            lock.release()
        assert ledger.runs()[0]["status"] == "interrupted"  # the lock file is there now, nobody holds it
    finally:
        ledger.close()
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT status FROM runs").fetchall() == [("running",)]  # reading wrote nothing
    conn.close()


def test_the_worker_a_step_ran_on_is_recorded_and_reported(tmp_path, notebook_factory):
    from nbflow.ui import report

    notebook_factory(tmp_path / "a.ipynb", 'outputs = {}', "x = 1")
    ledger = Ledger(tmp_path / "_nbflow")
    rec = LedgerRecorder(ledger)
    rec(RunStarted("r1", str(tmp_path), 1.0, (PlannedStep("a", "run", ("never run",)),)))
    rec(StepStarted("a", 1, "_nbflow/runs/r1/a.ipynb", 1, 1.5))
    rec(StepSucceeded("a", 1, 0.5, "_nbflow/runs/r1/a.ipynb", "f" * 64, {"cells": []}, {}, (), (), 1.5,
                      worker="tcp://10.0.0.7:40123"))
    rec(RunFinished(RunResult("r1", str(tmp_path), RunStatus.SUCCEEDED, {}, 1.0, 2.0)))
    assert ledger.step_runs("r1")[0]["worker"] == "tcp://10.0.0.7:40123"
    ledger.close()
    page, _ = report.write(tmp_path, tmp_path / "r.html")
    assert "ran on worker <code>tcp://10.0.0.7:40123</code>" in page.read_text()
