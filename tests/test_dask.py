"""The dask executor runs the same pipeline with the same results."""

from __future__ import annotations

import logging

import pytest

import nbflow

# integration: runs with the full suite (`pytest -m "slow or not slow"`, what CI runs)
pytestmark = pytest.mark.slow

pytest.importorskip("distributed")


def test_dask_local_cluster_gives_the_same_outputs(fixture_pipeline, caplog):
    local = fixture_pipeline("diamond")
    assert nbflow.run(local, display=False).ok
    expected = {p.name: p.read_text() for p in (local / "data").glob("*.txt")}
    import shutil

    remote = local.parent / "diamond-dask"
    shutil.copytree(local, remote, ignore=shutil.ignore_patterns("_nbflow", "a.txt", "b.txt", "c.txt", "d.txt",
                                                                 "e.txt"))
    events = []
    result = nbflow.run(remote, executor="dask", jobs=2, display=False, listeners=[events.append])
    assert result.ok, result.to_json()
    assert {p.name: p.read_text() for p in (remote / "data").glob("*.txt")} == expected
    assert any(type(e).__name__ == "CellFinished" for e in events)  # progress crosses from the workers
    # and the run ends quietly: no error logged by the scheduler (a worker's wait on the cancel event, cut off
    # by the cluster's close, was logged with a traceback at the end of every run)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]
