"""Helpers shared by the kernel tests (test_kernels, test_forkserver, test_cells)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import psutil
import pytest

from nbflow import kernels
from nbflow.kernels import StartedKernel


@pytest.fixture(autouse=True)
def shut_down_shared_fork_server() -> Any:
    """start_kernel's fork server lives until interpreter exit; end it with each test (no leaked process)."""
    yield
    server, kernels._shared_server = kernels._shared_server, None
    if server is not None:
        server.shutdown()


async def execute(started: StartedKernel, code: str, timeout: float = 30.0) -> str:
    """Run ``code`` in the kernel; return its stdout plus 'Ename: evalue' for an error."""
    msg_id = started.kc.execute(code)
    output = []
    while True:
        msg = await started.kc.get_iopub_msg(timeout=timeout)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "stream":
            output.append(msg["content"]["text"])
        elif msg["msg_type"] == "error":
            output.append(f"{msg['content']['ename']}: {msg['content']['evalue']}")
        elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            return "".join(output)


async def execute_json(started: StartedKernel, expression: str) -> Any:
    return json.loads(await execute(started, f"import json as _json; print(_json.dumps({expression}))"))


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True
