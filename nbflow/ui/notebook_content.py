"""What the report shows of one executed notebook, read as JSON.

Owns: choosing the outputs that matter ("summary": every figure, the last
table, printed lines that look like metrics; "all": every output; "none"),
each bounded in size; numbering cells as in the source notebook (the cells
nbflow inserts into the executed copy do not count); the step's title (the
notebook's first heading); its parameters as its parameters cell wrote them;
and the failing cell of a failed step with the line that raised. Honours the
cell tags `remove-cell`, `remove-output` and `remove-input` (nbconvert's and
Jupyter Book's). Returns plain data for report.py to render; HTML outputs
come back already passed through `sanitize.clean_html`. Imports neither
nbformat nor nbconvert.
"""

from __future__ import annotations

import ast
import base64
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..executed import ERROR_MARKER_TAG
from ..notebook import DECLARATIONS, INJECTED_TAG, assignments, cell_source
from .sanitize import clean_html

__all__ = ["OUTPUT_MODES", "Output", "ShownCell", "FailedCell", "NotebookContent", "read", "is_metric", "strip_ansi"]

OUTPUT_MODES = ("summary", "all", "none")
MAX_METRIC_LINES = 20  # per notebook: the last ones printed
MAX_LINE = 200  # characters of one metric line
MAX_TEXT = 20_000  # characters of one text output ("all"), one text/plain table, one traceback
MAX_HTML = 300_000  # characters of one sanitized HTML output; a bigger one is shown as its text/plain
MAX_VALUE = 120  # characters of a parameter's default as written

_IMAGE_TYPES = ("image/png", "image/jpeg", "image/gif", "image/svg+xml")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")
# "rmse: 0.31", "accuracy = 93%", "wrote x.parquet: 1461 rows", "- Total precipitation: 4426.0 mm"
_KEY_VALUE = re.compile(r"(?:^|[\s,;({\[])[A-Za-z_][\w .%/()'-]{0,60}?\s*[:=]\s*[-+$€£]?(?:\d|\.\d)")
# "1461 rows from staging", "0 of 1461 rows are unusable", "48 months, 1461 days"
_QUANTITY = re.compile(r"^\s*(?:[-*•]\s*)?[-+]?\d[\d,_]*(?:\.\d+)?\s*%?\s+(?:of\s+\d[\d,_]*\s+)?[A-Za-z]")
# "rmse 0.31", "epoch 3 loss 0.25"
_NAME_NUMBER = re.compile(r"\b[A-Za-z_]\w*\s+[-+]?\d+(?:\.\d+)?%?\s*$")
_CELL_LINE = re.compile(r"Cell In\s*\[[^\]]*\],\s*line (\d+)")
_ARROW_LINE = re.compile(r"^-+>\s*(\d+)", re.M)


@dataclass(frozen=True)
class Output:
    kind: str  # "image" (data is a data: URI), "html" (sanitized), "text", "metrics" (lines), "error"
    data: str
    digest: str = ""  # images: a hash of the data, so one picture is put into a page once
    title: str = ""  # images: the output's text/plain ("<Figure size 1000x400 with 1 Axes>")
    width: int | None = None  # images: display size from the output's metadata, when given
    height: int | None = None
    note: str = ""  # what was left out ("1 200 more lines in the notebook")


@dataclass(frozen=True)
class ShownCell:
    number: int  # 1-based, as in the source notebook (and in nbflow's error messages)
    execution: int | None  # its execution count, the n of `In [n]` in the executed notebook
    source: str | None  # the cell's code when inputs are shown
    outputs: tuple[Output, ...]


@dataclass(frozen=True)
class FailedCell:
    number: int
    execution: int | None
    source: str
    line: int | None  # 1-based line of `source` that raised, when the traceback says
    ename: str
    evalue: str
    traceback: str  # without terminal colours, bounded


@dataclass(frozen=True)
class NotebookContent:
    title: str  # the first heading of the notebook, "" when it has none
    parameters: tuple[tuple[str, str], ...]  # (name, default as written) from the parameters cell
    cells: tuple[ShownCell, ...]
    failed: FailedCell | None


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


