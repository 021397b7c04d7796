"""Tests for nbflow.executors.cells: one cell on a started kernel, recorded as nbclient records it."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path


from nbflow.executors import cells as cells_module
from nbflow.executors.cells import CellExecutionError, CellRunner, CellTimeoutError, DeadKernelError
from nbflow.kernels import KernelRequest, start_kernel


from kernel_helpers import shut_down_shared_fork_server  # noqa: E402,F401  (autouse fixture)


def cell(source: str, *tags: str) -> dict:
    metadata = {"tags": list(tags)} if tags else {}
    return {"cell_type": "code", "id": "x", "metadata": metadata, "execution_count": None, "outputs": [],
            "source": source}


def run_cells(tmp_path: Path, *sources: str | dict,
              timeout: float | None = None) -> tuple[list[dict], BaseException | None]:
    """Run the cells (sources or cell dicts) in order on one fresh kernel until one raises; the cells and that error."""
    cells = [cell(s) if isinstance(s, str) else s for s in sources]
    error, _ = run_notebook_cells(tmp_path, cells, timeout=timeout)
    return cells, error


def run_notebook_cells(cwd: Path, cells: list[dict],
                       timeout: float | None = None) -> tuple[BaseException | None, CellRunner]:
    """Run the code cells in order on one fresh kernel in `cwd`, as step.py does, until one raises.

    Returns that exception (None if none did) and the runner, which has seen the whole run.
    """

    async def main() -> tuple[BaseException | None, CellRunner]:
        started = await start_kernel(KernelRequest("python3", str(cwd)))
        runner = CellRunner(started.km, started.kc, timeout=timeout)
        try:
            for c in cells:
                if c["cell_type"] == "code":
                    await runner.execute_cell(c, execution_count=runner.cells_executed + 1)
        except (CellExecutionError, CellTimeoutError, DeadKernelError) as e:
            return e, runner
        finally:
            await started.stop()
        return None, runner

    return asyncio.run(main())


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


def stream(text: str, name: str = "stdout") -> dict:
    return {"output_type": "stream", "name": name, "text": text}


def shown(text_plain: str) -> dict:
    return {"output_type": "display_data", "data": {"text/plain": text_plain}, "metadata": {}}


def test_a_cell_tagged_raises_exception_records_the_error_and_the_run_goes_on(tmp_path: Path) -> None:
    cells, error = run_cells(tmp_path, cell("print('before')\nraise ValueError('expected')", "raises-exception"),
                             "print('after')")
    assert error is None
    before, raised = cells[0]["outputs"]
    assert before == stream("before\n")
    assert (raised["output_type"], raised["ename"], raised["evalue"]) == ("error", "ValueError", "expected")
    assert cells[1]["outputs"] == [stream("after\n")]
    assert [c["execution_count"] for c in cells] == [1, 2]


def test_empty_and_skip_execution_cells_are_left_as_they_are(tmp_path: Path) -> None:
    skipped = cell("print('not run')", "skip-execution")
    skipped["outputs"] = [stream("from before\n")]
    cells, error = run_cells(tmp_path, skipped, "  \n", "print('run')")
    assert error is None
    assert cells[0] == {**cell("print('not run')", "skip-execution"), "outputs": [stream("from before\n")]}
    assert cells[1] == cell("  \n")
    assert cells[2]["outputs"] == [stream("run\n")] and cells[2]["execution_count"] == 1


def test_an_output_widget_captures_what_is_printed_inside_it(tmp_path: Path) -> None:
    cells, error = run_cells(
        tmp_path,
        "import ipywidgets, json, sys\nfrom IPython.display import clear_output\nout = ipywidgets.Output()\nout",
        "print('cell')\nwith out:\n    print('a')\n    sys.stdout.flush()\n    print('b')\n    display('shown')\n"
        "print('cell again')",
        "print(json.dumps(out.outputs))",  # what the kernel was told the widget shows
        "with out:\n    print('old')\n    clear_output(wait=True)\n    print('new')\n    raise ValueError('inside')",
        "print(json.dumps(out.outputs[:1]))",
    )
    assert error is None  # ipywidgets shows an error raised inside the widget there and swallows it
    [view] = cells[0]["outputs"]
    assert view["output_type"] == "execute_result"
    assert set(view["data"]) == {"text/plain", "application/vnd.jupyter.widget-view+json"}
    assert cells[1]["outputs"] == [stream("cell\n"), stream("cell again\n")]
    assert json.loads(cells[2]["outputs"][0]["text"]) == [stream("a\nb\n"), shown("'shown'")]  # streams merged
    assert cells[3]["outputs"] == []
    assert json.loads(cells[4]["outputs"][0]["text"]) == [stream("new\n")]


def test_a_display_is_updated_from_later_cells_unless_it_was_cleared(tmp_path: Path) -> None:
    cells, error = run_cells(
        tmp_path,
        "from IPython.display import clear_output\nh = display('first', display_id='d')\nprint('text')",
        "h.update('second')",
        "display('again', display_id='d');",
        "h.update('third')",
        "g = display('gone', display_id='g')\nclear_output(wait=True)\nprint('instead')",
        "g.update('back?')",
    )
    assert error is None
    assert [c["outputs"] for c in cells] == [
        [shown("'third'"), stream("text\n")], [], [shown("'third'")], [], [stream("instead\n")], []]


def test_clear_output_wait_clears_before_the_next_output_only(tmp_path: Path) -> None:
    cells, error = run_cells(
        tmp_path,
        "from IPython.display import clear_output\nfor i in range(3):\n    clear_output(wait=True)\n    print(i)",
        "print('kept')\nclear_output(wait=True)",
        "h = display('d', display_id='x')\nclear_output(wait=True)\nh.update('an update is not an output')",
        "print('gone')\nclear_output()\nprint('now')",
    )
    assert error is None
    assert [c["outputs"] for c in cells] == [
        [stream("2\n")], [stream("kept\n")], [shown("'an update is not an output'")], [stream("now\n")]]


def test_streams_are_recorded_as_they_arrive_as_nbclient_does(tmp_path: Path) -> None:
    # nbclient's coalesce_streams is off by default: one output per stream message, \r kept
    cells, error = run_cells(
        tmp_path,
        "import sys\nprint('a')\nsys.stdout.flush()\nprint('b')\nsys.stdout.flush()\n"
        "print('c', file=sys.stderr)\nsys.stderr.flush()\nprint('50%\\r100%')",
    )
    assert error is None
    assert cells[0]["outputs"] == [stream("a\n"), stream("b\n"), stream("c\n", "stderr"), stream("50%\r100%\n")]


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


def test_cells_are_numbered_as_jupyter_shows_them_and_what_they_print_reaches_a_live_view_coalesced(
        tmp_path: Path) -> None:
    """next_execution_count is the In [n] a cell gets (a skipped cell gets none); on_output gets the printed
    text a few times, not once per message, bounded, and always the end of it."""
    printed: list[tuple[str, str, bool]] = []
    cells = [cell("a = 1"), cell("b = 2", "skip-execution"),
             cell("import sys, time\nfor i in range(20):\n    print(f'line {i}', flush=True)\n    time.sleep(0.01)\n"
                  "for i in range(300):\n    print('x' * 10_000, flush=True)\n"
                  "print('oops', file=sys.stderr, flush=True)\nprint('last line')")]

    async def main() -> list[int | None]:
        started = await start_kernel(KernelRequest("python3", str(tmp_path)))
        runner = CellRunner(started.km, started.kc, on_output=lambda *args: printed.append(args))
        counts = []
        try:
            for c in cells:
                counts.append(runner.next_execution_count(c))
                await runner.execute_cell(c, execution_count=counts[-1])
        finally:
            await started.stop()
        return counts

    counts = asyncio.run(main())
    assert counts == [1, None, 2] and [c["execution_count"] for c in cells] == [1, None, 2]
    stdout = [(text, cut) for stream, text, cut in printed if stream == "stdout"]
    assert sum(len(o["text"]) for o in cells[2]["outputs"]) > 3_000_000  # the notebook has all of it
    assert len(stdout) < 20  # 0.2 s of lines and 3 MB: coalesced, not one event per message
    assert all(len(text) <= cells_module._LIVE_KEEP for text, _ in stdout)
    assert stdout[0][0].startswith("line 0\n") and not stdout[0][1]
    assert stdout[-1][0].endswith("x\nlast line\n") and any(cut for _, cut in stdout)  # 3 MB left out on the way
    assert [text for stream, text, _ in printed if stream == "stderr"] == ["oops\n"]


def test_live_output_keeps_the_end_of_a_flood_in_bounded_memory() -> None:
    sent: list[tuple[str, str, bool]] = []
    live = cells_module._LiveOutput(lambda *args: sent.append(args))
    for i in range(30_000):  # 30 MB in 1 KB messages
        live.add("stdout", f"{i:08d}" + "y" * 1015 + "\n")
    chunks, (size, _) = live._pending["stdout"]
    assert size < cells_module._LIVE_KEEP + 1_024 and len(chunks) < 10
    assert live.due_at is not None
    live.send(now=1.0)
    [(stream, text, cut)] = sent
    assert stream == "stdout" and cut and len(text) == cells_module._LIVE_KEEP and text.endswith("y\n")
    assert "00029999" in text and live.due_at is None
    live.add("stdout", "next\n")
    assert live.due_at == 1.0 + cells_module.LIVE_INTERVAL_S
