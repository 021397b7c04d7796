"""Tests for nbflow.kernels: starting, stopping, falling back, pooling kernels."""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from nbflow import forkserver, kernels
from nbflow.errors import NbflowError
from nbflow.kernels import (
    KernelPool,
    KernelRequest,
    KernelStartError,
    StartedKernel,
    installed_kernels,
    kernel_installed,
    start_kernel,
)

MODES = [pytest.param(True, id="forkserver"), pytest.param(False, id="ordinary")]
REPO = Path(__file__).resolve().parent.parent


# -- helpers ------------------------------------------------------------------


from kernel_helpers import execute, execute_json, gone, shut_down_shared_fork_server, wait_until  # noqa: E402,F401


def descendants() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True) if not gone(p.pid)}


def request(cwd: Path, **env: str) -> KernelRequest:
    return KernelRequest(kernel_name="python3", cwd=str(cwd), env=env)


@pytest.fixture
def shell_wrapped_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A python kernel spec whose argv is not 'python -m ipykernel_launcher' (a shell wrapper)."""
    spec_dir = tmp_path / "jupyter" / "kernels" / "wrapped"
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": ["/bin/sh", "-c", 'exec "$0" -m ipykernel_launcher -f "$1"', sys.executable, "{connection_file}"],
        "display_name": "wrapped python",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    return "wrapped"


# -- installed kernels ----------------------------------------------------------


def test_installed_kernels_lists_python3() -> None:
    assert "python3" in installed_kernels()
    assert kernel_installed("python3")
    assert not kernel_installed("no-such-kernel")


def test_unknown_kernel_error_names_the_kernel_and_the_installed_ones(tmp_path: Path) -> None:
    with pytest.raises(KernelStartError) as raised:
        asyncio.run(start_kernel(KernelRequest("ir", str(tmp_path), {})))
    error = raised.value
    assert error.kernel_name == "ir"
    assert "kernel 'ir' is not installed; installed kernels: " in str(error)
    assert "python3" in str(error)
    assert isinstance(error, NbflowError) and error.exit_code == 1
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.kernel_name, str(copy)) == ("ir", str(error))


def test_misspelt_kernel_name_gets_a_suggestion(tmp_path: Path) -> None:
    with pytest.raises(KernelStartError, match="kernel 'pyhton3' is not installed \\(did you mean 'python3'\\?\\)"):
        asyncio.run(start_kernel(KernelRequest("pyhton3", str(tmp_path), {})))


def test_missing_working_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(KernelStartError, match="does-not-exist does not exist"):
        asyncio.run(start_kernel(request(tmp_path / "does-not-exist")))


# -- modes and fallback ---------------------------------------------------------


def test_forkserver_is_used_for_this_interpreters_python_kernel(tmp_path: Path) -> None:
    async def main() -> None:
        started = await start_kernel(request(tmp_path))
        try:
            assert (started.mode, started.fallback_reason) == ("forkserver", None)
            assert started.pid == started.km.provisioner.pid
            assert await started.km.is_alive()
            assert started.km.has_kernel
            assert await execute(started, "print(6 * 7)") == "42\n"
        finally:
            await started.stop()

    asyncio.run(main())


def test_use_forkserver_false_gives_an_ordinary_kernel(tmp_path: Path) -> None:
    async def main() -> None:
        started = await start_kernel(request(tmp_path), use_forkserver=False)
        try:
            assert started.mode == "ordinary"
            assert "use_forkserver=False" in (started.fallback_reason or "")
            assert psutil.Process(started.pid).ppid() == os.getpid()
            assert await execute(started, "print(6 * 7)") == "42\n"
        finally:
            await started.stop()

    asyncio.run(main())


def test_kernel_spec_not_running_this_interpreter_falls_back(tmp_path: Path, shell_wrapped_kernel: str) -> None:
    async def main() -> None:
        started = await start_kernel(KernelRequest(shell_wrapped_kernel, str(tmp_path), {}))
        try:
            assert started.mode == "ordinary"
            assert "not 'python -m ipykernel_launcher'" in (started.fallback_reason or "")
            assert await execute(started, "print('ok')") == "ok\n"
        finally:
            await started.stop()

    asyncio.run(main())


def test_forkserver_failure_falls_back_to_an_ordinary_kernel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def refuse(*args: Any, **kwargs: Any) -> None:
        raise forkserver.ForkServerError("forced failure")

    monkeypatch.setattr(forkserver.ForkServer, "fork_kernel", refuse)

    async def main() -> None:
        started = await start_kernel(request(tmp_path))
        try:
            assert (started.mode, started.fallback_reason) == ("ordinary", "forced failure")
            assert await execute(started, "print('ok')") == "ok\n"
        finally:
            await started.stop()

    asyncio.run(main())


def test_kernel_that_dies_while_starting_raises_and_leaves_nothing(tmp_path: Path) -> None:
    spec_dir = tmp_path / "jupyter" / "kernels" / "broken"
    spec_dir.mkdir(parents=True)
    argv = ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}", "--IPKernelApp.kernel_class=nope.Kernel"]
    (spec_dir / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "broken", "language": "python"}))
    before = descendants()
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
        with pytest.raises(KernelStartError, match="kernel 'broken' died while starting") as raised:
            asyncio.run(start_kernel(KernelRequest("broken", str(tmp_path), {})))
    assert raised.value.kernel_name == "broken"
    shared_server = kernels._shared_server.pid if kernels._shared_server else None
    assert wait_until(lambda: descendants() - {shared_server} <= before)


# -- running and stopping -------------------------------------------------------


async def shell_reply(started: StartedKernel, msg_id: str) -> dict:
    while True:
        reply = await started.kc.get_shell_msg(timeout=10)
        if reply["parent_header"].get("msg_id") == msg_id:
            return reply


@pytest.mark.parametrize("use_forkserver", MODES)
def test_interrupt_stops_a_sleeping_cell(tmp_path: Path, use_forkserver: bool) -> None:
    async def main() -> None:
        started = await start_kernel(request(tmp_path), use_forkserver=use_forkserver)
        try:
            msg_id = started.kc.execute("import time; time.sleep(100)")
            while True:  # wait until the cell runs
                msg = await started.kc.get_iopub_msg(timeout=10)
                if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "execute_input":
                    break
            await asyncio.sleep(0.2)
            await started.interrupt()
            reply = await shell_reply(started, msg_id)  # the cell sleeps 100 s: only the interrupt ends it now
            assert reply["content"]["status"] == "error"
            assert reply["content"]["ename"] == "KeyboardInterrupt"
            # and the kernel goes on: asked on the shell channel, whose reply always comes (under heavy load the
            # stream of a print() in the next cell was seen missing before its idle status, a flake of this test)
            reply = await shell_reply(started, started.kc.execute("", user_expressions={"alive": "'still alive'"}))
            assert reply["content"]["status"] == "ok"
            assert reply["content"]["user_expressions"]["alive"]["data"]["text/plain"] == "'still alive'"
        finally:
            await started.stop()

    asyncio.run(main())


@pytest.mark.parametrize("use_forkserver", MODES)
def test_stop_kills_the_kernel_and_its_subprocesses_quickly(tmp_path: Path, use_forkserver: bool) -> None:
    async def main() -> tuple[int, int, str]:
        started = await start_kernel(request(tmp_path), use_forkserver=use_forkserver)
        try:
            sleeper = int(await execute(started, "import subprocess; print(subprocess.Popen(['sleep', '100']).pid)"))
            assert not gone(sleeper)
            connection_file = started.km.connection_file
        finally:
            stopping = time.monotonic()
            await started.stop()
            assert time.monotonic() - stopping < 1.0
        await started.stop()  # idempotent
        return started.pid, sleeper, connection_file

    kernel, sleeper, connection_file = asyncio.run(main())
    assert wait_until(lambda: gone(kernel) and gone(sleeper))
    assert not os.path.exists(connection_file)


@pytest.mark.parametrize("use_forkserver", MODES)
def test_nbclient_executes_cells_on_a_started_kernel(tmp_path: Path, use_forkserver: bool) -> None:
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 41"), nbformat.v4.new_code_cell("print(x + 1)")])

    async def main() -> None:
        started = await start_kernel(request(tmp_path), use_forkserver=use_forkserver)
        try:
            client = NotebookClient(nb, km=started.km)
            client.kc = started.kc
            for index, cell in enumerate(nb.cells):
                await client.async_execute_cell(cell, index, execution_count=index + 1)
        finally:
            await started.stop()

    asyncio.run(main())
    assert nb.cells[1].outputs[0]["text"] == "42\n"


# -- the pool -----------------------------------------------------------------


def test_pool_hands_out_the_prestarted_kernel_once(tmp_path: Path) -> None:
    async def main() -> None:
        pool = KernelPool(max_prestarted=2)
        try:
            pool.prestart("a", request(tmp_path))
            await asyncio.sleep(0)
            task = pool._prestarted["a"][1]  # (request, start task)
            prestarted = await task  # the kernel started ahead of time
            first = await pool.acquire("a", request(tmp_path))
            assert first is prestarted
            second = await pool.acquire("a", request(tmp_path))
            assert second.pid != first.pid  # a fresh kernel every time
            await first.stop()
            await second.stop()
        finally:
            await pool.close()

    asyncio.run(main())


def test_pool_discards_a_prestarted_kernel_for_another_request(tmp_path: Path) -> None:
    (tmp_path / "other").mkdir()

    async def main() -> None:
        pool = KernelPool(max_prestarted=1)
        try:
            pool.prestart("a", request(tmp_path))
            started = await pool.acquire("a", request(tmp_path / "other", ANSWER="42"))
            try:
                out = await execute(started, "import os; print(os.getcwd(), os.environ['ANSWER'])")
                assert out == f"{tmp_path / 'other'} 42\n"
            finally:
                await started.stop()
        finally:
            await pool.close()

    before = descendants()
    asyncio.run(main())
    assert wait_until(lambda: descendants() <= before)


def test_pool_is_bounded_and_close_leaves_no_kernel(tmp_path: Path) -> None:
    before = descendants()

    async def main() -> None:
        pool = KernelPool(max_prestarted=1)
        pool.prestart("a", request(tmp_path))
        pool.prestart("b", request(tmp_path))  # over the bound: ignored
        acquired = await pool.acquire("a", request(tmp_path))
        await asyncio.sleep(0.3)
        fork_server = pool._fork_server
        assert fork_server is not None and fork_server.pid is not None
        kernels = descendants() - before - {fork_server.pid}
        assert kernels == {acquired.pid}
        pool.prestart("c", request(tmp_path))  # room again: "a" was handed out
        await asyncio.sleep(0)
        await pool.close()  # stops "c" (maybe mid-start) and the fork server with its kernels
        assert wait_until(lambda: gone(acquired.pid))
        assert not await acquired.km.is_alive()
        await acquired.stop()

    asyncio.run(main())
    assert wait_until(lambda: descendants() <= before)


def test_a_new_attempt_of_a_step_waits_for_its_last_kernel_to_stop_and_close_waits_for_all(tmp_path: Path) -> None:
    """A finished attempt's kernel is stopped in the background (the next step does not wait), but the
    step's next attempt starts its kernel only after that: the reaping finds processes by the step's
    identity, which the new attempt's kernel shares. And the pool does not close before every stop ended."""
    async def main() -> None:
        pool = KernelPool(max_prestarted=1)
        order: list[str] = []
        release = {"a": asyncio.Event(), "b": asyncio.Event()}
        start = pool._start

        async def recorded_start(req: KernelRequest) -> StartedKernel:
            order.append(f"start in {Path(req.cwd).name}")
            return await start(req)

        pool._start = recorded_start  # type: ignore[method-assign]

        async def stopping(key: str) -> None:
            await release[key].wait()
            order.append(f"{key} stopped")

        (tmp_path / "a").mkdir()
        (tmp_path / "c").mkdir()
        try:
            pool.stop_later("a", stopping("a"))
            pool.stop_later("b", stopping("b"))
            acquiring = asyncio.create_task(pool.acquire("a", request(tmp_path / "a")))
            other = await pool.acquire("c", request(tmp_path / "c"))  # another step is not held up
            assert order == ["start in c"] and not acquiring.done()
            release["a"].set()
            again = await acquiring
            assert order == ["start in c", "a stopped", "start in a"]
            for kernel in (other, again):
                await kernel.stop()
        finally:
            closing = asyncio.create_task(pool.close())
            await asyncio.sleep(0)
            assert not closing.done()  # "b" is still stopping
            for event in release.values():
                event.set()
            await closing
        assert order[-1] == "b stopped"

    before = descendants()
    asyncio.run(main())
    assert wait_until(lambda: descendants() <= before)


