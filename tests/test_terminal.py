"""The terminal display: a live table while a run goes on, a clean final table, and plain output off a terminal."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

from rich.console import Console

import nbflow
from nbflow.events import (
    CellFinished,
    CellOutput,
    CellStarted,
    PlannedStep,
    RunFinished,
    RunResult,
    RunStarted,
    RunStatus,
    StepError,
    StepFailed,
    StepNotRun,
    StepResult,
    StepSkipped,
    StepStarted,
    StepStatus,
    StepSucceeded,
)
from nbflow.ui.terminal import TerminalProgress

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
NBFLOW = str(Path(sys.executable).parent / "nbflow")


def console() -> Console:
    return Console(file=io.StringIO(), force_terminal=True, width=100)


def screen(c: Console) -> str:
    return ANSI.sub("", c.file.getvalue())


def last_frame(text: str) -> str:
    return text[text.rindex("nbflow run "):]


def synthetic_run(listener) -> None:
    plan = (PlannedStep("extract", "skip", ("fresh",)), PlannedStep("clean", "run", ("cell 2 changed",)),
            PlannedStep("stats", "run", ("never run",)), PlannedStep("report", "run", ("never run",)))
    error = StepError("exception", "KeyError", "'temp_max'", cell=4, source_line="df['temp_max'].mean()",
                      execution_count=3)
    events = [
        RunStarted("r1", "/data/pipe", 100.0, plan),
        StepSkipped("extract", ("fresh",)),
        StepStarted("clean", 1, "_nbflow/runs/r1/clean.ipynb", 3, 100.0, ("cell 2 changed",)),
        CellStarted("clean", 2, 1, 3, 1), CellFinished("clean", 2, 1, 3, 0.1, True),
        CellStarted("clean", 3, 2, 3, 2), CellFinished("clean", 3, 2, 3, 0.1, True),
        CellStarted("clean", 4, 3, 3, 3), CellFinished("clean", 4, 3, 3, 0.1, True),
        StepSucceeded("clean", 1, 1.25, "_nbflow/runs/r1/clean.ipynb", "f", {}, {}, (), ()),
        StepStarted("stats", 1, "_nbflow/runs/r1/stats.ipynb", 5, 101.0),
        CellFinished("stats", 2, 1, 5, 0.1, True),
        StepFailed("stats", 1, 0.5, "_nbflow/runs/r1/stats.ipynb", error, will_retry=True, retry_in_s=1),
        StepStarted("stats", 2, "_nbflow/runs/r1/stats.ipynb", 5, 102.0),
        CellFinished("stats", 2, 1, 5, 0.1, True), CellFinished("stats", 3, 2, 5, 0.1, True),
        StepFailed("stats", 2, 0.75, "_nbflow/runs/r1/stats.ipynb", error),
        StepNotRun("report", "stats"),
    ]
    for event in events:
        listener(event)
    steps = {"extract": StepResult("extract", StepStatus.SKIPPED),
             "clean": StepResult("clean", StepStatus.SUCCEEDED, 1, 1.25, "_nbflow/runs/r1/clean.ipynb"),
             "stats": StepResult("stats", StepStatus.FAILED, 2, 0.75, "_nbflow/runs/r1/stats.ipynb", error),
             "report": StepResult("report", StepStatus.NOT_RUN)}
    listener(RunFinished(RunResult("r1", "/data/pipe", RunStatus.FAILED, steps, 100.0, 103.5)))


def test_final_table_shows_every_step_its_state_progress_and_the_failure():
    c = console()
    progress = TerminalProgress(console=c)
    synthetic_run(progress)
    assert progress._live is None  # stopped at RunFinished
    final = last_frame(screen(c))
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^[✔✖↷⊘]\s+(\w+)\s{2,}.*$", final, re.M)}
    assert set(rows) == {"extract", "clean", "stats", "report"}
    assert rows["extract"].startswith("↷") and "skipped" in rows["extract"] and "fresh" in rows["extract"]
    assert "succeeded" in rows["clean"] and "3/3" in rows["clean"] and "1.2 s" in rows["clean"]
    assert "failed" in rows["stats"] and "2/5" in rows["stats"] and "KeyError" in rows["stats"]
    assert re.search(r"0\.8 s\s+2\s", rows["stats"]), rows["stats"]  # elapsed, then attempts
    assert "not run" in rows["report"] and "stats did not succeed" in rows["report"]
    assert "✖ stats: KeyError: 'temp_max' (In [3])" in final  # as the executed notebook numbers it
    assert "at: df['temp_max'].mean()" in final
    assert "/data/pipe/_nbflow/runs/r1/stats.ipynb" in final  # outside the working directory: absolute
    assert "✖ run r1 failed in 3.5 s: 1 succeeded, 1 skipped, 1 failed, 1 not run" in final
    assert "⠋" not in final  # no spinner left behind


def test_the_live_table_updates_while_steps_run():
    c = console()
    progress = TerminalProgress(console=c, refresh_per_second=50)
    progress(RunStarted("r2", "/p", 0.0, (PlannedStep("a", "run", ("never run",)),)))
    progress(StepStarted("a", 1, "_nbflow/runs/r2/a.ipynb", 4, 0.0))
    progress(CellFinished("a", 1, 1, 4, 0.1, True))
    assert progress._live is not None
    assert "1/4" in screen(c) and "running" in screen(c)
    progress(StepFailed("a", 1, 0.1, "_nbflow/runs/r2/a.ipynb", StepError("exception", "OSError", "disk"),
                        will_retry=True, retry_in_s=2))
    assert "retry in 2 s" in screen(c)
    result = RunResult("r2", "/p", RunStatus.CANCELLED, {"a": StepResult("a", StepStatus.CANCELLED, 1, 0.2)}, 0, 1)
    progress(RunFinished(result))
    assert progress._live is None
    final = last_frame(screen(c))
    assert "cancelled" in final and "■ run r2 cancelled" in final


def test_under_the_table_the_running_cell_and_the_last_lines_it_printed():
    c = console()
    progress = TerminalProgress(console=c, refresh_per_second=50)
    progress(RunStarted("r3", "/p", 0.0, (PlannedStep("a", "run", ("never run",)),)))
    progress(StepStarted("a", 1, "_nbflow/runs/r3/a.ipynb", 4, 0.0))
    progress(CellStarted("a", 3, 2, 4, 2, "model.fit(x, y)"))
    progress(CellOutput("a", "stdout", "".join(f"epoch {i}\n" for i in range(1, 6))))
    progress(CellOutput("a", "stderr", "warning: slow\n"))
    progress._live.refresh()
    frame = last_frame(screen(c))
    assert "▶ a In [2]: model.fit(x, y)" in frame
    assert [ln.strip() for ln in frame.splitlines()[-3:]] == ["epoch 4", "epoch 5", "warning: slow"]
    assert "epoch 3" not in frame  # the last three lines only
    progress(StepSucceeded("a", 1, 1.0, "_nbflow/runs/r3/a.ipynb", "f", {}, {}, (), ()))
    steps = {"a": StepResult("a", StepStatus.SUCCEEDED, 1, 1.0)}
    progress(RunFinished(RunResult("r3", "/p", RunStatus.SUCCEEDED, steps, 0, 1)))
    final = last_frame(screen(c))
    assert "model.fit" not in final and "epoch" not in final  # the final table: what ran, not what it printed


def failing_pipeline(root: Path, notebook_factory) -> Path:
    """One kernel's worth of run: `boom` fails in its third cell, `after` needs it and is not run."""
    notebook_factory(root / "boom.ipynb", 'outputs = {"x": "x.txt"}\nvalue = 0', "print('dividing')",
                     "y = 10 / value")
    notebook_factory(root / "after.ipynb", 'inputs = {"x": "x.txt"}', "pass")
    return root


