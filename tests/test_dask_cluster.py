"""A real cluster: `dask scheduler` and two `dask worker` processes, each in its own working folder, and
data in S3 (a local moto server). Slow: run by `.ci/run` (`-m "slow or not slow"`)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import psutil
import pytest

import nbflow
from nbflow.api import runs
from nbflow.errors import PipelineError

from s3_server import free_port, s3, s3_server, stop_group, wait_for_port  # noqa: F401  (fixture)

pytest.importorskip("distributed")
pytestmark = pytest.mark.slow
DASK = str(Path(sys.executable).parent / "dask")
NBFLOW = str(Path(sys.executable).parent / "nbflow")


class Cluster:
    def __init__(self, base: Path, hide: Path | None = None, workers: int = 2, env: dict[str, str] | None = None):
        base.mkdir(parents=True, exist_ok=True)
        self.env = env or {}  # the workers'
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.scheduler = subprocess.Popen([DASK, "scheduler", "--host", "127.0.0.1", "--port", str(self.port),
                                           "--no-dashboard"], cwd=base, start_new_session=True,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port)
        self.workers = [self._worker(base / f"worker{i}", hide) for i in range(1, workers + 1)]
        import distributed  # noqa: PLC0415

        with distributed.Client(self.address, timeout="20s") as client:
            client.wait_for_workers(workers, timeout=60)

    def _worker(self, folder: Path, hide: Path | None) -> subprocess.Popen:
        folder.mkdir(parents=True)
        command = [DASK, "worker", self.address, "--nworkers", "1", "--nthreads", "1", "--no-dashboard",
                   "--local-directory", str(folder)]
        if hide is not None:  # a worker on "another machine": the driver's folders are not there
            command = ["unshare", "-m", "sh", "-c", f'mount -t tmpfs none "{hide}" && exec "$0" "$@"', *command]
        return subprocess.Popen(command, cwd=folder, start_new_session=True, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env={**os.environ, **self.env})

    def close(self) -> None:
        for process in (*self.workers, self.scheduler):
            stop_group(process)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3_server):
    """One cluster for the tests that leave it as they found it."""
    made = Cluster(tmp_path_factory.mktemp("cluster"))
    yield made
    made.close()


@pytest.fixture
def own_cluster(tmp_path, s3_server):
    """A cluster of the test's own, for a test that kills a part of it."""
    made = Cluster(tmp_path / "cluster")
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


def test_a_worker_killed_mid_step_costs_one_attempt_and_the_run_goes_on(tmp_path, own_cluster, bucket,
                                                                       notebook_factory):
    cluster = own_cluster
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


def test_the_scheduler_going_away_mid_run_fails_the_run_naming_it_and_loses_nothing_on_the_driver(
        tmp_path, notebook_factory):
    root = tmp_path / "pipe"
    (root / "data").mkdir(parents=True)
    running = tmp_path / "second-runs"  # written by the step's long cell: the kernel is there, mid-step
    notebook_factory(root / "first.ipynb", 'inputs = {}\noutputs = {"a": "data/a.txt"}',
                     'open(outputs["a"], "w").write("1")')
    notebook_factory(root / "second.ipynb", 'inputs = {"a": "data/a.txt"}\noutputs = {"b": "data/b.txt"}',
                     f"import time\nopen({str(running)!r}, 'w').close()\ntime.sleep(600)")
    scratch = Path(tempfile.mkdtemp(prefix="nbflow-w-"))  # the worker's temp folder (short: sockets live there)
    made = Cluster(tmp_path / "cluster", workers=1, env={"TMPDIR": str(scratch)})
    try:
        run = subprocess.Popen([NBFLOW, "run", str(root), "--executor", "dask", "--dask-address", made.address],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        while not running.exists() and run.poll() is None:
            time.sleep(0.05)
        assert running.exists(), run.communicate()
        os.killpg(made.scheduler.pid, signal.SIGKILL)
        out, err = run.communicate(timeout=120)  # a guard: the run ends as soon as its client sees the loss
        for worker in made.workers:  # a worker closes once it loses its scheduler, its step's kernel stopped first
            worker.wait(timeout=120)
        left = list(scratch.glob("nbflow-task-*"))
    finally:
        made.close()
        shutil.rmtree(scratch, ignore_errors=True)
    said = out + err
    assert run.returncode == 1, said
    assert f"lost the connection to the dask scheduler at {made.address}" in said
    assert "Traceback" not in said
    [last] = runs(root, limit=1)
    assert last["status"] == "failed"  # recorded as such, not left `running`
    assert (root / "_nbflow" / "runs" / last["run_id"] / "first.ipynb").is_file()  # what finished is kept
    assert (root / "data" / "a.txt").read_text() == "1"
    assert not _kernels_of(last["run_id"]), "a kernel outlived its worker"
    # the worker ended the step before it exited (not abandoned mid-cell when its process went): its scratch is gone
    assert not left


def test_an_unreachable_store_on_the_cluster_path_fails_before_any_step(tmp_path, cluster, notebook_factory,
                                                                        monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    root = tmp_path / "pipe"
    notebook_factory(root / "read.ipynb", 'inputs = {"raw": "s3://bkt/raw.csv"}', "print(1)")
    (root / "nbflow.yaml").write_text("executor: dask\nstorage:\n  s3:\n    config_kwargs: {retries: "
                                      "{max_attempts: 1}}\n    skip_instance_cache: true\n")
    events: list = []
    with pytest.raises(PipelineError) as raised:
        nbflow.run(root, dask_address=cluster.address, display=False, listeners=[events.append])
    message = str(raised.value)
    assert "s3://bkt/raw.csv" in message and "cannot connect" in message and "does not exist" not in message
    assert "127.0.0.1:9" in message
    assert not events  # no run started, so no step
    assert not (root / "_nbflow" / "runs").exists() or not any((root / "_nbflow" / "runs").iterdir())


def test_a_runs_kernel_pool_on_a_worker_goes_once_no_task_has_used_it_for_a_while(monkeypatch):
    """Its driver may have been killed (no close() to release it): the fork server and warm fork do not stay."""
    from nbflow.executors import dask as executor  # noqa: PLC0415

    pools = executor._RunKernels
    monkeypatch.setattr(pools, "IDLE_RELEASE_S", 0.2)
    pools.start("run-x", True, None, None)  # as the executor's Client.run does when the run starts
    kernels = pools.take("run-x", True, None, None)  # a task of the run
    assert pools._runs["run-x"] is kernels and kernels.active == 1 and kernels._idle is None
    pools.give_back("run-x", kernels)
    assert kernels.closed.wait(60)  # released by its timer, from another thread: fork server and warm fork stopped
    assert "run-x" not in pools._runs and kernels.loop.is_closed()