def test_pool_without_forkserver_starts_ordinary_kernels(tmp_path: Path) -> None:
    async def main() -> None:
        pool = KernelPool(max_prestarted=1, use_forkserver=False)
        try:
            pool.prestart("a", request(tmp_path))
            started = await pool.acquire("a", request(tmp_path))
            assert started.mode == "ordinary"
            await started.stop()
        finally:
            await pool.close()
        assert pool._fork_server is None

    asyncio.run(main())


# -- warm forks -------------------------------------------------------------------


async def warm_pids(pool: KernelPool) -> list[int]:
    """The pids of the pool's warm forks, once each is ready."""
    forks = [await task for task in list(pool._warm)]
    return [int(fork.km.provisioner.pid) for fork in forks if fork is not None]


def test_a_warm_fork_is_handed_out_and_the_next_one_starts_at_once(tmp_path: Path) -> None:
    (tmp_path / "step").mkdir()

    async def main() -> None:
        pool = KernelPool(max_prestarted=1)
        try:
            pool.keep_warm(1)
            (warm,) = await warm_pids(pool)
            first = await pool.acquire("a", request(tmp_path / "step", NBFLOW_STEP="a"))
            assert first.pid == warm and first.mode == "forkserver"
            assert len(pool._warm) == 1  # taken: the next one is starting already
            out = await execute(first, "import os; print(os.getcwd(), os.environ['NBFLOW_STEP'])")
            assert out == f"{tmp_path / 'step'} a\n"
            (second_warm,) = await warm_pids(pool)
            second = await pool.acquire("b", request(tmp_path, NBFLOW_STEP="b"))
            assert second.pid == second_warm != first.pid
            assert await execute(second, "print(leaked if 'leaked' in dir() else 'fresh')") == "fresh\n"
            await first.stop()
            await second.stop()
        finally:
            await pool.close()

    before = descendants()
    asyncio.run(main())
    assert wait_until(lambda: descendants() <= before)


