"""Tests for nbflow.reaper: private temp folders held by a lock."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from nbflow.reaper import private_folder, release_folder, remove_abandoned

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def temp_folder(monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty temp folder of the test's own, as tempfile's default."""
    folder = Path(tempfile.mkdtemp(prefix="nbflow-test-"))
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    yield folder
    import shutil

    shutil.rmtree(folder, ignore_errors=True)


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
