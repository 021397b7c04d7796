"""The command line, through a subprocess: exit codes, --json shapes, messages."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from nbflow import api as nbflow_api
from nbflow.errors import PipelineError
from nbflow.events import RunStarted, StepStarted
from nbflow.layout import StateLayout
from nbflow.state import Ledger, LedgerRecorder, RunLock

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
    rows = [line for line in shown.stdout.splitlines() if line.split()[1:2] == ["succeeded"]]
    longest = max(len(line.split()[0]) for line in rows)
    assert len(rows) == 5 and {line.index(" succeeded") for line in rows} == {2 + longest + 1}  # as wide as needed
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


# -- runs left running by a killed nbflow -----------------------------------------------------------------------

def test_a_run_left_running_by_a_dead_nbflow_is_shown_interrupted(tmp_path):
    root = tmp_path / "p"
    ledger = Ledger(root / "_nbflow")
    record = LedgerRecorder(ledger)
    record(RunStarted("20250101T060000-dead00", str(root), 1.0, ()))
    record(StepStarted("a", 1, "_nbflow/runs/20250101T060000-dead00/a.ipynb", 2, 1.5))
    ledger.close()

    def shown() -> tuple[str, dict[str, int], list[str]]:
        [run] = json.loads(cli("history", str(root), "--json").stdout)["runs"]
        steps = json.loads(cli("show", str(root), "latest", "--json").stdout)["steps"]
        return run["status"], run["steps"], [s["status"] for s in steps]

    assert shown() == ("interrupted", {"interrupted": 1}, ["interrupted"])  # nobody holds the lock: it died
    assert "interrupted" in cli("history", str(root)).stdout
    assert not (root / "_nbflow" / "lock").exists()  # the read views create nothing
    lock = RunLock(root / "_nbflow")
    lock.acquire("20250101T060000-dead00")  # held by this process: the run is alive for the command
    try:
        assert shown() == ("running", {"running": 1}, ["running"])
    finally:
        lock.release()
    conn = sqlite3.connect(root / "_nbflow" / "history.sqlite")
    assert conn.execute("SELECT status FROM runs").fetchall() == [("running",)]  # the next run records it
    conn.close()


# -- clean ---------------------------------------------------------------------------------------------------

RUN_IDS = [f"2025010{i}T060000-aaaaaa" for i in range(1, 5)]


def with_old_runs(root: Path) -> StateLayout:
    """Four runs' executed notebooks, each with an earlier attempt of a retried step."""
    layout = StateLayout.of(root)
    for run_id in RUN_IDS:
        for path in (layout.executed(run_id, "a"), layout.attempt(run_id, "a", 1)):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("{}")
    return layout


def test_clean_keeps_the_newest_runs_with_their_attempts(tmp_path):
    layout = with_old_runs(tmp_path / "p")
    proc = cli("clean", str(layout.root), "--keep", "2")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "removed the notebooks of 2 run(s), kept 2\n"
    assert sorted(p.name for p in layout.runs_dir.iterdir()) == RUN_IDS[2:]
    assert sorted(p.name for p in layout.attempts_dir.iterdir()) == RUN_IDS[2:]
    assert layout.attempt(RUN_IDS[3], "a", 1).exists()
    assert nbflow_api.clean(layout.root, keep=2) == {"removed": [], "kept": RUN_IDS[2:]}
    assert nbflow_api.clean(layout.root, keep=1) == {"removed": [RUN_IDS[2]], "kept": [RUN_IDS[3]]}


def test_clean_keeps_at_least_one_run(tmp_path):
    layout = with_old_runs(tmp_path / "p")
    for keep in ("0", "-1"):
        proc = cli("clean", str(layout.root), "--keep", keep)
        assert proc.returncode == 2 and f"Invalid value for '--keep': {keep} is not in the range x>=1" in proc.stderr
    with pytest.raises(PipelineError, match="keep must be at least 1, not 0"):
        nbflow_api.clean(layout.root, keep=0)
    assert sorted(p.name for p in layout.runs_dir.iterdir()) == RUN_IDS


def test_clean_refuses_a_path_that_is_not_a_pipeline_and_creates_nothing(tmp_path):
    mistyped = tmp_path / "notebooks-typo"
    proc = cli("clean", str(mistyped))
    assert proc.returncode == 2
    assert proc.stderr == f"nbflow: invalid pipeline: pipeline folder '{mistyped}' does not exist or is not a folder\n"
    assert not mistyped.exists()
    never_ran = tmp_path / "never_ran"
    never_ran.mkdir()
    proc = cli("clean", str(never_ran))
    assert proc.returncode == 2
    assert proc.stderr == (f"nbflow: invalid pipeline: {never_ran} has no _nbflow/ folder: not a pipeline that has "
                           "run, nothing to clean\n")
    assert list(never_ran.iterdir()) == []
    (tmp_path / "a_file").write_text("x")
    assert cli("clean", str(tmp_path / "a_file")).returncode == 2


# -- read views of something that is not a pipeline ------------------------------------------------------------