def test_a_hint_readies_a_warm_fork_for_its_step_before_the_step_asks(tmp_path: Path) -> None:
    async def main() -> None:
        pool = KernelPool(max_prestarted=1)
        try:
            pool.keep_warm(1)
            (warm,) = await warm_pids(pool)
            pool.prestart("a", request(tmp_path, NBFLOW_STEP="a"))
            ready = await pool._prestarted["a"][1]  # the warm fork, given step a's directory and environment
            assert ready.pid == warm and len(pool._warm) == 1
            started = await pool.acquire("a", request(tmp_path, NBFLOW_STEP="a"))
            assert started is ready
            assert await execute(started, "import os; print(os.environ['NBFLOW_STEP'])") == "a\n"
            await started.stop()
        finally:
            await pool.close()

    asyncio.run(main())


def test_a_kernel_from_a_warm_fork_matches_an_ordinary_kernel(tmp_path: Path) -> None:
    """The directory, environment, sys.path (pythonpath: first), start-up state and /proc of the step's kernel."""
    (tmp_path / "helper_next_to_notebook.py").write_text("ANSWER = 42\n")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "project_module.py").write_text("WHERE = 'src'\n")
    env = {"NBFLOW_TEST_VALUE": "warm?", "NBFLOW_PYTHONPATH": str(tmp_path / "src"), "MPLBACKEND": "agg"}
    probe = (
        "{'cwd': __import__('os').getcwd(), 'env': __import__('os').environ.get('NBFLOW_TEST_VALUE'),"
        " 'path': __import__('sys').path, 'argv0': __import__('sys').argv[0],"
        " 'answer': __import__('helper_next_to_notebook').ANSWER, 'where': __import__('project_module').WHERE,"
        " 'dh': [str(d) for d in _dh], 'mpl': __import__('os').environ.get('MPLBACKEND'),"
        " 'term': __import__('os').environ.get('TERM'), 'pager': __import__('os').environ.get('PAGER'),"
        " 'count': get_ipython().execution_count,"
        " 'nbflow_loaded': sorted(m for m in __import__('sys').modules if 'nbflow' in m)}"
    )

    async def from_warm_fork() -> tuple[Any, dict[str, str]]:
        pool = KernelPool(max_prestarted=1)
        try:
            pool.keep_warm(1)
            (warm,) = await warm_pids(pool)
            started = await pool.acquire("a", KernelRequest("python3", str(tmp_path), env))
            assert started.pid == warm
            try:
                return await execute_json(started, probe), psutil.Process(started.pid).environ()
            finally:
                await started.stop()
        finally:
            await pool.close()

    async def ordinary() -> Any:
        started = await start_kernel(KernelRequest("python3", str(tmp_path), env), use_forkserver=False)
        try:
            return await execute_json(started, probe)
        finally:
            await started.stop()

    warm, environ = asyncio.run(from_warm_fork())
    assert warm["cwd"] == str(tmp_path) and warm["dh"] == [str(tmp_path)]
    assert warm["env"] == "warm?" and warm["answer"] == 42 and warm["where"] == "src"
    assert warm["mpl"] == "agg"  # the step's own value, not the one ipykernel sets when there is none
    assert environ["NBFLOW_TEST_VALUE"] == "warm?"  # what ps and nbflow's reaper read
    assert warm == asyncio.run(ordinary())


