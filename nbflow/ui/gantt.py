"""The timeline of a recorded run as an inline SVG: one row per step, one bar per attempt.

Owns: placing each attempt of each step on a time axis that starts when the
run started, from the ledger's started_at / finished_at, coloured like the
graph (plot.STATUS_STYLES); steps that did not run get their row with a word
instead of a bar. Plain SVG with <title> tooltips and <a> links: no script,
nothing fetched. Reads ledger rows; runs and records nothing.
"""

from __future__ import annotations

import math
import time
from typing import Any, Mapping
from xml.sax.saxutils import escape, quoteattr

from . import plot
from .view import format_duration

__all__ = ["svg"]

_ROW = 24
_BAR = 14
_AXIS = 24  # above the first row: tick labels
_CHART = 640  # width of the time axis
_PAD = 10
_NAME_PX = 12
_SMALL_PX = 11
_MAX_LABEL = 240
_TICK_STEPS = (0.05, 0.1, 0.2, 0.25, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800,
               21600, 43200, 86400)
_NO_BAR = {"skipped": "skipped (fresh)", "not_run": "not run"}


def _n(v: float) -> str:
    return f"{v:.1f}".rstrip("0").rstrip(".")


def _plot_status(status: str) -> str:
    return {"interrupted": "cancelled"}.get(status, status)


def _tick_label(t: float, step: float) -> str:
    if step >= 3600:
        return f"{t / 3600:g} h"
    if step >= 60:
        return f"{t / 60:g} min"
    return f"{round(t, 3):g} s"


def _clock(ts: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts)) + f".{int(ts % 1 * 1000):03d}"


def _fit(name: str) -> str:
    while len(name) > 1 and plot.text_width(name, _NAME_PX) > _MAX_LABEL:
        name = name[:-2] + "…"
    return name


def _span(row: dict[str, Any], run: Mapping[str, Any]) -> tuple[float, float] | None:
    start = row.get("started_at")
    if start is None or row["status"] in _NO_BAR:
        return None
    # the measured duration, else when the ledger recorded the end
    end = start + row["duration_s"] if row.get("duration_s") is not None else row.get("finished_at")
    if end is None:  # still running, or interrupted: up to the run's end, if known
        end = run.get("finished_at") or start
    return start, max(start, end)


def svg(run: Mapping[str, Any], rows: list[dict[str, Any]], links: Mapping[str, str] | None = None) -> str:
    """The timeline of `run` from its step_runs `rows` (every attempt, in ledger order)."""
    links = links or {}
    steps: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        steps.setdefault(row["step"], []).append(row)
    t0 = run["started_at"]
    spans = {id(r): _span(r, run) for r in rows}
    ends = [s[1] for s in spans.values() if s is not None]
    span = max([e - t0 for e in ends] + [0.001])
    tick = next((s for s in _TICK_STEPS if span / s <= 8), None) or math.ceil(span / 8 / 86400) * 86400
    labels = {name: _fit(name) for name in steps}
    left = _PAD + max([plot.text_width(label, _NAME_PX) for label in labels.values()] + [40]) + 12
    width = left + _CHART + 70  # room for the duration after the longest bar
    height = _AXIS + _ROW * max(1, len(steps)) + _PAD
    scale = _CHART / span

    def x(ts: float) -> float:
        return left + (ts - t0) * scale

    out = [(f'<svg xmlns="http://www.w3.org/2000/svg" class="nbflow-gantt" width="{_n(width)}" '
            f'height="{_n(height)}" viewBox="0 0 {_n(width)} {_n(height)}" role="img" '
            'aria-label="timeline of the run: one bar per step attempt">')]
    t = 0.0
    while t <= span + 1e-9:
        tx = left + t * scale
        out.append(f'<line x1="{_n(tx)}" y1="{_AXIS - 4}" x2="{_n(tx)}" y2="{_n(height - _PAD)}" stroke="#e9ecef"/>'
                   f'<text x="{_n(tx)}" y="{_AXIS - 8}" font-size="{_SMALL_PX}" fill="#868e96" '
                   f'text-anchor="middle">{escape(_tick_label(t, tick))}</text>')
        t += tick
    for i, (name, attempts) in enumerate(steps.items()):
        top = _AXIS + i * _ROW
        mid = top + _ROW / 2
        label = (f'<text x="{_PAD}" y="{_n(mid + 4)}" font-size="{_NAME_PX}" fill="#212529">'
                 f"{escape(labels[name])}</text>")
        if name in links:
            label = f"<a href={quoteattr(links[name])}><title>{escape(name)}</title>{label}</a>"
        out.append(label)
        bars = [(r, span_) for r in attempts if (span_ := spans[id(r)]) is not None]
        if not bars:
            word = _NO_BAR.get(attempts[-1]["status"], attempts[-1]["status"].replace("_", " "))
            out.append(f'<text x="{_n(left + 4)}" y="{_n(mid + 4)}" font-size="{_SMALL_PX}" fill="#868e96" '
                       f'font-style="italic" class="gantt-none">{escape(word)}</text>')
            continue
        for row, (start, end) in bars:
            status = _plot_status(row["status"])
            style = plot.STATUS_STYLES.get(status, plot.STATUS_STYLES["pending"])
            bx, bw = x(start), max(2.0, (end - start) * scale)
            took = format_duration(end - start)
            tip = (f"{name}, attempt {row['attempt']}: {row['status'].replace('_', ' ')}\n"
                   f"{_clock(start)} → {_clock(end)} ({took}), "
                   f"{format_duration(start - t0)} after the run started")
            dash = ' stroke-dasharray="4 2"' if style.dash else ""
            text_x, anchor = bx + bw + 4, "start"
            if len(bars) > 1 and row is not bars[-1][0]:
                took = f"#{row['attempt']} {took}"
            if text_x + plot.text_width(took, _SMALL_PX) > width - 2:
                text_x, anchor = bx + bw - 4, "end"
            out.append(f'<g class="gantt-bar" data-step={quoteattr(name)} data-attempt="{row["attempt"]}" '
                       f'data-status="{escape(row["status"])}"><title>{escape(tip)}</title>'
                       f'<rect x="{_n(bx)}" y="{_n(mid - _BAR / 2)}" width="{_n(bw)}" height="{_BAR}" rx="3" '
                       f'fill="{style.fill}" stroke="{style.stroke}" stroke-width="1.5"{dash}/>'
                       f'<text x="{_n(text_x)}" y="{_n(mid + 4)}" font-size="{_SMALL_PX}" fill="#495057" '
                       f'text-anchor="{anchor}">{escape(took)}</text></g>')
    out.append("</svg>")
    return "\n".join(out)
