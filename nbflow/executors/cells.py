"""Run one code cell on a started kernel and record its outputs in the cell, as nbclient does.

Owns: the execute request, collecting the cell's outputs from iopub as
nbformat-4 dicts (streams, display data, results, errors, clear_output,
display updates, also from later cells), the cell tags nbclient honours
(`raises-exception`: the error is recorded and the run goes on;
`skip-execution`: not run), ipywidgets' Output widget (while one captures, the
outputs go into it, not into the cell, and the kernel is told its new
`outputs`, as a front end does), the cell timeout, noticing a dead kernel, and the
errors that say how a cell ended (named and shaped as nbclient's, which nbflow
used before). Talks to jupyter_client directly: importing nbclient imports
nbformat, which imports jsonschema (~0.1 s; ~2 s where JupyterLab's
jupyter-events brings jsonschema's format checkers), and nbclient validates
every output with it. tests/test_cells_parity.py runs nbclient's own test
notebooks through both.

What nbclient does and this does not:
- keep widget state: nbclient writes every widget's state into the notebook's
  metadata (`widgets`, application/vnd.jupyter.widget-state+json), so a saved
  notebook can redraw its widgets and what Output widgets captured; here widget
  comm messages only drive the Output widgets, and the cell keeps the widget's
  view output (model id and text/plain) with no state to draw it from;
- its options: no `allow_errors` / `allow_error_names` / `force_raise_errors`
  (only the tag lets a cell raise), no `interrupt_on_timeout`, and
  `coalesce_streams` stays off as it is by default in nbclient (0.10, 0.11):
  streams are recorded one output per message, as they arrive; an Output widget
  merges consecutive streams of one name, as nbclient's does.
"""

from __future__ import annotations

import asyncio
import collections
import datetime
from typing import Any, Callable