def test_a_request_the_warm_fork_cannot_serve_gets_a_kernel_of_its_own(tmp_path: Path) -> None:
    async def main() -> None:
        pool = KernelPool(max_prestarted=1)
        try:
            pool.keep_warm(1)
            (warm,) = await warm_pids(pool)
            # IPython reads its profile folder while the kernel initialises: the warm fork has another one
            started = await pool.acquire("a", request(tmp_path, IPYTHONDIR=str(tmp_path / "ipython")))
            try:
                assert started.pid != warm
                assert await execute(started, "import os; print(os.environ['IPYTHONDIR'])") == \
                    f"{tmp_path / 'ipython'}\n"
            finally:
                await started.stop()
            assert wait_until(lambda: gone(warm))  # the fork that did not fit is gone, not kept
        finally:
            await pool.close()

    asyncio.run(main())


def test_warm_forks_nobody_took_are_killed_when_the_pool_closes(tmp_path: Path) -> None:
    before = descendants()

    async def main() -> None:
        pool = KernelPool(max_prestarted=1)
        pool.keep_warm(3)
        pids = await warm_pids(pool)
        assert len(pids) == 3 and all(not gone(pid) for pid in pids)
        await pool.close()
        assert all(wait_until(lambda pid=pid: gone(pid)) for pid in pids)

    asyncio.run(main())
    assert wait_until(lambda: descendants() <= before)


