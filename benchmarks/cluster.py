"""nbflow beyond one machine: a real dask cluster against the local executor, and fingerprints of S3 objects.

    python benchmarks/cluster.py                 # the full run (~5 minutes here)
    python benchmarks/cluster.py --smoke         # tiny sizes, one run each: checks that it works, times nothing
    python benchmarks/cluster.py --json out.json

Run it with the interpreter of an environment that has nbflow, dask.distributed,
s3fs and moto's server (the project's `.venv`, or `pip install -e ".[dask,s3]"
"moto[server]"`). It starts, on this machine, what the measurements need and
stops it at the end (Ctrl-C too), checking that no process is left:

- a real cluster: `dask scheduler` and two `dask worker --nworkers 1
  --nthreads 1` processes, each worker in a working folder of its own;
- a local S3 server (`moto_server`), as tests/s3_server.py does.

Measured:

1. 16 independent steps, each ~1 s of pure CPU in Python (a loop on the
   kernel's CPU clock, so each step costs the same CPU on both paths), as
   whole `nbflow run --force -j 2` processes: the local executor against
   `--executor dask --dask-address` on the 2 workers, interleaved, medians;
   the ratio cluster/local (target <= 1.15).
2. The same with 16 trivial steps: the cluster path's overhead per step, (cluster
   - local) / 16 of the run's wall time, and per worker slot (x 2).
3. The fingerprint of a folder URL of 100 and 1,000 objects in S3 through
   nbflow's own path (`Ledger.describe`, what planning and `nbflow status` call
   for a folder input: one listing, identities from the ETags), against
   downloading the same objects (s3fs `cat` of them all, concurrent), interleaved,
   medians; and the whole `nbflow status` of a step reading that folder.

Timings are medians of interleaved runs on a shared machine: the load average
is printed, and the ratios matter more than the absolute times.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import workloads  # noqa: E402

BIN = Path(sys.executable).parent
CPU_STEP = "import time\nt0 = time.process_time()\nwhile time.process_time() - t0 < {seconds}:\n    sum(range(1000))"


@dataclass
class Sizes:
    steps: int = 16
    cpu_seconds: float = 1.0
    runs: int = 5  # per path, interleaved, after one untimed warm-up of each
    objects: tuple[int, ...] = (100, 1000)
    object_bytes: int = 64 * 1024
    fingerprint_runs: int = 5


def sizes_for(smoke: bool) -> Sizes:
    if smoke:
        return Sizes(steps=2, cpu_seconds=0.05, runs=1, objects=(5, 10), object_bytes=1024, fingerprint_runs=1)
    return Sizes()


# -- processes this script starts: each in its own session, stopped with its whole group ---------------------------

class Processes:
    def __init__(self) -> None:
        self.started: list[subprocess.Popen] = []

    def start(self, command: list[str], cwd: Path, log: Path, env: dict | None = None) -> subprocess.Popen:
        with open(log, "w") as out:
            process = subprocess.Popen(command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                       start_new_session=True)
        self.started.append(process)
        return process

    def stop_all(self) -> list[str]:
        """Stop every group (TERM, then KILL), newest first; what is still there afterwards, said."""
        for process in reversed(self.started):
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(process.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    process.wait(timeout=15)
                    break
                except subprocess.TimeoutExpired:
                    continue
            try:
                os.killpg(process.pid, signal.SIGKILL)  # whatever of the group outlived its leader
            except ProcessLookupError:
                pass
        return [f"process group {p.pid} ({' '.join(p.args[:2])})" for p in self.started if not _group_gone(p.pid)]


def _group_gone(pgid: int) -> bool:
    """Whether no process of the group is left; its killed members are waited for (reaped by init) for up to 10 s."""
    deadline = time.monotonic() + 10
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, what: str) -> None:
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            if process.poll() is not None:
                raise RuntimeError(f"{what} exited ({process.returncode}) before listening on port {port}") from None
            time.sleep(0.1)


def start_cluster(procs: Processes, base: Path, workers: int) -> str:
    import distributed  # noqa: PLC0415

    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    (base / "scheduler").mkdir(parents=True)
    scheduler = procs.start([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                             "--no-dashboard"], base / "scheduler", base / "scheduler" / "log.txt")
    wait_for_port(port, scheduler, "dask scheduler")
    for i in range(1, workers + 1):
        folder = base / f"worker{i}"
        folder.mkdir()
        procs.start([str(BIN / "dask"), "worker", address, "--nworkers", "1", "--nthreads", "1", "--no-dashboard",
                     "--local-directory", str(folder)], folder, folder / "log.txt", measured_env())
    with distributed.Client(address, timeout="30s") as client:
        client.wait_for_workers(workers, timeout=120)
    return address


def start_s3(procs: Processes, base: Path) -> str:
    server = shutil.which("moto_server") or str(BIN / "moto_server")
    port = free_port()
    process = procs.start([server, "-H", "127.0.0.1", "-p", str(port)], base, base / "moto.txt")
    wait_for_port(port, process, "moto_server")
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=endpoint)
    return endpoint


def measured_env() -> dict:
    """As a user has it, with bytecode caching on (see run.py's measured_env)."""
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


# -- 1 and 2: the cluster against the local executor -----------------------------------------------------------------

def independent(folder: Path, n: int, code: str) -> Path:
    workloads._fresh(folder)
    for i in range(n):
        workloads._write(folder / f"step{i:02d}.ipynb", [("inputs = {}\noutputs = {}", "parameters"), (code, "")])
    return folder


def nbflow_run(folder: Path, extra: list[str]) -> tuple[float, dict]:
    command = [str(BIN / "nbflow"), "run", str(folder), "--force", "-j", "2", "--json", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=measured_env(), check=False)
    wall = time.perf_counter() - t0
    try:
        result = json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise RuntimeError(f"{' '.join(command)} printed no JSON (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n"
                           f"{proc.stderr[-3000:]}") from None
    if result.get("status") != "succeeded":
        raise RuntimeError(f"{' '.join(command)}: the run {result.get('status')}:\n{proc.stdout[-3000:]}")
    return wall, result


def compare(folder: Path, address: str, runs: int, warmup: bool) -> dict:
    """`nbflow run` with the local executor and on the cluster, interleaved (local, cluster, local, ...)."""
    paths = {"local": ["--executor", "local"], "cluster": ["--executor", "dask", "--dask-address", address]}
    times: dict[str, list[float]] = {name: [] for name in paths}
    workers: set[str] = set()
    for i in range(runs + (1 if warmup else 0)):
        for name, extra in paths.items():
            wall, result = nbflow_run(folder, extra)
            if name == "cluster":  # where the steps ran, as the ledger recorded it
                from nbflow.api import show  # noqa: PLC0415

                workers |= {s["worker"] for s in show(folder, result["run_id"])["steps"] if s.get("worker")}
            if warmup and i == 0:
                continue
            times[name].append(wall)
    medians = {name: statistics.median(t) for name, t in times.items()}
    # each cluster run against the local run just before it: a burst of load from elsewhere hits both
    paired = sorted(c / lo for c, lo in zip(times["cluster"], times["local"]))
    return {"times": times, "median": medians, "ratio": medians["cluster"] / medians["local"],
            "paired_ratios": paired, "paired_ratio": statistics.median(paired), "workers": sorted(workers)}


# -- 3: fingerprints of S3 objects against downloading them -----------------------------------------------------------

def fill_bucket(bucket: str, count: int, size: int) -> str:
    import s3fs  # noqa: PLC0415

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir(bucket)
    fs.pipe({f"{bucket}/objects/part-{i:05d}.bin": os.urandom(size) for i in range(count)})
    return f"s3://{bucket}/objects"


def fingerprint_vs_download(base: Path, url: str, runs: int) -> dict:
    import s3fs  # noqa: PLC0415

    from nbflow.state import Ledger  # noqa: PLC0415

    ledger = Ledger(base / "fingerprint" / "_nbflow")
    describe, download = [], []
    try:
        for i in range(runs + 1):  # the first of each untimed: it makes the S3 client (botocore's session)
            t0 = time.perf_counter()
            identity, files = ledger.describe(url, {})  # what planning does for a folder input (one listing)
            if i:
                describe.append(time.perf_counter() - t0)
            assert identity is not None and identity[0].startswith("tree:") and files, (url, identity)
            fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
            t0 = time.perf_counter()
            got = fs.cat(fs.find(url))  # every object's bytes, fetched concurrently
            if i:
                download.append(time.perf_counter() - t0)
            assert len(got) == len(files) and all(len(v) for v in got.values())
    finally:
        ledger.close()
    d, g = statistics.median(describe), statistics.median(download)
    return {"objects": len(files), "bytes": identity[1], "describe_s": describe, "download_s": download,
            "describe": d, "download": g, "ratio": d / g}


def status_of_folder_input(base: Path, url: str, runs: int) -> float:
    """The whole `nbflow status` of one step whose input is the folder URL (a process, as a user runs it)."""
    folder = workloads._fresh(base / f"status-{url.split('/')[2]}")
    workloads._write(folder / "read.ipynb", [(f'inputs = {{"parts": "{url}/"}}\noutputs = {{}}', "parameters"),
                                             ("print(1)", "")])
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        proc = subprocess.run([str(BIN / "nbflow"), "status", str(folder), "--json"], capture_output=True, text=True,
                              env=measured_env(), check=False)
        times.append(time.perf_counter() - t0)
        if proc.returncode != 0:
            raise RuntimeError(f"nbflow status failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return statistics.median(times)


# -- the run ----------------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one run each: checks that it works")
    parser.add_argument("--runs", type=int, help="runs of each path (default 5)")
    parser.add_argument("--only", default="cpu,trivial,fingerprint", help="a subset: cpu,trivial,fingerprint")
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one, removed at the end)")
    parser.add_argument("--json", type=Path, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    sizes = sizes_for(args.smoke)
    if args.runs:
        sizes.runs = sizes.fingerprint_runs = args.runs
    only = set(args.only.split(","))
    work = args.work or Path(tempfile.mkdtemp(prefix="nbflow-bench-cluster-"))
    work.mkdir(parents=True, exist_ok=True)
    procs = Processes()
    found: dict = {"load_start": os.getloadavg(), "cpus": os.cpu_count(), "sizes": sizes.__dict__}
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in found['load_start'])} ({os.cpu_count()} CPUs)")
    previous = signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        if only & {"cpu", "trivial"}:
            address = start_cluster(procs, work / "cluster", workers=2)
            print(f"cluster: {address}, 2 workers (1 process, 1 thread each), each in its own folder")
        if "cpu" in only:
            folder = independent(work / "cpu", sizes.steps, CPU_STEP.format(seconds=sizes.cpu_seconds))
            cpu = found["cpu"] = compare(folder, address, sizes.runs, warmup=not args.smoke)
            print(f"{sizes.steps} steps of {sizes.cpu_seconds:g} s CPU, -j 2: local {cpu['median']['local']:.2f} s, "
                  f"cluster {cpu['median']['cluster']:.2f} s, ratio cluster/local {cpu['ratio']:.2f} of the medians, "
                  f"{cpu['paired_ratio']:.2f} the median of the pairs ({cpu['paired_ratios'][0]:.2f}-"
                  f"{cpu['paired_ratios'][-1]:.2f}) (target <= 1.15; {sizes.runs} runs each; workers used: "
                  f"{len(cpu['workers'])})")
        if "trivial" in only:
            folder = independent(work / "trivial", sizes.steps, "x = 1")
            trivial = found["trivial"] = compare(folder, address, sizes.runs, warmup=not args.smoke)
            per_step = (trivial["median"]["cluster"] - trivial["median"]["local"]) / sizes.steps
            trivial["per_step_s"] = per_step
            print(f"{sizes.steps} trivial steps, -j 2: local {trivial['median']['local']:.2f} s, cluster "
                  f"{trivial['median']['cluster']:.2f} s: the cluster path costs {per_step * 1000:+.0f} ms per step "
                  f"of wall time ({per_step * 2000:+.0f} ms per step on its worker slot)")
        if "fingerprint" in only:
            start_s3(procs, work)
            found["fingerprint"] = []
            for count in sizes.objects:
                url = fill_bucket(f"bench-{count}", count, sizes.object_bytes)
                row = fingerprint_vs_download(work, url, sizes.fingerprint_runs)
                row["status_s"] = status_of_folder_input(work, url, sizes.fingerprint_runs)
                found["fingerprint"].append(row)
                print(f"{count} objects of {sizes.object_bytes // 1024} KiB: fingerprint (Ledger.describe) "
                      f"{row['describe'] * 1000:.0f} ms, download {row['download'] * 1000:.0f} ms, ratio "
                      f"{row['ratio']:.3f}; `nbflow status` of a step reading the folder {row['status_s']:.2f} s")
    finally:
        left = procs.stop_all()
        left += leftover_kernels(work)
        signal.signal(signal.SIGTERM, previous)
        found["load_end"] = os.getloadavg()
        found["left_behind"] = left
        print(f"load average at end: {' '.join(f'{x:.2f}' for x in found['load_end'])}; processes left behind: "
              f"{', '.join(left) if left else 'none'}")
        if args.json:
            args.json.write_text(json.dumps(found, indent=1, default=str))
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if left else 0


def leftover_kernels(work: Path) -> list[str]:
    """Kernels of the benchmark's pipelines still running (there should be none): named, then killed."""
    from nbflow.reaper import find_processes, kill_processes  # noqa: PLC0415

    wanted = [{"NBFLOW_PIPELINE": str(work / name)} for name in ("cpu", "trivial")]
    pids = find_processes(wanted)
    if pids:
        kill_processes(wanted)
    return [f"kernel {pid}" for pid in pids]


if __name__ == "__main__":
    sys.exit(main())