# How often a cell that produces nothing checks that its kernel is alive.
_ALIVE_CHECK_INTERVAL = 1.0
# After the execute reply, how long the last outputs (and the idle status) may lag on iopub.
_IOPUB_GRACE = 4.0
_OUTPUT_TYPES = ("stream", "display_data", "execute_result", "error")
_DISPLAY_TYPES = ("display_data", "execute_result", "update_display_data")
_RAISES_TAG = "raises-exception"  # nbclient's: the cell is expected to raise
_SKIP_TAG = "skip-execution"  # nbclient's default `skip_cells_with_tag`
_OUTPUT_MODEL = ("@jupyter-widgets/output", "OutputModel")  # (_model_module, _model_name) of ipywidgets.Output
# A running cell's printed text goes to `on_output` at most this often per stream (s), and only its last
# _LIVE_KEEP characters: a cell that prints 30 MB sends a few events of a few KB.
LIVE_INTERVAL_S = 0.1
_LIVE_KEEP = 8_000


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

    def __init__(self, km: Any, kc: Any, *, timeout: float | None = None,
                 on_output: Callable[[str, str, bool], None] | None = None) -> None:
        """`on_output(stream, text, cut)`: what the running cell prints, for a live view (see _LiveOutput)."""
        self.km = km
        self.kc = kc
        self.timeout = timeout if timeout and timeout > 0 else None
        self.live = _LiveOutput(on_output) if on_output is not None else None
        self.cells_executed = 0
        self._displays: dict[str, list[dict]] = {}  # display_id -> the outputs showing it, in any cell
        self._output_widgets: dict[str, _OutputWidget] = {}  # comm_id -> an Output widget the kernel opened
        # msg_id of an execute request -> the Output widgets capturing its outputs, the innermost last
        self._capturing: dict[str, list[_OutputWidget]] = {}
        self._clear_pending = False  # clear_output(wait=True): clear the cell before its next output

    def next_execution_count(self, cell: dict) -> int | None:
        """The n of the In [n] that `cell` gets if it is executed next; None for a cell that is not run.

        The one place that numbers a step's cells as Jupyter shows them: the
        executed notebook, its banner, every error and every presenter use it.
        """
        tags = (cell.get("metadata") or {}).get("tags") or []
        if not cell["source"].strip() or _SKIP_TAG in tags:
            return None
        return self.cells_executed + 1

    async def execute_cell(self, cell: dict, execution_count: int | None = None) -> None:
        """Execute `cell` (a code cell dict); its outputs, execution count and timing metadata are set in place.

        An empty cell, or one tagged `skip-execution`, is left as it is and not counted.
        Raises CellExecutionError (not for a cell tagged `raises-exception`), CellTimeoutError or DeadKernelError.
        """
        import zmq  # noqa: PLC0415
        from zmq.asyncio import Poller  # noqa: PLC0415

        tags = (cell.get("metadata") or {}).get("tags") or []
        if not cell["source"].strip() or _SKIP_TAG in tags:
            return
        may_raise = _RAISES_TAG in tags
        timing: dict[str, str] = {}
        cell.setdefault("metadata", {})["execution"] = timing
        cell["outputs"] = []
        self._clear_pending = False
        # no stdin: input() fails at once instead of waiting forever for an answer nobody will type
        msg_id = self.kc.execute(cell["source"], store_history=True, stop_on_error=not may_raise,
                                 allow_stdin=False)
        self.cells_executed += 1
        poller = Poller()
        poller.register(self.kc.shell_channel.socket, zmq.POLLIN)
        poller.register(self.kc.iopub_channel.socket, zmq.POLLIN)
        try:
            reply = await self._run(cell, msg_id, timing, poller)
        finally:
            if self.live is not None:
                self.live.send()  # what the cell printed last, however it ended
        if execution_count:
            cell["execution_count"] = execution_count
        if reply["content"].get("status") == "error" and not may_raise:
            raise CellExecutionError.from_cell(cell, reply["content"])

    async def _run(self, cell: dict, msg_id: str, timing: dict[str, str], poller: Any) -> dict[str, Any]:
        """Follow the execute request until its reply and idle status (or the grace after the reply)."""
        loop = asyncio.get_running_loop()
        deadline = None if self.timeout is None else loop.time() + self.timeout
        reply: dict[str, Any] | None = None
        idle = False
        grace_until = 0.0
        while reply is None or not idle:
            now = loop.time()
            if self.live is not None and self.live.due_at is not None and now >= self.live.due_at:
                self.live.send(now)
            wake = now + _ALIVE_CHECK_INTERVAL
            if self.live is not None and self.live.due_at is not None:
                wake = min(wake, self.live.due_at)
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
                if self.live is not None and self.live.due_at is not None and loop.time() >= self.live.due_at:
                    continue  # woken to send the printed text (above), not to check the kernel
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
                if message["parent_header"].get("msg_id") == msg_id:
                    idle = self._on_iopub(cell, message, timing)
        assert reply is not None
        return reply

    def _on_iopub(self, cell: dict, message: dict, timing: dict[str, str]) -> bool:
        """Record one iopub message of the running cell, in nbclient's order; True for the idle status."""
        kind = message["header"]["msg_type"]
        content = message["content"]
        display_id = (content.get("transient") or {}).get("display_id")
        if display_id and kind in _DISPLAY_TYPES:
            for shown in self._displays.get(display_id, []):
                shown["data"], shown["metadata"] = content["data"], content["metadata"]
        if "execution_count" in content:
            cell["execution_count"] = content["execution_count"]
        if kind == "status":
            state = content.get("execution_state")
            if state in ("busy", "idle"):
                timing[f"iopub.status.{state}"] = _timestamp(message)
            return state == "idle"
        if kind == "execute_input":
            timing["iopub.execute_input"] = _timestamp(message)
            return False
        if kind.startswith("comm_"):
            self._on_comm(kind, content)
            return False
        if kind not in _OUTPUT_TYPES and kind != "clear_output":
            return False  # update_display_data (done above), and what no front end shows
        if kind == "stream" and self.live is not None:
            self.live.add(content["name"], content["text"])
        capturing = self._capturing.get(message["parent_header"]["msg_id"])
        if capturing:
            capturing[-1].record(kind, content, message["parent_header"])
            return False
        if kind == "clear_output":
            if content.get("wait"):
                self._clear_pending = True
            else:
                cell["outputs"].clear()
            return False
        if self._clear_pending:
            cell["outputs"].clear()
            self._clear_pending = False
        output = _output(kind, content)
        if display_id:
            self._displays.setdefault(display_id, []).append(output)
        cell["outputs"].append(output)
        return False

    def _on_comm(self, kind: str, content: dict) -> None:
        """Follow the Output widgets: opened, and starting or ending to capture (their `msg_id`)."""
        comm_id = content["comm_id"]
        state = (content.get("data") or {}).get("state") or {}
        if kind == "comm_open":
            if (content.get("target_name") == "jupyter.widget"
                    and (state.get("_model_module"), state.get("_model_name")) == _OUTPUT_MODEL):
                self._output_widgets[comm_id] = _OutputWidget(comm_id, list(state.get("outputs") or []), self.kc)
            return
        widget = self._output_widgets.get(comm_id)
        if kind != "comm_msg" or widget is None or "msg_id" not in state:
            return
        if state["msg_id"]:
            widget.msg_id = state["msg_id"]
            self._capturing.setdefault(widget.msg_id, []).append(widget)
        elif widget in self._capturing.get(widget.msg_id, []):
            self._capturing[widget.msg_id].remove(widget)
            if not self._capturing[widget.msg_id]:
                del self._capturing[widget.msg_id]


