"""Tests for nbflow.forkserver: forked kernels are fresh, isolated and never outlive the driver."""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from nbflow import kernels
from nbflow.forkserver import ForkServer, ForkServerError
from nbflow.kernels import KernelRequest, start_kernel

REPO = Path(__file__).resolve().parent.parent


from kernel_helpers import execute, execute_json, gone, shut_down_shared_fork_server, wait_until  # noqa: E402,F401


def test_forked_kernels_do_not_share_variables_or_random_state(tmp_path: Path) -> None:
    async def main() -> None:
        first = await start_kernel(KernelRequest("python3", str(tmp_path), {}))
        try:
            assert first.mode == "forkserver"
            await execute(first, "leaked = 'from the first kernel'")
            first_random = await execute_json(first, "__import__('random').random()")
        finally:
            await first.stop()
        second = await start_kernel(KernelRequest("python3", str(tmp_path), {}))
        try:
            assert second.mode == "forkserver" and second.pid != first.pid
            assert await execute(second, "print(leaked)") == "NameError: name 'leaked' is not defined"
            assert await execute_json(second, "__import__('random').random()") != first_random
        finally:
            await second.stop()

    asyncio.run(main())


def test_concurrent_starts_get_separate_working_kernels(tmp_path: Path) -> None:
    async def main() -> None:
        started = await asyncio.gather(
            *(start_kernel(KernelRequest("python3", str(tmp_path), {"WHO": str(i)})) for i in range(4))
        )
        try:
            assert [s.mode for s in started] == ["forkserver"] * 4
            assert len({s.pid for s in started}) == 4
            outputs = await asyncio.gather(*(execute(s, "import os; print(os.environ['WHO'])") for s in started))
            assert outputs == [f"{i}\n" for i in range(4)]
        finally:
            await asyncio.gather(*(s.stop() for s in started))

    asyncio.run(main())


def test_cwd_env_and_sys_path_match_an_ordinary_kernel(tmp_path: Path) -> None:
    (tmp_path / "helper_next_to_notebook.py").write_text("ANSWER = 42\n")
    request = KernelRequest("python3", str(tmp_path), {"NBFLOW_TEST_VALUE": "forked?"})
    probe = (
        "{'cwd': __import__('os').getcwd(), 'env': __import__('os').environ.get('NBFLOW_TEST_VALUE'),"
        " 'path': __import__('sys').path, 'argv0': __import__('sys').argv[0],"
        " 'answer': __import__('helper_next_to_notebook').ANSWER,"
        " 'nbflow_loaded': sorted(m for m in __import__('sys').modules if 'nbflow' in m)}"
    )

    async def probe_kernel(use_forkserver: bool) -> Any:
        started = await start_kernel(request, use_forkserver=use_forkserver)
        try:
            assert started.mode == ("forkserver" if use_forkserver else "ordinary")
            return await execute_json(started, probe)
        finally:
            await started.stop()

    forked = asyncio.run(probe_kernel(True))
    ordinary = asyncio.run(probe_kernel(False))
    assert forked["cwd"] == str(tmp_path)
    assert forked["env"] == "forked?"
    assert forked["answer"] == 42
    assert forked["nbflow_loaded"] == []
    assert forked == ordinary


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/<pid>/environ is Linux's")
def test_proc_shows_the_environment_of_a_forked_kernel_and_of_what_it_forks(tmp_path: Path) -> None:
    """ps and psutil, and nbflow's reaper that finds what a step started by its NBFLOW_* variables."""
    request = KernelRequest("python3", str(tmp_path), {"NBFLOW_TEST_VALUE": "seen"})

    async def main() -> None:
        started = await start_kernel(request)
        try:
            assert started.mode == "forkserver"
            environ = psutil.Process(started.pid).environ()
            assert environ["NBFLOW_TEST_VALUE"] == "seen" and environ["JPY_PARENT_PID"] == str(os.getpid())
            assert "NBFLOW_FORKSERVER_ENVIRON_ROOM" not in environ
            forked = int(await execute(started, "import os, time\npid = os.fork()\n"
                                                "if pid == 0:\n    time.sleep(60)\n    os._exit(0)\nprint(pid)"))
            assert psutil.Process(forked).environ()["NBFLOW_TEST_VALUE"] == "seen"  # no exec, and still
        finally:
            await started.stop()  # its process group, with the forked child

    asyncio.run(main())


