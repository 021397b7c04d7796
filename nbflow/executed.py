"""The executed copy of a step's notebook, following papermill's conventions.

Owns: injecting the `injected-parameters` cell, papermill metadata on the
notebook and on every cell, the error banner and the anchor before the failing
cell, and writing the file atomically. Papermill users and tools (scrapbook,
papermill's own readers) recognise the result. Must not execute anything.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from .notebook import INJECTED_TAG, cell_source
from .params import jsonable

ERROR_MARKER_TAG = "papermill-error-cell-tag"  # papermill's, so its tools strip our banner too
ERROR_STYLE = 'style="color:red; font-family:Helvetica Neue, Helvetica, Arial, sans-serif; font-size:2em;"'
PAPERMILL_COMPAT_VERSION = "2.7.0"


def python_assignments(parameters: dict[str, Any], comment: str = "Parameters") -> str:
    lines = [f"# {comment}"]
    lines += [f"{name} = {_literal(value)}" for name, value in parameters.items()]
    return "\n".join(lines) + "\n"


def _literal(value: Any) -> str:
    """Python source for a value; repr() of nan and inf is not valid code."""
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return f"float({str(value)!r})"
    return repr(value)


def parameters_source(parameters: dict[str, Any], kernel: str, language: str) -> str:
    if language == "python":
        return python_assignments(parameters)
    from papermill.translators import translate_parameters  # noqa: PLC0415 - other languages only

    return translate_parameters(kernel, language, parameters, "Parameters")


def prepare(nb: dict, parameters: dict[str, Any], *, parameters_cell: int, kernel: str, language: str,
            input_path: str, output_path: str) -> tuple[dict, list[int]]:
    """Insert the injected-parameters cell and papermill metadata.

    Returns the notebook and, for each of its cells, the 1-based number of
    the same cell in the source notebook (0 for the injected cell).
    """
    cells = [c for c in nb["cells"] if INJECTED_TAG not in _tags(c) and ERROR_MARKER_TAG not in _tags(c)]
    numbers = [i + 1 for i in range(len(cells))]
    for cell in cells:
        cell["source"] = cell_source(cell)
        if cell.get("cell_type") == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
        cell.setdefault("metadata", {})["papermill"] = {
            "exception": None, "start_time": None, "end_time": None, "duration": None, "status": "pending"}
    if parameters:
        injected: dict[str, Any] = {"cell_type": "code", "execution_count": None, "id": _new_id(nb),
                    "metadata": {"tags": [INJECTED_TAG], "papermill": {
                        "exception": None, "start_time": None, "end_time": None, "duration": None,
                        "status": "pending"}},
                    "outputs": [], "source": parameters_source(parameters, kernel, language)}
        at = parameters_cell + 1
        cells.insert(at, injected)
        numbers.insert(at, 0)
    nb["cells"] = cells
    meta = nb.setdefault("metadata", {})
    meta["papermill"] = {
        "default_parameters": {}, "parameters": {k: jsonable(v) for k, v in parameters.items()},
        "environment_variables": {}, "version": PAPERMILL_COMPAT_VERSION, "engine": "nbflow",
        "input_path": input_path, "output_path": output_path,
        "start_time": _iso(time.time()), "end_time": None, "duration": None, "exception": None}
    return nb, numbers


def mark_cell(cell: dict, status: str, start: float | None = None, end: float | None = None,
              exception: bool | None = None) -> None:
    pm = cell.setdefault("metadata", {}).setdefault("papermill", {})
    pm["status"] = status
    if start is not None:
        pm["start_time"] = _iso(start)
    if end is not None:
        pm["end_time"] = _iso(end)
        if start is not None:
            pm["duration"] = round(end - start, 6)
    if exception is not None:
        pm["exception"] = exception


def finish(nb: dict, started: float, *, failed_cell: int | None, banner: str | None) -> None:
    """Close the papermill metadata; on failure put the banner on top and the anchor before the failing cell."""
    end = time.time()
    meta = nb["metadata"]["papermill"]
    meta["end_time"] = _iso(end)
    meta["duration"] = round(end - started, 6)
    meta["exception"] = banner is not None
    if banner is None:
        return
    count = "?"
    if failed_cell is not None:
        count = str(nb["cells"][failed_cell].get("execution_count") or "?")
        anchor = _markdown(f'<span id="papermill-error-cell" {ERROR_STYLE}>'
                           "Execution using nbflow encountered an exception here and stopped:</span>", nb)
        nb["cells"].insert(failed_cell, anchor)
    top = _markdown(f"<span {ERROR_STYLE}>An Exception was encountered at "
                    f"'<a href=\"#papermill-error-cell\">In [{count}]</a>'.</span>\n\n"
                    f"**nbflow:** {_escape(banner)}", nb)
    nb["cells"].insert(0, top)


def write_atomic(nb: dict, path: Path) -> None:
    """Write the notebook so that readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.dumps(nb, indent=1, ensure_ascii=False, default=jsonable) + "\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; an executed notebook is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _markdown(source: str, nb: dict) -> dict:
    return {"cell_type": "markdown", "id": _new_id(nb), "metadata": {"tags": [ERROR_MARKER_TAG]}, "source": source}


def _new_id(nb: dict) -> str:
    import uuid  # noqa: PLC0415

    existing = {c.get("id") for c in nb.get("cells", [])}
    while True:
        cid = uuid.uuid4().hex[:8]
        if cid not in existing:
            return cid


def _tags(cell: dict) -> list:
    return (cell.get("metadata") or {}).get("tags") or []


def _iso(t: float) -> str:
    from datetime import datetime, timezone  # noqa: PLC0415

    return datetime.fromtimestamp(t, timezone.utc).isoformat()


def _escape(text: str) -> str:
    return text.replace("<", "&lt;").replace(">", "&gt;")
