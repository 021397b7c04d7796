"""A real cluster: `dask scheduler` and two `dask worker` processes, each in its own working folder, and
data in S3 (a local moto server). Slow: run by `.ci/run` (`-m "slow or not slow"`)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psutil
import pytest

import nbflow

from s3_server import free_port, s3, s3_server, stop_group, wait_for_port  # noqa: F401  (fixture)

pytest.importorskip("distributed")
pytestmark = pytest.mark.slow
DASK = str(Path(sys.executable).parent / "dask")


class Cluster:
    def __init__(self, base: Path, hide: Path | None = None):
        base.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.scheduler = subprocess.Popen([DASK, "scheduler", "--host", "127.0.0.1", "--port", str(self.port),
                                           "--no-dashboard"], cwd=base, start_new_session=True,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port)
        self.workers = [self._worker(base / f"worker{i}", hide) for i in (1, 2)]
        import distributed  # noqa: PLC0415

        with distributed.Client(self.address, timeout="20s") as client:
            client.wait_for_workers(2, timeout=60)

    def _worker(self, folder: Path, hide: Path | None) -> subprocess.Popen:
        folder.mkdir(parents=True)
        command = [DASK, "worker", self.address, "--nworkers", "1", "--nthreads", "1", "--no-dashboard",
                   "--local-directory", str(folder)]
        if hide is not None:  # a worker on "another machine": the driver's folders are not there
            command = ["unshare", "-m", "sh", "-c", f'mount -t tmpfs none "{hide}" && exec "$0" "$@"', *command]
        return subprocess.Popen(command, cwd=folder, start_new_session=True, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)

    def close(self) -> None:
        for process in (*self.workers, self.scheduler):
            stop_group(process)


@pytest.fixture
def cluster(tmp_path, s3_server):
    made = Cluster(tmp_path)
    yield made
    made.close()


@pytest.fixture
def bucket(s3_server):
    name = f"b-{uuid.uuid4().hex[:8]}"
    s3().mkdir(name)
    s3().pipe(f"{name}/raw/raw.csv", b"x\n1\n2\n3\n")
    return name


def _pipeline(root: Path, bucket: str, notebook_factory, sleep: float = 0.0) -> Path:
    notebook_factory(root / "clean.ipynb",
                     f'inputs = {{"raw": "s3://{bucket}/raw/raw.csv"}}\n'
                     f'outputs = {{"clean": "s3://{bucket}/clean/clean.csv"}}',
                     f"import time\ntime.sleep({sleep})",
                     'import pandas as pd\ndf = pd.read_csv(inputs["raw"])\n'
                     'df.assign(y=df.x * 2).to_csv(outputs["clean"], index=False)')
    notebook_factory(root / "total.ipynb",
                     f'inputs = {{"clean": "s3://{bucket}/clean/clean.csv"}}\n'
                     f'outputs = {{"total": "s3://{bucket}/total.txt"}}',
                     'import fsspec, pandas as pd\n'
                     'with fsspec.open(outputs["total"], "w") as f:\n'
                     '    f.write(str(pd.read_csv(inputs["clean"]).y.sum()))')
    (root / "nbflow.yaml").write_text("executor: dask\n")
    return root


def _kernels_of(run_id: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("NBFLOW_RUN_ID") == run_id:
                found.append(p)
        except psutil.Error:
            pass
    return found


def test_a_pipeline_with_s3_data_runs_on_a_real_cluster_and_comes_back_fresh(tmp_path, cluster, bucket,
                                                                             notebook_factory):
    root = _pipeline(tmp_path / "pipe", bucket, notebook_factory)
    events: list = []
    result = nbflow.run(root, dask_address=cluster.address, display=False, listeners=[events.append])
    assert result.ok, result.to_json()
    assert s3().cat(f"{bucket}/total.txt") == b"12"
    for name in ("clean", "total"):  # the executed notebooks are back on the driver
        assert (root / result.steps[name].notebook).is_file()
        assert (root / "_nbflow" / "latest" / f"{name}.ipynb").is_file()
    assert any(type(e).__name__ == "CellFinished" for e in events)  # progress from the workers
    workers = {e.worker for e in events if type(e).__name__ == "StepSucceeded" and getattr(e, "worker", None)}
    assert workers, "the worker each step ran on is recorded"
    again = nbflow.run(root, dask_address=cluster.address, display=False)
    assert {s.status.value for s in again.steps.values()} == {"skipped"}
    s3().pipe(f"{bucket}/raw/raw.csv", b"x\n10\n")
    status = {s.name: s for s in nbflow.Pipeline(root).status()}
    assert status["clean"].state == "stale"
    assert any(f"s3://{bucket}/raw/raw.csv changed" in r for r in status["clean"].reasons)


def test_a_worker_killed_mid_step_costs_one_attempt_and_the_run_goes_on(tmp_path, cluster, bucket,
                                                                       notebook_factory):
    root = _pipeline(tmp_path / "pipe", bucket, notebook_factory, sleep=4)
    killed: list[int] = []
    workers = {w.pid: w for w in cluster.workers}

    def kill_the_worker(event) -> None:
        if type(event).__name__ == "CellStarted" and event.step == "clean" and event.index == 1 and not killed:
            threading.Thread(target=kill, args=(event,), daemon=True).start()

    def kill(event) -> None:
        time.sleep(1.5)  # inside the 4 s cell
        for p in psutil.process_iter():
            try:
                if p.environ().get("NBFLOW_STEP") == "clean":
                    owner = next(a.pid for a in p.parents() if a.pid in workers)
                    killed.append(owner)
                    os.killpg(owner, 9)
                    return
            except (psutil.Error, StopIteration, ProcessLookupError):
                continue

    result = nbflow.run(root, dask_address=cluster.address, display=False, listeners=[kill_the_worker])
    assert killed, "no worker was running the step"
    assert result.ok, result.to_json()
    assert result.steps["clean"].attempts == 2
    deadline = time.time() + 15
    while _kernels_of(result.run_id) and time.time() < deadline:
        time.sleep(0.2)
    assert not _kernels_of(result.run_id), "a kernel outlived its worker"
    workers[killed[0]].wait(timeout=10)


def test_cancel_on_the_driver_stops_remote_kernels_and_brings_partial_notebooks_back(tmp_path, cluster, bucket,
                                                                                     notebook_factory):
    root = _pipeline(tmp_path / "pipe", bucket, notebook_factory, sleep=60)
    started = threading.Event()
    handle = nbflow.run(root, dask_address=cluster.address, display=False, background=True,
                        listeners=[lambda e: started.set() if type(e).__name__ == "CellStarted"
                                   and e.index == 1 else None])
    assert started.wait(60)
    time.sleep(1.5)  # inside the 60 s cell
    handle.cancel()
    result = handle.wait()
    assert result.status.value == "cancelled"
    notebook = root / result.steps["clean"].notebook
    assert notebook.is_file() and "cancelled" in notebook.read_text()
    deadline = time.time() + 15
    while _kernels_of(result.run_id) and time.time() < deadline:
        time.sleep(0.2)
    assert not _kernels_of(result.run_id)


def test_a_local_path_step_fails_on_a_worker_that_cannot_see_the_folder(tmp_path, s3_server, bucket,
                                                                        notebook_factory):
    hidden = tmp_path / "driver"
    root = hidden / "pipe"
    notebook_factory(root / "local.ipynb", 'inputs = {"raw": "data/raw.csv"}\noutputs = {"out": "data/out.csv"}',
                     "print(1)")
    (root / "data").mkdir()
    (root / "data" / "raw.csv").write_text("x\n")
    made = Cluster(tmp_path / "cluster", hide=hidden)
    try:
        result = nbflow.run(root, executor="dask", dask_address=made.address, display=False)
    finally:
        made.close()
    assert not result.ok
    error = result.steps["local"].error
    assert error is not None and error.kind == "not_here"
    assert "data/raw.csv" in error.evalue and "data/out.csv" in error.evalue
    assert re.search(r"URLs .*shared file system", error.evalue)
    assert result.steps["local"].attempts == 1
