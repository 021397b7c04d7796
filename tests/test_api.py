"""The Python API: Pipeline, background runs, history."""

from __future__ import annotations

import pytest

import nbflow
from nbflow.events import RunStatus, StepStatus


def test_pipeline_view(fixture_pipeline):
    pipeline = nbflow.Pipeline(fixture_pipeline("diamond"))
    assert set(pipeline.steps) == {"a", "b", "c", "d", "sub/e"}
    assert pipeline.graph["d"] == ["b", "c"]
    states = {s.name: s.state for s in pipeline.status()}
    assert states["driver"] == "not_a_step" and states["a"] == "stale"
    assert "Pipeline(" in repr(pipeline)


def test_background_run_returns_a_handle(fixture_pipeline):
    root = fixture_pipeline("diamond")
    handle = nbflow.run(root, background=True, display=False)
    assert isinstance(handle, nbflow.RunHandle)
    result = handle.wait(timeout=300)
    assert handle.done and result is handle.result and result.ok


def test_background_run_can_be_cancelled(tmp_path, notebook_factory):
    notebook_factory(tmp_path / "slow.ipynb", 'outputs = {"o": "o.txt"}', "import time\ntime.sleep(60)",
                     'open(outputs["o"], "w").write("x")')
    notebook_factory(tmp_path / "later.ipynb", 'inputs = {"o": "o.txt"}\noutputs = {}', "pass")
    started = []
    handle = nbflow.run(tmp_path, background=True, display=False,
                        listeners=[lambda e: started.append(e) if type(e).__name__ == "CellStarted" else None])
    while len(started) < 2 and not handle.done:
        handle.wait(timeout=0.1)
    handle.cancel()
    result = handle.wait(timeout=60)
    assert result.status == RunStatus.CANCELLED
    assert result.steps["slow"].status == StepStatus.CANCELLED
    assert result.steps["later"].status in (StepStatus.CANCELLED, StepStatus.NOT_RUN)
    assert (tmp_path / result.steps["slow"].notebook).exists()  # the partial notebook is kept


def test_history_is_a_dataframe(fixture_pipeline):
    root = fixture_pipeline("diamond")
    first = nbflow.run(root, ["a"], display=False)
    second = nbflow.run(root, ["a"], display=False)
    frame = nbflow.history(root)
    assert list(frame.run_id) == [second.run_id, first.run_id]
    assert list(frame.status) == ["succeeded", "succeeded"]
    assert str(frame.started_at.dtype).startswith("datetime64")
    assert frame.steps.iloc[0] == {"skipped": 1}


def test_history_of_a_pipeline_never_run_is_empty(tmp_path):
    assert nbflow.history(tmp_path).empty
    assert not (tmp_path / "_nbflow").exists()


def test_status_reads_the_notebooks_as_they_are_now(fixture_pipeline, notebook_factory):
    root = fixture_pipeline("diamond")
    pipeline = nbflow.Pipeline(root)
    assert pipeline.run("a", display=False).ok
    assert {s.name: s.state for s in pipeline.status()}["a"] == "fresh"
    notebook_factory(root / "a.ipynb", 'inputs = {"seed": "data/seed.txt"}\noutputs = {"a": "data/a.txt"}\nscale = 2',
                     'open(outputs["a"], "w").write("0")')
    assert {s.name: s.reasons for s in pipeline.status()}["a"] == ("cell 2 changed",)


def test_start_returns_a_handle_and_check_raises_for_a_failed_run(fixture_pipeline):
    import pickle

    root = fixture_pipeline("step_raises")
    handle = nbflow.start(root, display=False)
    assert isinstance(handle, nbflow.RunHandle)
    result = handle.wait()
    assert result is not None and not result.ok
    with pytest.raises(nbflow.RunFailed, match=r"boom: failed \(ZeroDivisionError: division by zero") as err:
        result.check()
    assert err.value.exit_code == 1 and err.value.result is result
    assert str(pickle.loads(pickle.dumps(err.value))) == str(err.value)  # survives pickling (dask, threads)
    assert nbflow.run(root, "ok", display=False).check().ok


def test_the_public_names_exist_and_states_are_strings():
    for name in nbflow.__all__:
        assert getattr(nbflow, name) is not None, name
    assert nbflow.StepStatus.NOT_RUN == "not_run" and f"{nbflow.RunStatus.CANCELLED}" == "cancelled"
    from nbflow import events

    assert set(events.__all__) >= {"StepFailed", "StepStarted", "RunResult", "Listener"}
    assert not any(name.startswith("_") for name in events.__all__)


def test_api_functions_named_like_modules_work_from_the_package_face(fixture_pipeline):
    """nbflow.schedule is the function; the module behind it must not shadow it (or be shadowed)."""
    import subprocess
    import sys

    root = fixture_pipeline("diamond")
    code = ("import nbflow, sys; planned = nbflow.schedule(sys.argv[1], '0 6 * * *'); print(planned.expression); "
            "print(nbflow.show.__module__, nbflow.lineage.__module__, nbflow.clean.__module__)")
    done = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["0 6 * * *", "nbflow.api nbflow.api nbflow.api"]