def test_no_warm_forks_without_the_fork_server(tmp_path: Path) -> None:
    async def main() -> None:
        pool = KernelPool(max_prestarted=1, use_forkserver=False)
        try:
            pool.keep_warm(2)
            assert pool._warm == [] and pool._fork_server is None
            started = await pool.acquire("a", request(tmp_path))
            assert started.mode == "ordinary"
            await started.stop()
        finally:
            await pool.close()

    asyncio.run(main())


# -- files in the temp folder ------------------------------------------------------------


LEAVE_A_FOLDER_AND_DIE = (
    "import os, signal, sys\n"
    "sys.path.insert(0, sys.argv[1])\n"
    "from nbflow.reaper import private_folder\n"
    "folder, _ = private_folder(sys.argv[2])\n"
    "open(os.path.join(folder, 'kernel-1.json'), 'w').write('{\"key\": \"a-hmac-key\"}')\n"
    "print(folder, flush=True)\n"
    "os.kill(os.getpid(), signal.SIGKILL)\n"
)


@pytest.mark.parametrize("use_forkserver", MODES)
def test_a_pool_removes_what_a_killed_nbflow_left_in_the_temp_folder_and_its_own_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, use_forkserver: bool
) -> None:
    temp = Path(tempfile.mkdtemp(prefix="nbflow-test-"))  # short: socket paths inside stay < 108 bytes
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    left = []
    for prefix in (kernels.KERNELS_FOLDER_PREFIX, forkserver.FORKSERVER_FOLDER_PREFIX):
        died = subprocess.run([sys.executable, "-c", LEAVE_A_FOLDER_AND_DIE, str(REPO), prefix],
                              capture_output=True, text=True, check=False, env={**os.environ, "TMPDIR": str(temp)})
        assert died.returncode == -signal.SIGKILL
        left.append(Path(died.stdout.strip()))
    assert all(folder.is_dir() for folder in left)

    async def main() -> tuple[str, str]:
        pool = KernelPool(max_prestarted=1, use_forkserver=use_forkserver)
        try:
            started = await pool.acquire("a", request(tmp_path))
            try:
                assert not left[0].exists()  # removed when this pool made its own folder
                connection_file = started.km.connection_file
                assert Path(connection_file).parent.parent == temp  # in the pool's folder, not loose in temp
                assert await execute(started, "print(6 * 7)") == "42\n"
            finally:
                await started.stop()
        finally:
            await pool.close()
        return connection_file, started.mode

    try:
        connection_file, mode = asyncio.run(main())
        assert mode == ("forkserver" if use_forkserver else "ordinary")
        assert not os.path.exists(Path(connection_file).parent)  # the pool's own folder, removed by close()
        # a fork server's folder of the killed nbflow is removed when this pool's fork server makes its own
        assert sorted(temp.iterdir()) == ([] if use_forkserver else [left[1]])
    finally:
        shutil.rmtree(temp, ignore_errors=True)