def read(path: Path, outputs: str = "summary", inputs: bool = False, error_cell: int | None = None) -> NotebookContent:
    """Read the executed notebook at `path`. `error_cell`: the failing cell's number from the ledger, used
    when the notebook holds no error output (a timeout, a dead kernel, a missing output).

    Raises OSError or ValueError when the file cannot be read as a notebook.
    """
    if outputs not in OUTPUT_MODES:
        raise ValueError(f"outputs must be one of {', '.join(OUTPUT_MODES)}, not {outputs!r}")
    nb = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(nb, dict) or not isinstance(nb.get("cells"), list):
        raise ValueError("not a notebook (no list of cells)")
    numbered = _numbered_cells(nb["cells"])
    code = [(n, c) for n, c in numbered if c.get("cell_type") == "code" and "remove-cell" not in _tags(c)]
    if outputs == "all":
        shown = _all_outputs(code, inputs)
    elif outputs == "summary":
        shown = _summary(code, inputs)
    else:
        shown = ()
    return NotebookContent(_title(numbered), _parameters(numbered), shown, _failed(code, error_cell))


def _tags(cell: dict) -> list[str]:
    tags = (cell.get("metadata") or {}).get("tags") or []
    return [t for t in tags if isinstance(t, str)] if isinstance(tags, list) else []


def _numbered_cells(cells: list[Any]) -> list[tuple[int, dict]]:
    """The cells of the source notebook with their 1-based numbers: nbflow's inserted cells left out."""
    kept = [c for c in cells if isinstance(c, dict)
            and not {INJECTED_TAG, ERROR_MARKER_TAG} & set(_tags(c))]
    return list(enumerate(kept, start=1))


def _title(cells: list[tuple[int, dict]]) -> str:
    for _, cell in cells:
        if cell.get("cell_type") == "markdown":
            for line in cell_source(cell).splitlines():
                if line.startswith("#"):
                    return line.lstrip("#").strip()
    return ""


def _parameters(cells: list[tuple[int, dict]]) -> tuple[tuple[str, str], ...]:
    cell = next((c for _, c in cells if "parameters" in _tags(c)), None)
    if cell is None:
        return ()
    source = cell_source(cell)
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return ()
    found = []
    for _, name, value in assignments(tree):
        if name in DECLARATIONS:
            continue
        written = " ".join((ast.get_source_segment(source, value) or "").split())
        found.append((name, written if len(written) <= MAX_VALUE else written[: MAX_VALUE - 1] + "…"))
    return tuple(found)


def _text(value: Any) -> str:
    return "".join(value) if isinstance(value, list) else str(value or "")


def _bounded(text: str, limit: int = MAX_TEXT) -> tuple[str, str]:
    if len(text) <= limit:
        return text, ""
    rest = text[limit:].count("\n") + 1
    return text[:limit], f"{rest} more line{'s' if rest != 1 else ''} in the notebook"


def _image(output: dict) -> Output | None:
    """The smallest inlined rendering of an image output, or None if it has no image."""
    data = output.get("data") or {}
    choices = []
    for mime in _IMAGE_TYPES:
        if mime not in data:
            continue
        raw = _text(data[mime])
        encoded = (base64.b64encode(raw.encode("utf-8")).decode("ascii") if mime == "image/svg+xml"
                   else "".join(raw.split()))
        choices.append((len(encoded), mime, encoded))
    if not choices:
        return None
    _, mime, encoded = min(choices)
    meta = (output.get("metadata") or {}).get(mime) or {}
    size = {k: meta.get(k) for k in ("width", "height")}
    return Output("image", f"data:{mime};base64,{encoded}", hashlib.sha256(encoded.encode()).hexdigest()[:16],
                  title=_text(data.get("text/plain")).strip()[:200],
                  width=size["width"] if isinstance(size["width"], int) else None,
                  height=size["height"] if isinstance(size["height"], int) else None)


def _html(output: dict) -> Output | None:
    data = output.get("data") or {}
    if "text/html" not in data:
        return None
    cleaned = clean_html(_text(data["text/html"]))
    if len(cleaned) <= MAX_HTML and cleaned.strip():
        return Output("html", cleaned)
    plain = _text(data.get("text/plain"))
    if not plain:
        return None
    text, cut = _bounded(plain)
    return Output("text", text, note=cut or "shown as text: its HTML is too large for the report")


def _has_table(output: dict) -> bool:
    return "<table" in _text((output.get("data") or {}).get("text/html")).lower()


def _rich(output: dict) -> Output | None:
    """One display output as the report shows it: an image, else HTML, else text."""
    shown = _image(output) or _html(output)
    if shown is not None:
        return shown
    data = output.get("data") or {}
    for mime in ("text/markdown", "text/latex", "text/plain"):
        if mime in data:
            text, cut = _bounded(_text(data[mime]))
            return Output("text", text, note=cut)
    if data:
        return Output("text", "", note=f"{', '.join(sorted(data))}: not shown here, open the notebook")
    return None