class _LiveOutput:
    """The text a running cell prints, on its way to a live view: coalesced and bounded.

    Stream messages are collected per stream and sent together at most every
    LIVE_INTERVAL_S (the cell's loop wakes for it), and when the cell ends. Only
    the last _LIVE_KEEP characters of each stream wait (whole chunks are dropped
    from the front, so each message costs O(1)); `cut` tells the receiver that
    the text sent does not continue the text sent before.
    """

    def __init__(self, send: Callable[[str, str, bool], None]) -> None:
        self._send = send
        self._pending: dict[str, tuple[collections.deque[str], list[int]]] = {}  # stream -> (chunks, [size, cut])
        self._sent_at = 0.0
        self.due_at: float | None = None  # loop time when what is pending is to be sent

    def add(self, stream: str, text: str) -> None:
        if not text:
            return
        chunks, state = self._pending.setdefault(stream, (collections.deque(), [0, 0]))
        chunks.append(text)
        state[0] += len(text)
        while len(chunks) > 1 and state[0] - len(chunks[0]) >= _LIVE_KEEP:
            state[0] -= len(chunks.popleft())
            state[1] = 1
        if self.due_at is None:
            self.due_at = self._sent_at + LIVE_INTERVAL_S

    def send(self, now: float | None = None) -> None:
        """Send what is pending, one call per stream."""
        pending, self._pending = self._pending, {}
        self.due_at = None
        if now is None:
            now = asyncio.get_running_loop().time()
        self._sent_at = now
        for stream, (chunks, (size, cut)) in pending.items():
            text = "".join(chunks)
            if len(text) > _LIVE_KEEP:
                text, cut = text[-_LIVE_KEEP:], 1
            try:
                self._send(stream, text, bool(cut))
            except Exception:  # noqa: BLE001 - a live view that cannot be told must not fail the cell
                pass


class _OutputWidget:
    """The front end's side of one ipywidgets Output widget, as nbclient's OutputWidget plays it."""

    def __init__(self, comm_id: str, outputs: list[dict], kc: Any) -> None:
        self.comm_id = comm_id
        self.outputs = outputs
        self.kc = kc
        self.msg_id = ""  # the execute request whose outputs it captures
        self.clear_pending = False

    def record(self, kind: str, content: dict, parent: dict) -> None:
        """An output or clear_output message sent while the widget captures."""
        if kind == "clear_output":
            if content.get("wait"):
                self.clear_pending = True
                return
            self.outputs = []
        else:
            if self.clear_pending:
                self.outputs = []
                self.clear_pending = False
            output = _output(kind, content)
            last = self.outputs[-1] if self.outputs else None
            if (last is not None and last["output_type"] == output["output_type"] == "stream"
                    and last["name"] == output["name"]):
                last["text"] += output["text"]
            else:
                self.outputs.append(output)
        # tell the kernel, as a front end does: `Output.outputs` there is what the widget shows
        state = {"method": "update", "state": {"outputs": self.outputs}, "buffer_paths": []}
        self.kc.shell_channel.send(self.kc.session.msg("comm_msg", content={"data": state, "comm_id": self.comm_id},
                                                       parent=parent))


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