def test_status_of_a_folder_without_steps_is_the_error_run_gives(tmp_path, notebook_factory):
    empty = tmp_path / "empty"
    empty.mkdir()
    for args in (("run", str(empty)), ("status", str(empty)), ("status", str(empty), "--json")):
        proc = cli(*args)
        assert proc.returncode == 2 and proc.stderr.startswith(f"nbflow: invalid pipeline: no steps in {empty}: ")
    notebook_factory(empty / "driver.ipynb", None, "import nbflow")
    proc = cli("status", str(empty))
    assert proc.returncode == 2 and "(1 notebook(s) without one)" in proc.stderr
    with pytest.raises(PipelineError, match="no steps in"):
        nbflow_api.Pipeline(empty).status()


def test_history_show_lineage_of_a_missing_folder_name_it(tmp_path):
    missing = tmp_path / "nope"
    for args in (("history", str(missing)), ("history", str(missing), "--json"), ("show", str(missing), "latest"),
                 ("lineage", str(missing), str(missing / "x.csv"))):
        proc = cli(*args)
        assert proc.returncode == 2, args
        assert f"pipeline folder '{missing}' does not exist or is not a folder" in proc.stderr, args
    assert not missing.exists()
    with pytest.raises(PipelineError, match="does not exist"):
        nbflow_api.runs(missing)


def test_history_of_a_pipeline_never_run_is_empty(fixture_pipeline):
    root = fixture_pipeline("diamond")
    proc = cli("history", str(root))
    assert proc.returncode == 0 and proc.stdout == "no runs yet\n"
    assert json.loads(cli("history", str(root), "--json").stdout) == {"runs": [], "folded": 0}
    assert not (root / "_nbflow").exists()


def test_lineage_follows_the_chain_back_to_source_data_with_parameters(fixture_pipeline):
    root = fixture_pipeline("diamond")
    assert cli("run", str(root), "-p", "a.scale=3").returncode == 0
    info = json.loads(cli("lineage", str(root), str(root / "data" / "d.txt"), "--json").stdout)
    assert info["step"] == "d" and info["current_matches"] is True
    made_by = {i["path"]: i["made_by"] for i in info["inputs"]}
    b = made_by["data/b.txt"]
    assert b["step"] == "b"
    a = {i["path"]: i["made_by"] for i in b["inputs"]}["data/a.txt"]
    assert a["step"] == "a" and a["parameters"] == {"scale": 3}
    assert {i["path"]: i["made_by"] for i in a["inputs"]}["data/seed.txt"] is None  # source data
    text = cli("lineage", str(root), str(root / "data" / "d.txt")).stdout
    assert "made by step 'a' in run" in text and "with scale=3" in text and "data/seed.txt" in text
    assert "(source data)" in text


def test_show_and_history_give_parameters_and_fold_idle_runs(fixture_pipeline):
    root = fixture_pipeline("diamond")
    assert cli("run", str(root), "-p", "a.scale=3").returncode == 0
    assert cli("run", str(root), "-p", "a.scale=3").returncode == 0  # nothing runs: folded in history
    shown = cli("show", str(root)).stdout  # the latest run by default
    assert "parameters: scale=3" not in shown  # the idle run: every step skipped
    history = cli("history", str(root)).stdout.splitlines()
    assert len(history) == 2 and "a.scale=3" in history[0]
    assert history[1] == "(and 1 run(s) where every step was fresh among the last 2; --all shows them)"
    assert len(cli("history", str(root), "--all").stdout.splitlines()) == 2
    full = json.loads(cli("history", str(root), "--json").stdout)
    first = full["runs"][0]["run_id"]
    assert full["folded"] == 1 and len(full["runs"]) == 1
    assert "      parameters: scale=3" in cli("show", str(root), first).stdout


@pytest.mark.slow
def test_every_command_speaks_json(fixture_pipeline, tmp_path):
    root = fixture_pipeline("diamond")
    assert cli("run", str(root)).returncode == 0
    plot = json.loads(cli("plot", str(root), "-o", str(tmp_path / "dag.svg"), "--json").stdout)
    assert plot == {"output": str(tmp_path / "dag.svg"), "steps": 5}
    assert json.loads(cli("clean", str(root), "--keep", "1", "--json").stdout)["removed"] == []
    assert json.loads(cli("repair", str(root), "--json").stdout)["moved"] == []
    written = json.loads(cli("report", str(root), "-o", str(tmp_path / "r.html"), "--json").stdout)
    assert written["output"] == str(tmp_path / "r.html") and written["bytes"] > 0
    planned = json.loads(cli("schedule", str(root), "--cron", "0 6 * * *", "--json").stdout)
    assert planned["expression"] == "0 6 * * *" and len(planned["next"]) == 3 and planned["installed"] is False
    helps = cli("--help").stdout
    commands = [line.split()[0] for line in helps.split("Commands:")[1].splitlines() if line.strip()]
    for command in commands:
        help_text = cli(command, "--help").stdout
        if "Commands:" in help_text:  # a group (`import`): each of its commands
            for sub in [line.split()[0] for line in help_text.split("Commands:")[1].splitlines() if line.strip()]:
                assert "--json" in cli(command, sub, "--help").stdout, (command, sub)
        else:
            assert "--json" in help_text, command
