"""Audit: every run records the commit (dirty or clean, with the changed files), user, host, Python,
package versions and the call; show, report and --json display it; status says when the code moved on."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import nbflow
from nbflow.audit import collect, packages_digest
from nbflow.state import SCHEMA_VERSION

NBFLOW = [sys.executable, "-m", "nbflow.cli"]


def git(folder, *args):
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.org"}
    return subprocess.run(["git", "-C", str(folder), *args], check=True, capture_output=True, text=True,
                          env=env).stdout.strip()


@pytest.fixture
def repo(tmp_path, notebook_factory):
    root = tmp_path / "project"
    pipeline = root / "notebooks"
    notebook_factory(pipeline / "a.ipynb", 'outputs = {"o": "o.txt"}\nn = 1', "open(outputs['o'], 'w').write(str(n))")
    (root / ".gitignore").write_text("_nbflow/\no.txt\n")
    git(root, "init", "-q")
    git(root, "add", ".")
    git(root, "commit", "-qm", "first")
    return root


@pytest.mark.slow
def test_a_run_records_the_commit_and_whether_the_tree_was_dirty(repo):
    pipeline = repo / "notebooks"
    first = git(repo, "rev-parse", "HEAD")
    proc = subprocess.run([*NBFLOW, "run", str(pipeline), "-p", "n=2"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    run = nbflow.show(pipeline)
    audit = run["audit"]
    assert audit["git"] == {"commit": first, "dirty": False, "changed": [], "changed_count": 0}
    assert audit["call"].endswith(f"run {pipeline} -p n=2")  # the command line as typed
    assert audit["python"] == ".".join(map(str, sys.version_info[:3])) and audit["host"] and audit["user"]
    assert audit["packages"]["key"]["nbflow"] == nbflow.__version__ and len(audit["packages"]["sha256"]) == 64

    (pipeline / "helper.py").write_text("X = 1\n")  # an untracked file: the tree is dirty
    assert nbflow.run(pipeline, force=True, display=False).ok
    dirty = nbflow.show(pipeline)["audit"]
    assert dirty["git"]["dirty"] is True and dirty["git"]["changed"] == ["notebooks/helper.py"]
    assert dirty["call"] == f"nbflow.run({str(pipeline)!r}, force=True)"

    text = subprocess.run([*NBFLOW, "show", str(pipeline)], capture_output=True, text=True).stdout
    assert f"commit {first[:10]}, with 1 changed file(s): notebooks/helper.py" in text
    assert "started by: nbflow.run(" in text and "packages: nbflow" in text
    shown = json.loads(subprocess.run([*NBFLOW, "show", str(pipeline), "--json"], capture_output=True,
                                      text=True).stdout)
    assert shown["audit"]["git"]["commit"] == first
    assert json.loads(subprocess.run([*NBFLOW, "history", str(pipeline), "--json"], capture_output=True,
                                     text=True).stdout)["runs"][0]["audit"]["git"]["dirty"] is True
    page = (pipeline / "r.html")
    subprocess.run([*NBFLOW, "report", str(pipeline), "-o", str(page)], check=True, capture_output=True)
    assert first in page.read_text() and "notebooks/helper.py" in page.read_text()


@pytest.mark.slow
def test_status_says_when_the_code_differs_from_the_last_run_s_commit(repo):
    pipeline = repo / "notebooks"
    assert nbflow.run(pipeline, display=False).ok
    status = subprocess.run([*NBFLOW, "status", str(pipeline)], capture_output=True, text=True).stdout
    assert "code differs" not in status
    (repo / "README.md").write_text("more\n")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "second")
    status = subprocess.run([*NBFLOW, "status", str(pipeline)], capture_output=True, text=True).stdout
    assert status.startswith("code differs from the last run's commit (")
    code = json.loads(subprocess.run([*NBFLOW, "status", str(pipeline), "--json"], capture_output=True,
                                     text=True).stdout)["code"]
    assert code["differs"] is True and code["commit"] == git(repo, "rev-parse", "HEAD")


def test_outside_git_the_audit_says_so(tmp_path, notebook_factory):
    record = collect(tmp_path, "test")
    assert record["git"] is None and record["call"] == "test"
    assert packages_digest({"a": "1"}) != packages_digest({"a": "2"})


def test_package_versions_in_the_fingerprint_on_request(tmp_path, notebook_factory, monkeypatch):
    import nbflow.audit as audit

    notebook_factory(tmp_path / "a.ipynb", 'outputs = {"o": "o.txt"}', "open(outputs['o'], 'w').write('x')")
    (tmp_path / "nbflow.yaml").write_text("fingerprint: {packages: true}\n")
    versions = {**audit.installed_packages(), "pandas": "2.1.0"}
    monkeypatch.setattr(audit, "installed_packages", lambda: dict(versions))
    assert nbflow.run(tmp_path, display=False).ok
    assert [s.state for s in nbflow.Pipeline(tmp_path).status()] == ["fresh"]
    versions["pandas"] = "2.2.0"  # an upgraded pandas
    assert nbflow.Pipeline(tmp_path).status()[0].reasons == ("package pandas 2.1.0 -> 2.2.0",)


def test_a_0_1_ledger_gains_the_audit_column(tmp_path):
    import sqlite3

    from nbflow.state import Ledger

    state = tmp_path / "_nbflow"
    state.mkdir()
    old = sqlite3.connect(state / "history.sqlite")
    old.executescript("CREATE TABLE runs (run_id TEXT PRIMARY KEY, started_at REAL NOT NULL, finished_at REAL, "
                      "status TEXT NOT NULL, pid INTEGER, host TEXT, parameters TEXT, plan TEXT, "
                      "nbflow_version TEXT); INSERT INTO runs VALUES ('r1', 1, 2, 'succeeded', 1, 'h', '{}', '[]', "
                      "'0.1.0'); CREATE TABLE step_runs (id INTEGER PRIMARY KEY, run_id TEXT, step TEXT, "
                      "attempt INTEGER, status TEXT, started_at REAL, finished_at REAL, duration_s REAL, "
                      "notebook TEXT, fingerprint TEXT, fingerprint_parts TEXT, parameters TEXT, reasons TEXT, "
                      "error_kind TEXT, error_name TEXT, error_value TEXT, error_cell INTEGER, "
                      "error_traceback TEXT); PRAGMA user_version=1;")
    old.close()
    ledger = Ledger(state)
    try:
        assert ledger.runs()[0]["run_id"] == "r1" and ledger.runs()[0]["audit"] is None
        assert ledger.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        ledger.close()


def test_the_recorded_command_line_has_every_secret_value_as_stars(monkeypatch):
    import shlex

    from nbflow.audit import command_line

    monkeypatch.setattr(sys, "argv", [
        "/venv/bin/nbflow", "run", "p", "-p", "train[alpha=0.1].api_token=S1", "-ptotal.delay=S2",
        "--parameter=db.password=S3", "--parameter", "delay=S4", "-p", "x=1", "-p", "train[alpha=0.1].x=2",
        "-p", "name with space=y z", "-p"])
    line = command_line(secrets=("delay",))
    assert not any(secret in line for secret in ("S1", "S2", "S3", "S4"))
    assert shlex.split(line) == [
        "nbflow", "run", "p", "-p", "train[alpha=0.1].api_token=***", "-ptotal.delay=***",
        "--parameter=db.password=***", "--parameter", "delay=***", "-p", "x=1", "-p", "train[alpha=0.1].x=2",
        "-p", "name with space=y z", "-p"]
