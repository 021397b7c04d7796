"""A local S3 server (moto's, from PyPI) standing in for S3: started on a free port, stopped at the end.

`s3_server` (a pytest fixture, one server per test module) sets AWS_ENDPOINT_URL
and dummy credentials for this process and everything a test starts (kernels,
dask workers), and gives the endpoint. Each test makes its own bucket.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on port {port} after {timeout} s")


def stop_group(process: subprocess.Popen) -> None:
    """Stop a process started with start_new_session=True, and everything in its process group."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=10)
            break
        except subprocess.TimeoutExpired:
            continue
    try:
        os.killpg(process.pid, signal.SIGKILL)  # whatever of the group outlived its leader
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def s3_server():
    pytest.importorskip("s3fs")
    server = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
    if not Path(server).exists():
        pytest.skip("moto[server] is not installed")
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    process = subprocess.Popen([server, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    saved = {k: os.environ.get(k) for k in (*AWS_ENV, "AWS_ENDPOINT_URL")}
    os.environ.update(AWS_ENV, AWS_ENDPOINT_URL=endpoint)
    # fsspec keeps S3 file systems by their options, not by the endpoint botocore reads from the environment:
    # one made for an earlier module's server would still talk to that (stopped) server
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    try:
        wait_for_port(port)
        yield endpoint
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        s3fs.S3FileSystem.clear_instance_cache()
        stop_group(process)


def s3():
    """A fresh s3fs filesystem for the test's own reads and writes (no listing cache between them)."""
    import s3fs  # noqa: PLC0415

    return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
