"""Shared fixtures: notebook factories and the check that no test leaves a process behind."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import psutil
import pytest

HERE = Path(__file__).parent
FIXTURES = HERE / "notebooks"


def write_notebook(path: Path, parameters: str | None, *cells: str, kernel: str = "python3",
                   markdown: str | None = None) -> Path:
    """Write a small nbformat-4 notebook: an optional parameters cell, then code cells."""
    nb_cells = []
    if markdown is not None:
        nb_cells.append({"cell_type": "markdown", "id": "intro", "metadata": {}, "source": markdown})
    if parameters is not None:
        nb_cells.append({"cell_type": "code", "id": "parameters", "metadata": {"tags": ["parameters"]},
                         "execution_count": None, "outputs": [], "source": parameters})
    for i, src in enumerate(cells):
        nb_cells.append({"cell_type": "code", "id": f"c{i}", "metadata": {}, "execution_count": None,
                         "outputs": [], "source": src})
    nb = {"cells": nb_cells, "metadata": {"kernelspec": {"name": kernel, "display_name": kernel,
                                                         "language": "python"},
                                          "language_info": {"name": "python"}},
          "nbformat": 4, "nbformat_minor": 5}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(nb, indent=1))
    return path


@pytest.fixture
def notebook_factory():
    return write_notebook


@pytest.fixture
def fixture_pipeline(tmp_path):
    """Copy a folder of tests/notebooks/<name>/ into tmp_path and return the copy."""

    def copy(name: str) -> Path:
        dest = tmp_path / name
        shutil.copytree(FIXTURES / name, dest)
        return dest

    return copy


def _children() -> list[psutil.Process]:
    """Our live child processes, except multiprocessing's resource tracker (one per interpreter, by design)."""
    alive = []
    try:
        for p in psutil.Process().children(recursive=True):
            try:
                if p.status() != psutil.STATUS_ZOMBIE and "multiprocessing.resource_tracker" not in " ".join(p.cmdline()):
                    alive.append(p)
            except psutil.Error:
                pass
    except psutil.Error:
        pass
    return alive


@pytest.fixture(autouse=True)
def no_leaked_processes():
    """Every test must stop the kernels and processes it started."""
    before = {p.pid for p in _children()}
    yield
    deadline = time.time() + 10
    leaked = []
    while time.time() < deadline:
        leaked = [p for p in _children() if p.pid not in before]
        if not leaked:
            break
        time.sleep(0.1)
    if leaked:
        described = []
        for p in leaked:
            try:
                described.append(f"{p.pid}: {' '.join(p.cmdline())[:200]}")
            except psutil.Error:
                pass
        for p in leaked:
            try:
                p.kill()
            except psutil.Error:
                pass
        if described:
            pytest.fail("processes left running:\n" + "\n".join(described))


@pytest.hookimpl(trylast=True)  # after the session's fixtures (servers, clusters) are torn down
def pytest_sessionfinish(session, exitstatus):
    leaked = _children()
    if leaked:
        for p in leaked:
            try:
                p.kill()
            except psutil.Error:
                pass
        print(f"\nnbflow tests: {len(leaked)} child process(es) were still running at the end and were killed")
        session.exitstatus = 1
