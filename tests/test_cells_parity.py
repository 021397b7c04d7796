"""nbflow's CellRunner against nbclient, on nbclient's own test notebooks (tests/notebooks/nbclient_parity/).

Each notebook is executed twice, by nbclient on a kernel it starts and by
CellRunner on a kernel nbflow starts, and the two results must be the same:
cell by cell the outputs, execution counts and which timings were recorded;
what the Output widgets captured; how the run ended (finished, or the exception
that stopped it). Only what differs between any two runs is normalised: widget
model ids, memory addresses, timing values, where a stream was split into
messages, the cell a kernel died in. A notebook that still differs is a
strict xfail whose reason is also in the README ("Executed notebooks and nbclient").
"""

from __future__ import annotations

import copy
import json
import re
import time
from queue import Empty

import nbformat
import pytest
from jupyter_client.asynchronous import AsyncKernelClient
from jupyter_client.channels import AsyncZMQSocketChannel
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, DeadKernelError
from traitlets import Type, default

from conftest import FIXTURES
from kernel_helpers import shut_down_shared_fork_server  # noqa: F401  (autouse fixture)
from test_cells import run_notebook_cells

# integration: runs with the full suite (`pytest -m "slow or not slow"`, what CI runs)
pytestmark = pytest.mark.slow

PARITY = FIXTURES / "nbclient_parity"
DIFFERENT: dict[str, str] = {}  # none: nbflow's kernels keep IPython's history in memory too, as nbclient's
CELL_TIMEOUT = 60  # none of these cells runs for more than a second: a hang fails instead of blocking
_ADDRESS = re.compile(r"0x[0-9a-f]{6,16}")


def notebooks() -> list:
    return [pytest.param(path.name, id=path.stem,
                         marks=[pytest.mark.xfail(reason=DIFFERENT[path.name], strict=True)]
                         if path.name in DIFFERENT else [])
            for path in sorted(PARITY.glob("*.ipynb"))]


class _ShellPolledInSlices(AsyncZMQSocketChannel):
    """nbclient's Output widget sends on the shell socket while another task waits on it for the execute
    reply, and that wait can miss the reply until its timeout (forever without one): nbclient issue #312,
    https://github.com/jupyter/nbclient/issues/312, seen here on Output.ipynb. Waiting in 0.1 s slices
    changes only how soon nbclient sees the reply."""

    async def get_msg(self, timeout: float | None = None) -> dict:  # type: ignore[override]  # as its base
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = 0.1 if deadline is None else max(0.0, min(0.1, deadline - time.monotonic()))
            try:
                return await super().get_msg(timeout=left)
            except Empty:
                if deadline is not None and time.monotonic() >= deadline:
                    raise


class _Client(AsyncKernelClient):
    shell_channel_class = Type(_ShellPolledInSlices)


class _KernelManager(AsyncKernelManager):
    @default("client_factory")
    def _client_factory_default(self) -> type:
        return _Client


def run_with_nbclient(nb: nbformat.NotebookNode) -> tuple[str, list[list]]:
    """How the run ended, and what each Output widget captured (in the order they were opened)."""
    client = NotebookClient(nb, kernel_name="python3", resources={"metadata": {"path": str(PARITY)}},
                            kernel_manager_class=_KernelManager, timeout=CELL_TIMEOUT, shutdown_kernel="immediate")
    try:
        client.execute()
        ended = "finished"
    except CellExecutionError as e:
        ended = f"CellExecutionError {e.ename}"
    except DeadKernelError:
        ended = "DeadKernelError"
    captured = [state["outputs"] for state in client.widget_state.values() if state.get("_model_name") == "OutputModel"]
    return ended, captured


def run_with_nbflow(cells: list[dict]) -> tuple[str, list[list]]:
    error, runner = run_notebook_cells(PARITY, cells, timeout=CELL_TIMEOUT)
    ended = "finished" if error is None else f"{type(error).__name__} {getattr(error, 'ename', '')}".strip()
    return ended, [widget.outputs for widget in runner._output_widgets.values()]


def normalised_outputs(outputs: list) -> list[dict]:
    plain: list[dict] = []
    for output in json.loads(json.dumps(outputs)):
        view = output.get("data", {}).get("application/vnd.jupyter.widget-view+json")
        if view:
            view["model_id"] = "<MODEL_ID>"
        for key in ("text", "evalue"):
            if key in output:
                output[key] = _ADDRESS.sub("<HEXADDR>", output[key])
        if "text/plain" in output.get("data", {}):
            output["data"]["text/plain"] = _ADDRESS.sub("<HEXADDR>", output["data"]["text/plain"])
        if "traceback" in output:
            output["traceback"] = [_ADDRESS.sub("<HEXADDR>", line) for line in output["traceback"]]
        last = plain[-1] if plain else None
        if last and last["output_type"] == output["output_type"] == "stream" and last["name"] == output["name"]:
            # where the kernel splits a stream into messages depends on its flush timer (test_cells has the
            # exact split); a stream of another name or any other output in between still counts
            last["text"] += output["text"]
        else:
            plain.append(output)
    return plain


def normalised(cells: list) -> list[dict]:
    plain = json.loads(json.dumps(cells))
    for cell in plain:
        execution = cell.get("metadata", {}).get("execution")
        if execution is not None and "shell.execute_reply" not in execution:
            # the kernel died running it (Autokill): whether its busy status and execute_input got out
            # before the signal is a race in the kernel, whoever reads them
            cell["metadata"]["execution"] = cell["execution_count"] = "<kernel died>"
        elif execution is not None:
            cell["metadata"]["execution"] = sorted(execution)  # which timings, not when
        if "outputs" in cell:
            cell["outputs"] = normalised_outputs(cell["outputs"])
    return plain


@pytest.mark.parametrize("name", notebooks())
def test_cell_runner_records_what_nbclient_records(name: str) -> None:
    source = nbformat.read(PARITY / name, as_version=4)
    by_nbclient = copy.deepcopy(source)
    by_nbflow = json.loads(json.dumps(source))
    ended_nbclient, captured_nbclient = run_with_nbclient(by_nbclient)
    ended_nbflow, captured_nbflow = run_with_nbflow(by_nbflow["cells"])
    assert normalised(by_nbflow["cells"]) == normalised(by_nbclient.cells)
    assert [normalised_outputs(o) for o in captured_nbflow] == [normalised_outputs(o) for o in captured_nbclient]
    assert ended_nbflow == ended_nbclient
