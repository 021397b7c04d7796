"""Tests for nbflow.executors.cells: one cell on a started kernel, recorded as nbclient records it."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path


from nbflow.executors.cells import CellExecutionError, CellRunner, CellTimeoutError, DeadKernelError
from nbflow.kernels import KernelRequest, start_kernel


from kernel_helpers import shut_down_shared_fork_server  # noqa: E402,F401  (autouse fixture)


def cell(source: str) -> dict:
    return {"cell_type": "code", "id": "x", "metadata": {}, "execution_count": None, "outputs": [], "source": source}


def run_cells(tmp_path: Path, *sources: str, timeout: float | None = None) -> tuple[list[dict], BaseException | None]:
    """Run the cells in order on one fresh kernel until one raises; the cells and that exception."""
    cells = [cell(s) for s in sources]

    async def main() -> BaseException | None:
        started = await start_kernel(KernelRequest("python3", str(tmp_path)))
        try:
            runner = CellRunner(started.km, started.kc, timeout=timeout)
            for c in cells:
                await runner.execute_cell(c, execution_count=runner.cells_executed + 1)
        except (CellExecutionError, CellTimeoutError, DeadKernelError) as e:
            return e
        finally:
            await started.stop()
        return None

    return cells, asyncio.run(main())


def test_outputs_are_recorded_as_nbformat_outputs(tmp_path: Path) -> None:
    cells, error = run_cells(
        tmp_path,
        "print('out'); import sys; print('err', file=sys.stderr)",
        "from IPython.display import display, clear_output\nh = display('first', display_id=True)\n40 + 2",
        "h.update('updated')",
        "print('gone'); clear_output(wait=True); print('kept')",
    )
    assert error is None
    streams = [(o["name"], o["text"]) for o in cells[0]["outputs"]]
    assert ("stdout", "out\n") in streams and ("stderr", "err\n") in streams
    display, result = cells[1]["outputs"]
    assert display["output_type"] == "display_data" and display["data"]["text/plain"] == "'updated'"
    assert result == {"output_type": "execute_result", "execution_count": 2, "data": {"text/plain": "42"},
                      "metadata": {}}
    assert cells[2]["outputs"] == []  # an update shows in the cell that displayed it
    assert [o["text"] for o in cells[3]["outputs"]] == ["kept\n"]
    assert [c["execution_count"] for c in cells] == [1, 2, 3, 4]
    assert {"shell.execute_reply", "iopub.status.idle"} <= set(cells[0]["metadata"]["execution"])
    json.dumps(cells)  # plain JSON, ready to be written


def test_an_exception_carries_the_traceback_and_stops_the_run(tmp_path: Path) -> None:
    cells, error = run_cells(tmp_path, "print('before')\nraise ValueError('bad value')", "print('never')")
    assert isinstance(error, CellExecutionError)
    assert (error.ename, error.evalue) == ("ValueError", "bad value")
    assert "raise ValueError('bad value')" in error.traceback and "----- stdout -----\nbefore" in error.traceback
    assert cells[0]["outputs"][-1]["output_type"] == "error"
    assert cells[1]["outputs"] == []


def test_input_fails_at_once(tmp_path: Path) -> None:
    _, error = run_cells(tmp_path, "input('your name? ')", timeout=60)
    assert isinstance(error, CellExecutionError) and error.ename == "StdinNotImplementedError"


def test_a_cell_past_its_timeout_raises(tmp_path: Path) -> None:
    _, error = run_cells(tmp_path, "import time; time.sleep(30)", timeout=0.5)
    assert isinstance(error, CellTimeoutError)


def test_a_dead_kernel_is_noticed(tmp_path: Path) -> None:
    _, error = run_cells(tmp_path, "import os; os._exit(3)")
    assert isinstance(error, DeadKernelError)


def test_running_a_step_imports_neither_nbformat_nor_jsonschema(tmp_path: Path, notebook_factory) -> None:
    notebook_factory(tmp_path / "pipe" / "a.ipynb", 'outputs = {"o": "o.txt"}', 'open(outputs["o"], "w").write("x")')
    code = ("import sys, nbflow\nresult = nbflow.run(sys.argv[1], display=False)\nassert result.ok, result\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'nbformat', 'nbclient', 'jsonschema'}))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "pipe")], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
