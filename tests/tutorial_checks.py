"""What notebooks/tutorial.ipynb, run from top to bottom, shows: the widget, the graph and the incremental rerun.

It runs in tests/test_binder.py, in the Binder environment (a fresh venv from binder/); the checks are here.
"""

from __future__ import annotations

from pathlib import Path

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
STEPS = ("sales", "daily", "report")


def outputs(nb) -> list[dict]:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]


def stdout_of(cell) -> str:
    return "".join(o.text for o in cell.outputs if o.output_type == "stream" and o.name == "stdout")


def final_states(text: str) -> dict[str, str]:
    """{step: state} from the text twin of a finished run's display."""
    rows = [line.split() for line in text.splitlines()[1:]]
    return {row[0]: " ".join(row[1:3]) if row[1:3] == ["not", "run"] else row[1] for row in rows}


def code_cell(nb, starts_with: str, nth: int = 0):
    return [c for c in nb.cells if c.cell_type == "code" and c.source.startswith(starts_with)][nth]


def check_the_executed_tutorial(nb, folder: Path) -> None:
    """What the tutorial, executed top to bottom in `folder` (beside the example's nbflow.yaml and _nbflow/,
    as in notebooks/, so that its own pipeline sits inside another one), must show.

    tests/test_binder.py executes it in the Binder environment (binder/: a fresh venv, its own kernel, what
    the Binder link opens) and calls this: the tutorial runs once in the suite, where users run it.
    """
    assert not any("parameters" in c.metadata.get("tags", []) for c in nb.cells)  # not a step itself
    errors = [o for o in outputs(nb) if o.output_type == "error"]
    assert not errors, errors

    # three runs; each live widget became its final HTML table, which is what the saved notebook keeps:
    # no widget view is left that a viewer without the kernel would look up ("model not found")
    assert not any(WIDGET_VIEW in o.get("data", {}) for o in outputs(nb))
    runs = [o for o in outputs(nb) if "nbflow-run-static" in o.get("data", {}).get("text/html", "")]
    assert len(runs) == 3
    states = [final_states(o.data["text/plain"]) for o in runs]
    assert states == [{"sales": "succeeded", "daily": "succeeded", "report": "succeeded"},
                      {"sales": "skipped", "daily": "failed", "report": "not run"},
                      {"sales": "skipped", "daily": "succeeded", "report": "succeeded"}]
    broken = runs[1].data["text/html"]
    assert "KeyError" in broken and "daily.ipynb</a>" in broken
    # the failing cell as the executed notebook numbers it (its banner says the same), the rerun call
    assert "In [3]: <code>daily = sales.groupby" in broken
    assert "nbflow.run(&#x27;tutorial_work&#x27;, [&#x27;daily&#x27;, &#x27;report&#x27;])" in broken

    # the DAG, drawn by nbflow.Pipeline's HTML repr
    pictures = [o.data.get("text/html", "") + o.data.get("image/svg+xml", "") for o in outputs(nb)
                if "data" in o and WIDGET_VIEW not in o.data]
    assert any("<svg" in p and all(f">{step}<" in p for step in STEPS) for p in pictures)

    # status before any run, after the break, after the fix
    assert "sales    stale  never run" in stdout_of(code_cell(nb, "def show_status"))
    after_break = stdout_of(code_cell(nb, "show_status()"))
    assert "sales    fresh" in after_break
    assert "daily    stale  cell 4 changed" in after_break
    assert "report   stale  upstream daily reruns" in after_break
    after_fix = stdout_of(code_cell(nb, 'edit_step("daily", \'("amuont"'))
    assert "daily    stale" in after_fix and "last run failed" in after_fix

    # the failure, and the executed notebook kept for it with papermill's error banner on top
    failure = stdout_of(code_cell(nb, 'failed = result.steps["daily"]'))
    assert "KeyError" in failure and "(In [3])" in failure and '("amuont", "count")' in failure
    banner = code_cell(nb, "kept = nbformat.read").outputs[0].data["text/markdown"]
    assert "An Exception was encountered" in banner and "KeyError" in banner and "In [3]" in banner

    # the rerun after the fix: only the failed step and what depends on it
    rerun = stdout_of(code_cell(nb, "for name, step in result.steps.items():\n    print(f\"{name:8} {step.status"))
    assert "sales    skipped" in rerun
    assert "daily    succeeded" in rerun
    assert "report   succeeded  upstream daily reruns" in rerun
    assert "42 orders" in rerun
    assert (folder / "tutorial_work" / "report.md").exists()
