"""The command line, through a subprocess: exit codes, --json shapes, messages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

NBFLOW = [sys.executable, "-m", "nbflow.cli"]


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_COLOR": "1"}
    return subprocess.run([*NBFLOW, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


RUN_STEP_KEYS = ["name", "status", "attempts", "duration_s", "notebook", "error"]


def test_run_json_matches_the_contract(fixture_pipeline):
    root = fixture_pipeline("step_raises")
    proc = cli("run", str(root), "--json")
    assert proc.returncode == 1, proc.stderr
    out = json.loads(proc.stdout)  # nothing but the JSON object on stdout
    assert list(out) == ["run_id", "status", "steps"] and out["status"] == "failed"
    steps = {s["name"]: s for s in out["steps"]}
    for s in out["steps"]:
        assert list(s) == RUN_STEP_KEYS
    assert steps["ok"]["status"] == "succeeded" and steps["ok"]["attempts"] == 1
    assert steps["ok"]["notebook"] == f"_nbflow/runs/{out['run_id']}/ok.ipynb"  # relative to the pipeline
    assert isinstance(steps["ok"]["duration_s"], float)
    assert steps["after_boom"]["status"] == "not_run"
    error = steps["boom"]["error"]
    assert error["ename"] == "ZeroDivisionError" and error["cell"] == 3 and "division by zero" in error["evalue"]


def test_status_json_matches_the_contract(fixture_pipeline):
    root = fixture_pipeline("diamond")
    proc = cli("status", str(root), "--json")
    assert proc.returncode == 0, proc.stderr
    steps = {s["name"]: s for s in json.loads(proc.stdout)["steps"]}
    assert list(steps["d"]) == ["name", "state", "reasons", "inputs", "outputs", "upstream"]
    assert steps["d"]["state"] == "stale" and steps["d"]["reasons"][0] == "never run"
    assert steps["d"]["upstream"] == ["b", "c"] and steps["d"]["inputs"] == ["data/b.txt", "data/c.txt"]
    assert steps["driver"]["state"] == "not_a_step"
    assert not (root / "_nbflow").exists()  # status only reads


def test_run_twice_then_edit_reports_reasons_in_words(fixture_pipeline):
    root = fixture_pipeline("diamond")
    assert cli("run", str(root)).returncode == 0
    second = cli("run", str(root), "--json")
    assert {s["status"] for s in json.loads(second.stdout)["steps"]} == {"skipped"}
    (root / "data" / "seed.txt").write_text("1")
    text = cli("status", str(root)).stdout
    assert "input data/seed.txt changed" in text and "upstream a reruns" in text


def test_parameter_override_on_the_command_line(fixture_pipeline):
    root = fixture_pipeline("diamond")
    proc = cli("run", str(root), "d", "-p", "scale=3", "-p", "c.label=z", "--json")
    assert proc.returncode == 0, proc.stderr
    assert (root / "data" / "d.txt").read_text() == "64|z63"


def test_invalid_pipeline_exit_2_lists_every_problem(fixture_pipeline):
    root = fixture_pipeline("many_problems")
    proc = cli("run", str(root), "-p", "min_yaer=2013")
    assert proc.returncode == 2
    err = proc.stderr
    for expected in ("broken.ipynb:1: not valid notebook JSON", "nonliteral.ipynb:2:", "both write same.txt",
                     "no/such/file.csv, which does not exist", "kernel 'no-such-kernel' is not installed",
                     "no step has a parameter 'min_yaer' (did you mean 'min_year'?)"):
        assert expected in err
    assert not (root / "_nbflow" / "runs").exists()  # no kernel started, nothing executed


def test_cycle_exit_2(fixture_pipeline):
    proc = cli("status", str(fixture_pipeline("cycle")))
    assert proc.returncode == 2 and "cycle: " in proc.stderr and " -> " in proc.stderr


def test_unknown_step_and_bad_value(fixture_pipeline):
    root = fixture_pipeline("diamond")
    proc = cli("run", str(root), "dd", "-p", "scale=big")
    assert proc.returncode == 2
    assert "no step named 'dd' (did you mean 'd'?)" in proc.stderr
    assert "expected int like the default 2, got 'big'" in proc.stderr


def test_history_show_lineage(fixture_pipeline):
    root = fixture_pipeline("diamond")
    run_id = json.loads(cli("run", str(root), "--json").stdout)["run_id"]
    runs = json.loads(cli("history", str(root), "--json").stdout)["runs"]
    assert runs[0]["run_id"] == run_id and runs[0]["status"] == "succeeded" and runs[0]["steps"] == {"succeeded": 5}
    shown = cli("show", str(root), run_id[:18])
    assert shown.returncode == 0 and "data/d.txt" in shown.stdout
    lineage = json.loads(cli("lineage", str(root), str(root / "data" / "d.txt"), "--json").stdout)
    assert lineage["step"] == "d" and lineage["run_id"] == run_id and lineage["current_matches"]
    assert {i["path"] for i in lineage["inputs"]} == {"data/b.txt", "data/c.txt"}


def test_help_is_fast_to_import():
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "nbflow.cli", "--help"], capture_output=True,
                          text=True)
    assert proc.returncode == 0 and "run" in proc.stdout
    imported = {line.split("|")[-1].strip().split(".")[0] for line in proc.stderr.splitlines() if "|" in line}
    assert not imported & {"papermill", "pandas", "nbformat", "jsonschema", "nbclient", "jupyter_client"}


def test_json_errors_are_json_on_stdout_too(tmp_path):
    proc = cli("run", str(tmp_path), "--json")
    assert proc.returncode == 2 and "no steps in" in proc.stderr
    out = json.loads(proc.stdout)
    assert out["exit_code"] == 2 and "no notebook there has a cell tagged 'parameters'" in out["error"]
