"""Run one code cell on a started kernel and record its outputs in the cell, as nbclient does.

Owns: the execute request, collecting the cell's outputs from iopub as
nbformat-4 dicts (streams, display data, results, errors, clear_output,
display updates), the cell timeout, noticing a dead kernel, and the errors
that say how a cell ended (named and shaped as nbclient's, which nbflow used
before). Talks to jupyter_client directly: importing nbclient imports
nbformat, which imports jsonschema (~0.1 s; ~2 s where JupyterLab's
jupyter-events brings jsonschema's format checkers), and nbclient validates
every output with it. Widget comm messages are not recorded.
"""

from __future__ import annotations

import asyncio
import datetime
from typing import Any

# How often a cell that produces nothing checks that its kernel is alive.
_ALIVE_CHECK_INTERVAL = 1.0
# After the execute reply, how long the last outputs (and the idle status) may lag on iopub.
_IOPUB_GRACE = 4.0
_OUTPUT_TYPES = ("stream", "display_data", "execute_result", "error")


class CellExecutionError(Exception):
    """The cell raised. `traceback` is nbclient's message: the cell, its streams, the kernel's traceback."""

    def __init__(self, traceback: str, ename: str, evalue: str) -> None:
        super().__init__(traceback)
        self.traceback = traceback
        self.ename = ename
        self.evalue = evalue

    def __reduce__(self) -> tuple[type, tuple[str, str, str]]:
        return type(self), (self.traceback, self.ename, self.evalue)

    @classmethod
    def from_cell(cls, cell: dict, reply: dict[str, Any]) -> CellExecutionError:
        streams = [f"----- {o['name']} -----\n{o['text'].rstrip()}" for o in cell["outputs"]
                   if o["output_type"] == "stream"]
        stream_output = "\n".join(["", *streams, "------------------"]) if streams else ""
        traceback = "\n".join(reply.get("traceback") or [])
        message = (f"An error occurred while executing the following cell:\n------------------\n{cell['source']}\n"
                   f"------------------\n{stream_output}\n\n{traceback}\n")
        return cls(message, reply.get("ename", "<Error>"), reply.get("evalue", ""))


class CellTimeoutError(TimeoutError):
    """The cell did not finish within its timeout."""


class DeadKernelError(RuntimeError):
    """The kernel died while the cell ran."""


class CellRunner:
    """Runs the cells of one notebook, one at a time, on one kernel (`km` / `kc` of a started kernel)."""

    def __init__(self, km: Any, kc: Any, *, timeout: float | None = None) -> None:
        self.km = km
        self.kc = kc
        self.timeout = timeout if timeout and timeout > 0 else None
        self.cells_executed = 0
        self._displays: dict[str, list[dict]] = {}  # display_id -> the outputs showing it, in any cell

    async def execute_cell(self, cell: dict, execution_count: int | None = None) -> None:
        """Execute `cell` (a code cell dict); its outputs, execution count and timing metadata are set in place.

        Raises CellExecutionError, CellTimeoutError or DeadKernelError.
        """
        import zmq  # noqa: PLC0415
        from zmq.asyncio import Poller  # noqa: PLC0415

        timing: dict[str, str] = {}
        cell.setdefault("metadata", {})["execution"] = timing
        cell["outputs"] = []
        # no stdin: input() fails at once instead of waiting forever for an answer nobody will type
        msg_id = self.kc.execute(cell["source"], store_history=True, stop_on_error=True, allow_stdin=False)
        self.cells_executed += 1
        loop = asyncio.get_running_loop()
        deadline = None if self.timeout is None else loop.time() + self.timeout
        poller = Poller()
        poller.register(self.kc.shell_channel.socket, zmq.POLLIN)
        poller.register(self.kc.iopub_channel.socket, zmq.POLLIN)
        reply: dict[str, Any] | None = None
        idle = clear_pending = False
        grace_until = 0.0
        while reply is None or not idle:
            now = loop.time()
            wake = now + _ALIVE_CHECK_INTERVAL
            if reply is None and deadline is not None:
                if now >= deadline:
                    raise CellTimeoutError(f"A cell timed out while it was being executed, after {self.timeout:g} "
                                           f"seconds.\nHere is a preview of the cell contents:\n{cell['source'][:500]}")
                wake = min(wake, deadline)
            if reply is not None:
                if now >= grace_until:
                    break  # as nbclient: a late idle status is not worth failing the cell for
                wake = min(wake, grace_until)
            if not await poller.poll(max(1, int((wake - now) * 1000) + 1)):
                if reply is None and not await self.km.is_alive():
                    raise DeadKernelError("Kernel died")
                continue
            while reply is None:
                message = await _next(self.kc.shell_channel)
                if message is None:
                    break
                if message["parent_header"].get("msg_id") == msg_id:
                    reply = message
                    timing["shell.execute_reply"] = _timestamp(message)
                    grace_until = loop.time() + _IOPUB_GRACE
            while not idle:
                message = await _next(self.kc.iopub_channel)
                if message is None:
                    break
                if message["parent_header"].get("msg_id") != msg_id:
                    continue
                idle, clear_pending = self._on_iopub(cell, message, timing, clear_pending)
        if execution_count:
            cell["execution_count"] = execution_count
        assert reply is not None
        if reply["content"].get("status") == "error":
            raise CellExecutionError.from_cell(cell, reply["content"])

    def _on_iopub(self, cell: dict, message: dict, timing: dict[str, str], clear_pending: bool) -> tuple[bool, bool]:
        """Record one iopub message of the running cell; returns (idle seen, a clear_output(wait=True) pending)."""
        kind = message["header"]["msg_type"]
        content = message["content"]
        if "execution_count" in content:
            cell["execution_count"] = content["execution_count"]
        if kind == "status":
            state = content.get("execution_state")
            if state in ("busy", "idle"):
                timing[f"iopub.status.{state}"] = _timestamp(message)
            return state == "idle", clear_pending
        if kind == "execute_input":
            timing["iopub.execute_input"] = _timestamp(message)
            return False, clear_pending
        if kind == "clear_output":
            if content.get("wait"):
                return False, True
            cell["outputs"].clear()
            return False, False
        display_id = (content.get("transient") or {}).get("display_id")
        if display_id and kind in ("display_data", "execute_result", "update_display_data"):
            for shown in self._displays.get(display_id, []):
                shown["data"], shown["metadata"] = content["data"], content["metadata"]
        if kind not in _OUTPUT_TYPES:
            return False, clear_pending  # update_display_data, comm messages, ...
        if clear_pending:
            cell["outputs"].clear()
        output = _output(kind, content)
        if display_id:
            self._displays.setdefault(display_id, []).append(output)
        cell["outputs"].append(output)
        return False, False


async def _next(channel: Any) -> dict | None:
    """The next message waiting on a channel, or None."""
    from queue import Empty  # noqa: PLC0415

    try:
        return await channel.get_msg(timeout=0)
    except Empty:
        return None


def _output(kind: str, content: dict) -> dict:
    if kind == "stream":
        return {"output_type": "stream", "name": content["name"], "text": content["text"]}
    if kind == "error":
        return {"output_type": "error", "ename": content["ename"], "evalue": content["evalue"],
                "traceback": content["traceback"]}
    output = {"output_type": kind, "data": content["data"], "metadata": content["metadata"]}
    if kind == "execute_result":
        output["execution_count"] = content["execution_count"]
    return output


def _timestamp(message: dict) -> str:
    date = message["header"].get("date")
    if isinstance(date, datetime.datetime):
        return date.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
