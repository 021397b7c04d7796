"""The example pipeline in notebooks/, as a new user meets it (README command 1 and what follows)."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

# integration: runs with the full suite (`pytest -m "slow or not slow"`, what CI runs)
pytestmark = pytest.mark.slow

ROOT = Path(__file__).parent.parent
FORECASTS = {f"forecast[window={w},features={f}]" for w in (1, 3, 7, 14) for f in ("temp", "all")}


def nbflow(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nbflow.cli", *args], capture_output=True, text=True, timeout=600)


def steps(proc: subprocess.CompletedProcess) -> dict[str, str]:
    assert proc.returncode == 0, proc.stderr
    return {s["name"]: s["status"] for s in json.loads(proc.stdout)["steps"]}


def test_example_runs_skips_reruns_what_changed_and_follows_parameters(tmp_path):
    pipeline = tmp_path / "notebooks"
    shutil.copytree(ROOT / "notebooks", pipeline,
                    ignore=shutil.ignore_patterns("_nbflow", "tutorial_work", "staging", "clean", "marts", "warehouse",
                                                  "reports", "forecasts", ".ipynb_checkpoints"))
    first = steps(nbflow("run", str(pipeline), "--json"))
    assert set(first) == {"extract", "clean", "monthly", "by_weather", "load", "report", *FORECASTS,
                          "compare_forecasts"}
    assert set(first.values()) == {"succeeded"}
    assert (pipeline / "data" / "reports" / "monthly_temperature.png").stat().st_size > 10_000

    # the grid: one instance per (window, features), each in its partition folders, compared by the fan-in
    scores = pd.read_parquet(pipeline / "data" / "forecasts" / "scores" / "window=7" / "features=all")
    assert scores["test_days"].item() == 365 and 1.0 < scores["mae"].item() < scores["mae_persistence"].item()
    table = pd.read_csv(pipeline / "data" / "reports" / "forecast_comparison.csv")
    assert len(table) == 8 and set(zip(table["window"], table["features"])) == {
        (w, f) for w in (1, 3, 7, 14) for f in ("temp", "all")}
    assert (table["skill"] > 0).all()  # every sweep beats persistence on the test year
    assert (pipeline / "data" / "reports" / "forecast_skill.png").stat().st_size > 10_000

    assert set(steps(nbflow("run", str(pipeline), "--json")).values()) == {"skipped"}

    # edit one notebook so that its output changes: it and its dependents rerun, nothing else
    path = pipeline / "monthly.ipynb"
    nb = json.loads(path.read_text())
    cell = nb["cells"][3]
    cell["source"] = "".join(cell["source"]).replace('.strftime("%Y-%m")', '.strftime("%Y/%m")')
    path.write_text(json.dumps(nb, indent=1))
    status = {s["name"]: s for s in json.loads(nbflow("status", str(pipeline), "--json").stdout)["steps"]}
    assert status["monthly"]["reasons"] == ["cell 4 changed"]
    assert "upstream monthly reruns" in status["load"]["reasons"]
    assert status["clean"]["state"] == "fresh" and status["by_weather"]["state"] == "fresh"
    rerun = steps(nbflow("run", str(pipeline), "--json"))
    assert {n for n, s in rerun.items() if s == "succeeded"} == {"monthly", "load", "report"}
    one = steps(nbflow("run", str(pipeline), "forecast[window=3,features=temp]", "--force", "--json"))
    assert one == {"extract": "skipped", "clean": "skipped", "forecast[window=3,features=temp]": "succeeded"}

    # the parameter worth changing: fewer years in the warehouse
    def days() -> int:
        with sqlite3.connect(pipeline / "data" / "warehouse" / "weather.sqlite") as db:
            return db.execute("SELECT COUNT(*) FROM daily").fetchone()[0]

    before = days()
    changed = steps(nbflow("run", str(pipeline), "-p", "clean.min_year=2014", "--json"))
    assert changed["extract"] == "skipped"
    assert {n for n, s in changed.items() if s == "succeeded"} == {"clean", "monthly", "by_weather", "load", "report",
                                                                   *FORECASTS, "compare_forecasts"}
    assert (before, days()) == (1461, 730)