def _stream_lines(output: dict) -> list[str]:
    """The lines a terminal would show: carriage returns (progress bars) keep their last state."""
    text = strip_ansi(_text(output.get("text")))
    return [line.rsplit("\r", 1)[-1] for line in text.split("\n")]


def is_metric(line: str) -> bool:
    """Whether a printed line looks like a result worth sending (a name with a number, a count)."""
    stripped = line.strip()
    if not stripped or len(stripped) > 400:
        return False
    return bool(_KEY_VALUE.search(stripped) or _QUANTITY.match(stripped) or _NAME_NUMBER.search(stripped))


def _execution(cell: dict) -> int | None:
    count = cell.get("execution_count")
    return count if isinstance(count, int) else None


def _source(cell: dict, inputs: bool) -> str | None:
    return cell_source(cell) if inputs and "remove-input" not in _tags(cell) else None


def _summary(code: list[tuple[int, dict]], inputs: bool) -> tuple[ShownCell, ...]:
    chosen: dict[int, list[Output]] = {}
    table: tuple[int, Output] | None = None
    metrics: list[tuple[int, str]] = []
    for number, cell in code:
        if "remove-output" in _tags(cell):
            continue
        for output in cell.get("outputs") or []:
            kind = output.get("output_type")
            if kind in ("display_data", "execute_result"):
                image = _image(output)
                if image is not None:
                    chosen.setdefault(number, []).append(image)
                elif _has_table(output):
                    shown = _html(output)
                    if shown is not None:
                        table = (number, shown)
            elif kind == "stream" and output.get("name") == "stdout":
                metrics += [(number, line.strip()) for line in _stream_lines(output) if is_metric(line)]
    if table is not None:
        chosen.setdefault(table[0], []).append(table[1])
    left_out = max(0, len(metrics) - MAX_METRIC_LINES)
    by_cell: dict[int, list[str]] = {}
    for number, line in metrics[left_out:]:
        by_cell.setdefault(number, []).append(line if len(line) <= MAX_LINE else line[: MAX_LINE - 1] + "…")
    first = True
    for number, lines in by_cell.items():
        note = f"{left_out} earlier line{'s' if left_out != 1 else ''} in the notebook" if first and left_out else ""
        chosen.setdefault(number, []).insert(0, Output("metrics", "\n".join(lines), note=note))
        first = False
    cells = dict(code)
    return tuple(ShownCell(n, _execution(cells[n]), _source(cells[n], inputs), tuple(chosen[n]))
                 for n in sorted(chosen))


def _all_outputs(code: list[tuple[int, dict]], inputs: bool) -> tuple[ShownCell, ...]:
    shown = []
    for number, cell in code:
        outputs: list[Output] = []
        if "remove-output" not in _tags(cell):
            for output in cell.get("outputs") or []:
                kind = output.get("output_type")
                item: Output | None
                if kind == "stream":
                    text, cut = _bounded("\n".join(_stream_lines(output)).rstrip("\n"))
                    item = Output("text", text, note=cut)
                elif kind == "error":
                    text, cut = _bounded(strip_ansi("\n".join(_text(t) for t in output.get("traceback") or [])))
                    item = Output("error", text or f"{output.get('ename')}: {output.get('evalue')}", note=cut)
                else:
                    item = _rich(output)
                if item is not None:
                    outputs.append(item)
        source = _source(cell, inputs)
        if outputs or (source and source.strip()):
            shown.append(ShownCell(number, _execution(cell), source, tuple(outputs)))
    return tuple(shown)


def _failed(code: list[tuple[int, dict]], error_cell: int | None) -> FailedCell | None:
    for number, cell in code:
        for output in cell.get("outputs") or []:
            if output.get("output_type") == "error":
                trace = strip_ansi("\n".join(_text(t) for t in output.get("traceback") or []))
                return FailedCell(number, _execution(cell), cell_source(cell), _failing_line(trace),
                                  str(output.get("ename") or ""), str(output.get("evalue") or ""), trace[-MAX_TEXT:])
    for number, cell in code:
        if ((cell.get("metadata") or {}).get("papermill") or {}).get("status") == "failed" or number == error_cell:
            return FailedCell(number, _execution(cell), cell_source(cell), None, "", "", "")
    return None


def _failing_line(traceback: str) -> int | None:
    """The line of the cell that raised: the first frame of an IPython traceback is the cell's."""
    match = _CELL_LINE.search(traceback) or _ARROW_LINE.search(traceback)
    return int(match.group(1)) if match else None
