"""Tests for nbflow.reaper: processes found by their environment, private temp folders held by a lock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest

from nbflow.reaper import find_processes, kill_processes, private_folder, release_folder, remove_abandoned

REPO = Path(__file__).resolve().parent.parent
STEP = {"NBFLOW_RUN_ID": "20260101T000000-abcdef", "NBFLOW_STEP": "load", "NBFLOW_PIPELINE": "/data/pipeline"}


def started_with(env: dict[str, str], *argv: str) -> subprocess.Popen:
    """A process in its own session (out of reach of a process-group kill) with `env` added to ours."""
    return subprocess.Popen(list(argv) or ["sleep", "300"], env={**os.environ, **env}, start_new_session=True)


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture
def temp_folder(monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty temp folder of the test's own, as tempfile's default."""
    folder = Path(tempfile.mkdtemp(prefix="nbflow-test-"))
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    yield folder
    import shutil

    shutil.rmtree(folder, ignore_errors=True)


# -- processes ----------------------------------------------------------------------


def test_a_process_is_found_by_every_variable_of_its_step_and_killed() -> None:
    mine = started_with(STEP)
    other_step = started_with({**STEP, "NBFLOW_STEP": "load2"})  # a prefix of a value is not the value
    other_run = started_with({**STEP, "NBFLOW_RUN_ID": "20260101T000000-000000"})
    try:
        assert find_processes([STEP]) == [mine.pid]
        assert kill_processes([STEP]) == [mine.pid]
        assert not running(mine.pid)  # gone when kill_processes returns, not later
        assert mine.wait() == -signal.SIGKILL
        assert running(other_step.pid) and running(other_run.pid)
        assert find_processes([STEP]) == []
        both = kill_processes([{**STEP, "NBFLOW_STEP": "load2"}, {**STEP, "NBFLOW_RUN_ID": "20260101T000000-000000"}])
        assert sorted(both) == sorted([other_step.pid, other_run.pid])
    finally:
        for p in (mine, other_step, other_run):
            p.kill()
            p.wait()


def test_a_child_forked_by_a_killed_process_is_killed_too() -> None:
    script = ("import os, subprocess, sys\n"
              "child = subprocess.Popen(['sleep', '300'], start_new_session=True)\n"
              "print(child.pid, flush=True)\n"
              "sys.stdin.read()\n")
    parent = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, **STEP}, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert parent.stdout is not None
        grandchild = int(parent.stdout.readline())
        assert sorted(kill_processes([STEP])) == sorted([parent.pid, grandchild])
        assert not running(grandchild)
    finally:
        parent.kill()
        parent.wait()
        assert parent.stdin is not None and parent.stdout is not None
        parent.stdin.close()
        parent.stdout.close()


def test_the_caller_and_its_ancestors_are_never_killed() -> None:
    """nbflow run from inside a step's notebook carries that step's variables itself."""
    script = ("import sys\n"
              f"sys.path.insert(0, {str(REPO)!r})\n"
              "from nbflow.reaper import kill_processes\n"
              f"print(kill_processes([{STEP!r}]))\n")
    result = subprocess.run([sys.executable, "-c", script], env={**os.environ, **STEP}, capture_output=True,
                            text=True, check=True)
    assert result.stdout == "[]\n"


def test_no_variables_would_match_everything_and_are_refused() -> None:
    with pytest.raises(ValueError, match="would match every process"):
        find_processes([STEP, {}])
    assert kill_processes([]) == []


# -- private folders ------------------------------------------------------------------

HOLD = ("import sys\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "from nbflow.reaper import private_folder\n"
        "print(private_folder(sys.argv[2])[0], flush=True)\n"
        "sys.stdin.read()\n")


def folder_held_by_a_process(prefix: str) -> tuple[subprocess.Popen, Path]:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(REPO), prefix], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "TMPDIR": tempfile.gettempdir()})
    assert proc.stdout is not None
    return proc, Path(proc.stdout.readline().strip())


def end(proc: subprocess.Popen, *, kill: bool) -> None:
    if kill:
        proc.kill()
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.close()
    proc.wait()
    proc.stdout.close()


def test_a_new_folder_removes_the_folders_of_dead_holders_only(temp_folder: Path) -> None:
    alive, held = folder_held_by_a_process("nbflow-x-")
    dead, abandoned = folder_held_by_a_process("nbflow-x-")
    end(dead, kill=True)  # kill -9: nothing was cleaned up
    (abandoned / "kernel-1.json").write_text("{}")
    unheld = temp_folder / "nbflow-x-from-an-older-nbflow"
    unheld.mkdir()
    dead_other, other_prefix = folder_held_by_a_process("nbflow-y-")
    end(dead_other, kill=True)
    try:
        assert abandoned.is_dir() and held.is_dir()
        folder, holder = private_folder("nbflow-x-")
        assert not abandoned.exists()
        assert held.is_dir() and unheld.is_dir() and other_prefix.is_dir()
        assert Path(folder).stat().st_mode & 0o777 == 0o700
        release_folder(folder, holder)
        assert not os.path.exists(folder)
    finally:
        end(alive, kill=False)
    assert remove_abandoned("nbflow-x-") == [str(held)]  # its holder has exited
    assert sorted(p.name for p in temp_folder.iterdir()) == sorted([unheld.name, other_prefix.name])
