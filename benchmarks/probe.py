"""Measurements that must run inside the interpreter being benchmarked.

Owns: the in-process baselines (a papermill loop, plain nbclient, parquet
write/read, the CPU time of one ordinary kernel boot) and the versions of the
measured environment. `run.py` starts this file with `--python`; each
subcommand prints one JSON object on stdout.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def versions() -> dict:
    from importlib import metadata

    found = {}
    for dist in ("nbflow", "papermill", "nbclient", "nbformat", "ipykernel", "jupyter_client", "jsonschema",
                 "pandas", "pyarrow", "jupyterlab", "jupyter_events", "rfc3987_syntax"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[dist] = None
    return {"python": sys.version.split()[0], "executable": sys.executable, "packages": found}


def papermill_loop(folder: str, out: str) -> dict:
    """papermill.execute_notebook on each notebook of `folder`, in name order (a chain is named in order)."""
    t0 = time.perf_counter()
    import papermill as pm

    t1 = time.perf_counter()
    Path(out).mkdir(parents=True, exist_ok=True)
    for nb in sorted(Path(folder).glob("*.ipynb")):
        pm.execute_notebook(str(nb), str(Path(out) / nb.name), cwd=folder, progress_bar=False)
    return {"import_s": t1 - t0, "loop_s": time.perf_counter() - t1}


def papermill_grid(folder: str, out: str, a: int, b: int) -> dict:
    """The grid workload as a papermill loop: sweep.ipynb once per (a, b), each given its own output path
    (what nbflow's injected cell does), then the fan-in gather.ipynb."""
    t0 = time.perf_counter()
    import papermill as pm

    t1 = time.perf_counter()
    Path(out).mkdir(parents=True, exist_ok=True)
    retried = 0

    def execute(name: str, output: str, parameters: dict) -> None:
        nonlocal retried
        try:
            pm.execute_notebook(str(Path(folder) / name), str(Path(out) / output), parameters=parameters,
                                cwd=folder, progress_bar=False)
        except RuntimeError as e:  # "Kernel died before replying to kernel_info", on a loaded machine: once more
            if "kernel_info" not in str(e):
                raise
            retried += 1
            pm.execute_notebook(str(Path(folder) / name), str(Path(out) / output), parameters=parameters,
                                cwd=folder, progress_bar=False)

    for i in range(a):
        for j in range(b):
            execute("sweep.ipynb", f"sweep-{i}-{j}.ipynb",
                    {"a": i, "b": j, "outputs": {"out": f"parts/a={i}/b={j}/out.txt"}})
    execute("gather.ipynb", "gather.ipynb", {})
    return {"import_s": t1 - t0, "loop_s": time.perf_counter() - t1, "kernel_start_retries": retried}


def papermill_engines(path: str, out: str, calls: int) -> dict:
    """`calls` papermill.execute_notebook calls with the default engine and as many with engine_name="nbflow".

    One process, the calls interleaved (default, nbflow, default, ...) so that a burst of load from
    elsewhere hits both; each call's wall time. nbflow's first call includes its fork server's boot.
    """
    t0 = time.perf_counter()
    import papermill as pm

    import_s = time.perf_counter() - t0
    Path(out).mkdir(parents=True, exist_ok=True)
    times: dict[str, list[float]] = {"default": [], "nbflow": []}
    for i in range(calls):
        for engine in ("default", "nbflow"):
            t0 = time.perf_counter()
            pm.execute_notebook(path, str(Path(out) / f"{engine}-{i}.ipynb"), parameters={"alpha": 0.5 + i},
                                engine_name=None if engine == "default" else engine, progress_bar=False)
            times[engine].append(time.perf_counter() - t0)
    return {"import_s": import_s, **times}


def nbclient_plain(path: str, out: str) -> dict:
    """Read, `NotebookClient(nb).execute()`, write: the plain nbclient way to run one notebook."""
    t0 = time.perf_counter()
    import nbformat
    from nbclient import NotebookClient

    t1 = time.perf_counter()
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, resources={"metadata": {"path": str(Path(path).parent)}}).execute()
    t2 = time.perf_counter()
    nbformat.write(nb, out)
    return {"import_s": t1 - t0, "execute_s": t2 - t1, "write_s": time.perf_counter() - t2}


def kernel_boot_cpu(runs: int) -> dict:
    """CPU time (user + sys) of ordinary kernel boots: `python -m ipykernel_launcher` until it answers kernel_info.

    Each kernel is started as our child, killed as soon as it is ready, and its
    rusage read with os.wait4: what one kernel boot costs the machine.
    """
    import signal
    import subprocess
    import tempfile

    from jupyter_client import BlockingKernelClient
    from jupyter_client.connect import write_connection_file

    cpu, wall = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(runs):
            conn, _info = write_connection_file(os.path.join(tmp, f"k{i}.json"))
            t0 = time.perf_counter()
            proc = subprocess.Popen([sys.executable, "-m", "ipykernel_launcher", "-f", conn],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp)
            client = BlockingKernelClient(connection_file=conn)
            client.load_connection_file()
            client.start_channels(hb=False)  # no heartbeat: a slow boot is not a dead kernel
            try:
                client.wait_for_ready(timeout=120)
                wall.append(time.perf_counter() - t0)
            finally:
                client.stop_channels()
                proc.send_signal(signal.SIGKILL)
                _pid, _status, usage = os.wait4(proc.pid, 0)
                proc.returncode = -9
            cpu.append(usage.ru_utime + usage.ru_stime)
    return {"cpu_s": cpu, "wall_s": wall}


def parquet_write(path: str, rows: int) -> dict:
    """Cold parquet write in a fresh process (pandas imported, its parquet engine not yet), as in a fresh kernel."""
    import pandas as pd

    sys.path.insert(0, str(Path(__file__).parent))
    from workloads import handover_frame_code

    frame = eval(handover_frame_code(rows), {"pd": pd})  # our own generated expression
    c0, t0 = time.process_time(), time.perf_counter()
    frame.to_parquet(path)
    return {"write_cpu_s": time.process_time() - c0, "write_s": time.perf_counter() - t0}


def parquet_read(path: str) -> dict:
    """Cold parquet read in a fresh process (pandas imported)."""
    import pandas as pd

    c0, t0 = time.process_time(), time.perf_counter()
    frame = pd.read_parquet(path)
    return {"read_cpu_s": time.process_time() - c0, "read_s": time.perf_counter() - t0, "rows": len(frame)}


def main(argv: list[str]) -> None:
    command, args = argv[0], argv[1:]
    if command == "versions":
        result = versions()
    elif command == "papermill-loop":
        result = papermill_loop(*args)
    elif command == "papermill-grid":
        result = papermill_grid(args[0], args[1], int(args[2]), int(args[3]))
    elif command == "papermill-engines":
        result = papermill_engines(args[0], args[1], int(args[2]))
    elif command == "nbclient":
        result = nbclient_plain(*args)
    elif command == "kernel-boot-cpu":
        result = kernel_boot_cpu(int(args[0]))
    elif command == "parquet-write":
        result = parquet_write(args[0], int(args[1]))
    elif command == "parquet-read":
        result = parquet_read(args[0])
    else:
        raise SystemExit(f"unknown probe {command!r}")
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