def test_forked_kernel_is_a_separate_session_watched_by_the_server(tmp_path: Path) -> None:
    async def main() -> None:
        started = await start_kernel(KernelRequest("python3", str(tmp_path), {}))
        try:
            server = kernels._shared_server
            assert server is not None and server.pid is not None
            assert os.getsid(server.pid) == server.pid  # a terminal's Ctrl-C is not for the server
            kernel = psutil.Process(started.pid)
            assert kernel.ppid() == server.pid
            assert os.getpgid(started.pid) == os.getsid(started.pid) == started.pid
            facts = await execute_json(
                started,
                "{'jpy': __import__('os').environ['JPY_PARENT_PID'],"
                " 'stdin': __import__('os').readlink('/proc/self/fd/0'),"
                " 'sigint_default': __import__('signal').getsignal(__import__('signal').SIGCHLD) == 0}",
            )
            assert facts == {"jpy": str(os.getpid()), "stdin": os.devnull, "sigint_default": True}
        finally:
            await started.stop()

    asyncio.run(main())


def test_exit_status_of_a_forked_kernel_reaches_the_manager(tmp_path: Path) -> None:
    async def main() -> None:
        started = await start_kernel(KernelRequest("python3", str(tmp_path), {}))
        try:
            started.kc.execute("import os; os._exit(3)")
            deadline = time.monotonic() + 10
            while await started.km.is_alive():
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            assert await started.km.provisioner.poll() == 3
        finally:
            await started.stop()

    asyncio.run(main())


def test_interpreter_level_environment_change_falls_back(tmp_path: Path) -> None:
    async def main() -> None:
        started = await start_kernel(KernelRequest("python3", str(tmp_path), {"PYTHONHASHSEED": "123"}))
        try:
            assert started.mode == "ordinary"
            assert "PYTHONHASHSEED" in (started.fallback_reason or "")
            assert await execute(started, "import sys; print(sys.flags.hash_randomization)") == "1\n"
        finally:
            await started.stop()

    asyncio.run(main())


def test_server_refuses_a_command_that_is_not_ipykernel(tmp_path: Path) -> None:
    server = ForkServer()
    try:
        with pytest.raises(ForkServerError, match="not an ipykernel command line") as raised:
            asyncio.run(server.fork_kernel([sys.executable, "-c", "pass"], str(tmp_path), dict(os.environ)))
        copy = pickle.loads(pickle.dumps(raised.value))
        assert copy.reason == raised.value.reason
    finally:
        server.shutdown()
    with pytest.raises(ForkServerError, match="shut down"):
        server.start()


DRIVER = textwrap.dedent(
    """
    import asyncio, json, sys
    sys.path.insert(0, sys.argv[1])
    from nbflow.kernels import KernelPool, KernelRequest

    async def main():
        pool = KernelPool(max_prestarted=1)
        started = await pool.acquire("a", KernelRequest("python3", sys.argv[2], {}))
        msg_id = started.kc.execute("import subprocess; print(subprocess.Popen(['sleep', '100']).pid)")
        while True:
            msg = await started.kc.get_iopub_msg(timeout=30)
            if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "stream":
                break
        facts = {"mode": started.mode, "server": pool._fork_server.pid, "kernel": started.pid,
                 "sleeper": int(msg["content"]["text"]), "directory": pool._fork_server._directory[0]}
        print(json.dumps(facts), flush=True)
        await asyncio.sleep(100)

    asyncio.run(main())
    """
)


def test_killing_the_driver_ends_the_server_the_kernel_and_its_subprocesses(tmp_path: Path) -> None:
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    driver = subprocess.Popen([sys.executable, str(script), str(REPO), str(tmp_path)], stdout=subprocess.PIPE)
    try:
        assert driver.stdout is not None
        ready, _, _ = select.select([driver.stdout], [], [], 60)
        assert ready, "the driver did not start a kernel"
        facts = json.loads(driver.stdout.readline())
        assert facts["mode"] == "forkserver"
        processes = [facts["server"], facts["kernel"], facts["sleeper"]]
        assert not any(gone(pid) for pid in processes)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        if driver.stdout is not None:
            driver.stdout.close()
    assert wait_until(lambda: all(gone(pid) for pid in processes))
    assert not os.path.exists(facts["directory"])
