"""benchmarks/run.py in its smoke mode: every workload runs, and what is not a timing is checked.

Timings are never asserted (the machines are shared and noisy); the import
checks and the all-fresh run (no kernel, no notebook) are facts, so they are.
"""

from __future__ import annotations

import pytest

import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


@pytest.mark.slow
def test_the_benchmark_runs_every_workload_in_smoke_mode(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "run.py"), "--smoke", "--work", str(tmp_path / "work"),
                           "--json", str(out), "--markdown", str(tmp_path / "table.md")],
                          capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    rows = {row["workload"]: row for row in results["rows"]}
    for workload in ("2-step chain, forced", "2-step chain p99/p50 (2 runs)", "2-step chain, all fresh: `nbflow run`",
                     "2 independent steps, -j 2", "one notebook of 5 cells", "DataFrame hand-over (10,000 rows)",
                     "6-step pipeline: `nbflow status`, never run", "6-step pipeline: `nbflow status`, all fresh",
                     "`nbflow --help`", "`import nbflow`", "4-instance grid + fan-in, -j 2, forced",
                     "40-instance grid: `nbflow status`, never run", "6-instance grid: `nbflow status`, all fresh",
                     "2-step chain, forced: `nbflow run --force`", "6-step pipeline, all fresh: `nbflow run`",
                     "watch: notebook save -> first cell of the stale step"):
        assert workload in rows, f"no row {workload!r} in {sorted(rows)}"
    for command in ("import nbflow", "nbflow --help", "nbflow status", "nbflow run (all fresh)"):
        row = rows[f"imports: {command}"]
        assert row["met"] is True, row  # none of papermill, pandas, nbformat, jsonschema
    assert rows["imports: nbflow run --force (driver)"]["met"] is True  # no jsonschema on the executor's path
    assert "jsonschema" in results["raw"]["imports"]["import nbclient"]  # what the executor avoids
    assert "| workload | nbflow |" in (tmp_path / "table.md").read_text()