def test_a_real_run_through_the_terminal_display(tmp_path, notebook_factory):
    root = failing_pipeline(tmp_path / "pipe", notebook_factory)
    c = console()
    events: list = []
    result = nbflow.run(root, listeners=[TerminalProgress(console=c), events.append], display=False)
    final = last_frame(screen(c))
    # the executor numbers the cells as the executed notebook does, and passes on what they print
    assert [(e.execution_count, e.source_line) for e in events if isinstance(e, CellStarted) and e.step == "boom"] \
        == [(1, 'outputs = {"x": "x.txt"}'), (2, "print('dividing')"), (3, "y = 10 / value")]
    assert [(e.stream, e.text) for e in events if isinstance(e, CellOutput)] == [("stdout", "dividing\n")]
    for name, step in result.steps.items():
        assert re.search(rf"^\S\s+{name}\s+{step.status.value.replace('_', ' ')}", final, re.M), (name, final)
    assert "ZeroDivisionError: division by zero (In [3])" in final
    assert f"{root}/_nbflow/runs/{result.run_id}/boom.ipynb" in re.sub(r"\s+", "", final)  # may wrap


def test_cli_off_a_terminal_logs_plain_lines_and_json_prints_only_json(tmp_path, notebook_factory):
    root = failing_pipeline(tmp_path / "pipe", notebook_factory)
    plain = subprocess.run([NBFLOW, "run", str(root)], capture_output=True, text=True)
    assert plain.returncode == 1
    assert "\x1b[" not in plain.stdout  # no colours or cursor movement in a log
    lines = plain.stdout.splitlines()
    assert all(re.match(r"\d\d:\d\d:\d\d ", line) or line.startswith("    ") for line in lines), lines
    assert any("boom: FAILED" in line for line in lines) and "run " in lines[-1]

    as_json = subprocess.run([NBFLOW, "run", str(root), "--json"], capture_output=True, text=True)
    assert as_json.returncode == 1
    data = json.loads(as_json.stdout)  # the whole of stdout is one JSON object
    assert as_json.stdout.count("\n") == 1
    assert {s["name"]: s["status"] for s in data["steps"]}["boom"] == "failed"
