"""The pipeline graph as a picture: SVG, PNG, self-contained HTML, mermaid.

Owns: the left-to-right layered layout of the graph, the colour of each step
status and the legend, and writing a picture chosen by file suffix. Reads a
Graph and, optionally, the statuses of a run (a RunResult, or anything with
`.steps: {name: obj with .status}`); never runs or records anything.

The layout is computed here, in pure Python, so a picture needs neither the
graphviz binary nor the network: layers by longest path, dummy nodes for long
edges, barycenter sweeps with transpositions against edge crossings, and
vertical placement by weighted isotonic regression (straight edges where
possible, no overlaps). It is deterministic: the same graph always gives the
same picture. PNG is drawn from the same scene with matplotlib (the `png` extra).

The instances of a parameter grid (`train[alpha=0.1,seed=1]`, ...) are drawn as
one node with their count and how far they got, so a grid of 48 stays one box.
In the widget the picture shrinks to the width it is given, so a failed or a
running step is never off-screen; its legend takes Jupyter's text colour, for
the dark theme.
"""

from __future__ import annotations

import os
import re
from bisect import bisect_right, insort
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Hashable, Mapping
from xml.sax.saxutils import escape, quoteattr

from ..errors import NbflowError, PipelineError, Problem
from ..graph import Graph, relative_to
from .view import NOT_STARTED, STATE_STYLES, format_duration, group_of

__all__ = ["svg", "html", "image", "mermaid", "write", "STATUS_STYLES", "SUFFIXES"]

SUFFIXES = (".svg", ".png", ".html", ".mmd")


@dataclass(frozen=True)
class Style:
    fill: str
    stroke: str
    text: str = "#212529"
    dash: bool = False
    label: str = ""


# The colours of view.STATE_STYLES, keyed by the state's value; the order is the legend's order.
STATUS_STYLES: dict[str, Style] = {status.value: Style(s.fill, s.stroke, s.text, s.dash, s.legend)
                                   for status, s in STATE_STYLES.items()}
STATUS_STYLES["not_started"] = Style(NOT_STARTED.fill, NOT_STARTED.stroke, NOT_STARTED.text, NOT_STARTED.dash,
                                     NOT_STARTED.legend)
# the state a group of grid instances shows: that of its most telling instance
_GROUP_ORDER = ("failed", "running", "cancelled", "not_started", "not_run", "pending", "succeeded", "skipped")
_LEGEND_TEXT = "var(--jp-ui-font-color1, #495057)"  # Jupyter's text colour: the legend reads in the dark theme
_PLAIN = Style("#ffffff", "#495057")  # no run to show
_OUTSIDE = Style("#ffffff", "#ced4da", "#868e96", label="not in this run")
_EDGE = "#8c96a3"
_FONT = ("system-ui, -apple-system, 'Segoe UI', Roboto, 'Helvetica Neue', Arial, 'DejaVu Sans', "
         "sans-serif")

# Geometry, in SVG pixels.
_MARGIN = 16
_RANK_GAP = 64  # between columns
_NODE_GAP = 18  # between two steps of a column
_DUMMY_GAP = 10  # next to a long edge passing through a column
_PAD_X = 14
_NAME_PX = 13
_SUB_PX = 11
_ARROW = 7
_BOLD = 1.08  # a step's name is drawn bold: that much wider than text_width's estimate
_LONGEST_NAME = 32  # longer names are cut in the box (with …), whole in its tooltip


# -- the layout -----------------------------------------------------------------------

@dataclass(frozen=True)
class _Dummy:
    """Where a long edge crosses a column."""

    edge: tuple[str, str]
    layer: int


@dataclass
class _Box:
    key: Hashable
    layer: int
    width: float
    height: float
    x: float = 0.0  # centre
    y: float = 0.0  # centre


@dataclass
class Layout:
    boxes: dict[Hashable, _Box]
    edges: dict[tuple[str, str], list[Hashable]]  # each edge: source, dummies..., target
    columns: list[tuple[float, float]]  # left x and width of each layer
    width: float
    height: float


def text_width(text: str, px: float) -> float:
    """Width of `text` at `px` pixels, estimated for common sans-serif fonts (DejaVu Sans is the widest)."""
    em = 0.0
    for ch in text:
        if ch in "il.,:;|!'`":
            em += 0.3
        elif ch in "fjrtI()[]{}/- ":
            em += 0.38
        elif ch in "mwMW@%":
            em += 0.92
        elif ch.isupper():
            em += 0.7
        elif ch.isascii():
            em += 0.6
        else:
            em += 1.0
    return em * px


def _layers(graph: Graph) -> dict[str, int]:
    layer: dict[str, int] = {}
    for name in graph.order:
        layer[name] = 1 + max((layer[u] for u in graph.upstream[name]), default=-1)
    down: dict[str, list[str]] = {n: [] for n in graph.order}
    for name in graph.order:
        for up in graph.upstream[name]:
            down[up].append(name)
    # A source step sits just before its first consumer, not far left with a long edge.
    for name in reversed(graph.order):
        if not graph.upstream[name] and down[name]:
            layer[name] = min(layer[d] for d in down[name]) - 1
    return layer


def _crossings(upper: list[Hashable], lower: list[Hashable], links: Mapping[Hashable, list[Hashable]]) -> int:
    pos_up = {k: i for i, k in enumerate(upper)}
    pos_low = {k: i for i, k in enumerate(lower)}
    pairs = sorted((pos_up[a], pos_low[b]) for a in upper for b in links.get(a, ()) if b in pos_low)
    seen: list[int] = []
    count = 0
    for _, b in pairs:
        count += len(seen) - bisect_right(seen, b)
        insort(seen, b)
    return count


def _order(rows: list[list[Hashable]], succ: Mapping[Hashable, list[Hashable]],
           pred: Mapping[Hashable, list[Hashable]]) -> list[list[Hashable]]:
    """Order each layer to reduce edge crossings (barycenter sweeps, then adjacent transpositions)."""

    def total(rs: list[list[Hashable]]) -> int:
        return sum(_crossings(rs[i], rs[i + 1], succ) for i in range(len(rs) - 1))

    def sweep(rs: list[list[Hashable]], downward: bool) -> None:
        indices = range(1, len(rs)) if downward else range(len(rs) - 2, -1, -1)
        for i in indices:
            ref = {k: p for p, k in enumerate(rs[i - 1] if downward else rs[i + 1])}
            links = pred if downward else succ

            def bary(item: tuple[int, Hashable], ref: dict[Hashable, int] = ref,
                     links: Mapping[Hashable, list[Hashable]] = links) -> tuple[float, int]:
                p, key = item
                near = [ref[n] for n in links.get(key, ()) if n in ref]
                return (sum(near) / len(near) if near else p, p)

            rs[i] = [k for _, k in sorted(enumerate(rs[i]), key=bary)]

    def pair_crossings(u: Hashable, v: Hashable, positions: list[dict[Hashable, int]], i: int) -> int:
        """Crossings among the edges of u and v (u placed before v) with the layers beside them."""
        count = 0
        for side, links in ((i - 1, pred), (i + 1, succ)):
            if 0 <= side < len(positions):
                pos = positions[side]
                for a in links.get(u, ()):
                    for b in links.get(v, ()):
                        count += pos[a] > pos[b]
        return count

    def transpose(rs: list[list[Hashable]]) -> None:
        positions = [{k: p for p, k in enumerate(r)} for r in rs]
        for _ in range(len(rs) + 4):  # bounded: each pass only ever lowers the crossings
            improved = False
            for i, row in enumerate(rs):
                for j in range(len(row) - 1):
                    u, v = row[j], row[j + 1]
                    if pair_crossings(u, v, positions, i) > pair_crossings(v, u, positions, i):
                        row[j], row[j + 1] = v, u
                        positions[i][u], positions[i][v] = j + 1, j
                        improved = True
            if not improved:
                break

    best = [list(r) for r in rows]
    best_count = total(best)
    current = [list(r) for r in rows]
    for iteration in range(12):
        if best_count == 0:
            break
        sweep(current, downward=iteration % 2 == 0)
        transpose(current)
        count = total(current)
        if count < best_count:
            best, best_count = [list(r) for r in current], count
    return best


def _isotonic(targets: list[float], weights: list[float]) -> list[float]:
    """Weighted least-squares fit of a non-decreasing sequence (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, weight, count]
    for t, w in zip(targets, weights):
        blocks.append([t, w, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            m2, w2, n2 = blocks.pop()
            m1, w1, n1 = blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2, n1 + n2])
    out: list[float] = []
    for m, _, n in blocks:
        out += [m] * int(n)
    return out


def _place(row: list[_Box], wanted: list[float], weights: list[float]) -> None:
    """Centres as close to `wanted` as the order and the gaps allow."""
    offsets = [0.0]
    for a, b in zip(row, row[1:]):
        gap = _NODE_GAP if isinstance(a.key, str) and isinstance(b.key, str) else _DUMMY_GAP
        offsets.append(offsets[-1] + a.height / 2 + b.height / 2 + gap)
    fitted = _isotonic([w - o for w, o in zip(wanted, offsets)], weights)
    for box, q, o in zip(row, fitted, offsets):
        box.y = q + o


def layout(graph: Graph, labels: Mapping[str, tuple[str, str]]) -> Layout:
    """Place every step (and every bend of a long edge) left to right."""
    layer = _layers(graph)
    n_layers = max(layer.values(), default=-1) + 1
    boxes: dict[Hashable, _Box] = {}
    for name in graph.order:
        title, sub = labels[name]
        width = max(text_width(title, _NAME_PX) * _BOLD, text_width(sub, _SUB_PX)) + 2 * _PAD_X
        boxes[name] = _Box(name, layer[name], max(72.0, width), 44.0 if sub else 32.0)
    edges: dict[tuple[str, str], list[Hashable]] = {}
    succ: dict[Hashable, list[Hashable]] = {}
    pred: dict[Hashable, list[Hashable]] = {}
    for target in graph.order:
        for source in graph.upstream[target]:
            chain: list[Hashable] = [source]
            for lay in range(layer[source] + 1, layer[target]):
                dummy = _Dummy((source, target), lay)
                boxes[dummy] = _Box(dummy, lay, 0.0, 2.0)
                chain.append(dummy)
            chain.append(target)
            edges[(source, target)] = chain
            for a, b in zip(chain, chain[1:]):
                succ.setdefault(a, []).append(b)
                pred.setdefault(b, []).append(a)

    # First order: depth-first from the sources, so a component's steps stay together.
    rows: list[list[Hashable]] = [[] for _ in range(n_layers)]
    seen: set[Hashable] = set()

    def visit(key: Hashable) -> None:
        if key in seen:
            return
        seen.add(key)
        rows[boxes[key].layer].append(key)
        for nxt in succ.get(key, ()):
            visit(nxt)

    for name in graph.order:
        if not graph.upstream[name]:
            visit(name)
    for key in boxes:  # nothing is left out, whatever the shape
        visit(key)
    rows = _order(rows, succ, pred)

    # Columns.
    columns: list[tuple[float, float]] = []
    left = float(_MARGIN)
    for row in rows:
        width = max((boxes[k].width for k in row), default=0.0)
        columns.append((left, width))
        left += width + _RANK_GAP
    for box in boxes.values():
        col_left, col_width = columns[box.layer]
        box.x = col_left + col_width / 2

    # Rows: start packed, then pull every box towards its neighbours, alternating directions.
    for row in rows:
        _place([boxes[k] for k in row], [0.0] * len(row), [1.0] * len(row))

    def weight(a: Hashable, b: Hashable) -> float:
        dummies = isinstance(a, _Dummy) + isinstance(b, _Dummy)
        return (1.0, 3.0, 8.0)[dummies]  # keep long edges straight

    def relax(index: int, sides: tuple[Mapping[Hashable, list[Hashable]], ...]) -> None:
        row = [boxes[k] for k in rows[index]]
        wanted, weights = [], []
        for box in row:
            near = [(boxes[n].y, weight(box.key, n)) for links in sides for n in links.get(box.key, ())]
            total = sum(w for _, w in near)
            wanted.append(sum(y * w for y, w in near) / total if near else box.y)
            weights.append(total if near else 0.5)
        _place(row, wanted, weights)

    for _ in range(6):
        for i in range(1, n_layers):
            relax(i, (pred,))
        for i in range(n_layers - 2, -1, -1):
            relax(i, (succ,))
    for _ in range(2):
        for i in range(n_layers):
            relax(i, (pred, succ))

    top = min((b.y - b.height / 2 for b in boxes.values()), default=0.0)
    for box in boxes.values():
        box.y += _MARGIN - top
    bottom = max((b.y + b.height / 2 for b in boxes.values()), default=0.0)
    right = columns[-1][0] + columns[-1][1] if columns else 0.0
    return Layout(boxes, edges, columns, right + _MARGIN, bottom + _MARGIN)


# -- the scene: what to draw, for the SVG and the PNG backends ------------------------------

@dataclass
class _Rect:
    x: float
    y: float
    w: float
    h: float
    style: Style
    stroke_width: float = 1.5
    pulse: bool = False


@dataclass
class _Text:
    x: float
    y: float  # baseline
    text: str
    px: float
    color: str
    bold: bool = False
    anchor: str = "middle"  # or "start"


@dataclass
class _Curve:
    points: list[tuple[str, tuple[float, ...]]]  # ("M", (x, y)), ("L", (x, y)), ("C", (x1, y1, x2, y2, x, y))
    color: str
    dash: bool = False


@dataclass
class _Arrow:
    x: float  # tip
    y: float
    color: str


@dataclass
class _Group:
    items: list[Any]
    title: str = ""
    link: str | None = None
    kind: str = ""  # "step" or "edge", for tests and styling
    status: str = ""  # a step's state, so a viewer can bring a failed or running step into view


@dataclass
class _Scene:
    width: float
    height: float
    groups: list[_Group] = field(default_factory=list)
    caption: str = ""


def _status_of(result: Any, name: str) -> str | None:
    if result is None:
        return None
    step = getattr(result, "steps", {}).get(name)
    if step is None:
        return "outside"
    status = getattr(step, "status", step)
    return str(getattr(status, "value", status))


def _style(status: str | None) -> Style:
    if status is None:
        return _PLAIN
    if status == "outside":
        return _OUTSIDE
    return STATUS_STYLES.get(status, STATUS_STYLES["pending"])


def _subtitle(result: Any, name: str, status: str | None) -> str:
    """The second line of a step's box: what happened, briefly."""
    if status is None or status == "outside":
        return ""
    step = result.steps[name]
    if isinstance(step, _GroupStep):
        return step.label
    parts = [STATUS_STYLES[status].label.split(" (")[0] if status in STATUS_STYLES else status]
    error = getattr(step, "error", None)
    duration = getattr(step, "duration_s", None)
    where = getattr(error, "where", "") if error is not None else ""
    if status == "failed" and where:
        parts.append(where)  # "In [4]", as everywhere (events.cell_label)
    elif status in ("succeeded", "failed", "cancelled") and isinstance(duration, (int, float)):
        parts.append(format_duration(duration))
    attempts = getattr(step, "attempts", 0)
    if isinstance(attempts, int) and attempts > 1:
        parts.append(f"{attempts} attempts")
    return " · ".join(parts)


def _cut(name: str) -> str:
    return name if len(name) <= _LONGEST_NAME else name[: _LONGEST_NAME - 1] + "…"


def _edge_files(graph: Graph, source: str, target: str) -> list[str]:
    made = {ref.path: ref for ref in graph.outputs_of(source)}
    names = []
    for ref in graph.inputs_of(target):
        if ref.path in made:
            if ref.label.startswith("value "):
                names.append(ref.label)
            else:
                names.append(relative_to(ref.path, graph.root))
    return names


def _step_title(graph: Graph, name: str, result: Any, status: str | None) -> str:
    lines = [f"{name}  ({graph.steps[name].rel_path})"]
    if status and status != "outside":
        lines.append(f"status: {status}")
        error = getattr(result.steps[name], "error", None)
        if error is not None:
            lines.append(f"error: {error.summary() if hasattr(error, 'summary') else error}")
    elif status == "outside":
        lines.append("not part of this run")
    reads = [ref.label for ref in graph.inputs_of(name)]
    writes = [ref.label for ref in graph.outputs_of(name)]
    if reads:
        lines.append("reads: " + ", ".join(reads))
    if writes:
        lines.append("writes: " + ", ".join(writes))
    return "\n".join(lines)


@dataclass
class _GroupStep:
    """A grid's instances as one node of the picture."""

    status: str
    label: str  # the box's second line: "12/48 · 3 failed"
    members: list[str]
    error: Any = None
    attempts: int = 0
    duration_s: float | None = None


@dataclass
class _Steps:
    steps: dict[str, Any]


@dataclass(frozen=True)
class _GroupRef:
    rel_path: str


class _GroupedGraph:
    """The graph with each grid's instances folded into one node named `base[…]`; reads like a Graph."""

    def __init__(self, graph: Graph, groups: dict[str, list[str]]):
        from graphlib import TopologicalSorter  # noqa: PLC0415

        self.graph, self.root = graph, graph.root
        self.members = {f"{base}[…]": names for base, names in groups.items()}
        self.node_of = {n: node for node, names in self.members.items() for n in names}
        first: dict[str, int] = {}
        upstream: dict[str, list[str]] = {}
        for i, name in enumerate(graph.order):
            node = self.node_of.get(name, name)
            first.setdefault(node, i)
            ups = upstream.setdefault(node, [])
            for up in graph.upstream[name]:
                up_node = self.node_of.get(up, up)
                if up_node != node and up_node not in ups:
                    ups.append(up_node)
        sorter = TopologicalSorter(upstream)
        sorter.prepare()
        order: list[str] = []
        while sorter.is_active():  # in the graph's own order where the arrows allow
            ready = sorted(sorter.get_ready(), key=first.__getitem__)
            order += ready
            sorter.done(*ready)
        self.order = order
        self.upstream = {node: tuple(ups) for node, ups in upstream.items()}
        self.steps = {node: (_GroupRef(f"{len(names)} grid instances") if node in self.members
                             else graph.steps[node]) for node, names in
                      [(n, self.members.get(n, [])) for n in order]}

    def _refs(self, node: str, which: str) -> list:
        seen: dict[Any, Any] = {}
        for name in self.members.get(node, [node]):
            for ref in getattr(self.graph, which)(name):
                seen.setdefault(ref.path, ref)
        return list(seen.values())

    def inputs_of(self, node: str) -> list:
        return self._refs(node, "inputs_of")

    def outputs_of(self, node: str) -> list:
        return self._refs(node, "outputs_of")


def _fold_grids(graph: Graph, result: Any, links: Mapping[str, str]) -> tuple[Any, Any, dict[str, str]]:
    """Fold each grid (two or more instances of one base name) into one node, with its states counted."""
    groups: dict[str, list[str]] = {}
    for name in graph.order:
        base = group_of(name)
        if base is not None:
            groups.setdefault(base, []).append(name)
    groups = {base: names for base, names in groups.items() if len(names) > 1}
    if not groups:
        return graph, result, dict(links)
    folded = _GroupedGraph(graph, groups)
    links = {folded.node_of.get(n, n): url for n, url in links.items() if n not in folded.node_of}
    if result is None:
        return folded, None, links
    steps: dict[str, Any] = {}
    for node in folded.order:
        names = folded.members.get(node)
        if names is None:
            if node in result.steps:
                steps[node] = result.steps[node]
            continue
        statuses = [_status_of(result, n) or "pending" for n in names]
        statuses = ["pending" if s == "outside" else s for s in statuses]
        worst = min(statuses, key=lambda st: _GROUP_ORDER.index(st) if st in _GROUP_ORDER else len(_GROUP_ORDER))
        done = sum(st in ("succeeded", "skipped", "failed", "not_run", "cancelled", "not_started") for st in statuses)
        label = f"{done}/{len(names)}"
        failed = statuses.count("failed")
        if failed:
            label += f" · {failed} failed"
        elif statuses.count("running"):
            label += f" · {statuses.count('running')} running"
        steps[node] = _GroupStep(worst, label, names)
    return folded, _Steps(steps), links


def scene(graph: Graph, result: Any = None, links: Mapping[str, str] | None = None) -> _Scene:
    """Everything to draw, in SVG pixel coordinates."""
    graph, result, links = _fold_grids(graph, result, links or {})
    statuses = {name: _status_of(result, name) for name in graph.order}
    labels = {name: (_cut(name), _subtitle(result, name, statuses[name])) for name in graph.order}
    if not graph.order:
        text = "no steps: no notebook in this folder has a cell tagged 'parameters'"
        width = text_width(text, _NAME_PX) + 2 * _MARGIN
        return _Scene(width, 60, [_Group([_Text(_MARGIN, 36, text, _NAME_PX, "#868e96", anchor="start")])])
    lay = layout(graph, labels)
    boxes = lay.boxes
    result_scene = _Scene(lay.width, lay.height)

    # Ports: the edges leaving (entering) a step are spread along its right (left) side, in the
    # order of where they go (come from), so they do not cross at the box.
    out_port: dict[tuple[str, str], float] = {}
    in_port: dict[tuple[str, str], float] = {}
    for name in graph.order:
        box = boxes[name]
        leaving = sorted((e for e in lay.edges if e[0] == name), key=lambda e: boxes[lay.edges[e][1]].y)
        entering = sorted((e for e in lay.edges if e[1] == name), key=lambda e: boxes[lay.edges[e][-2]].y)
        for group, ports in ((leaving, out_port), (entering, in_port)):
            spread = min(8.0, (box.height - 14) / max(1, len(group) - 1))
            for i, edge in enumerate(group):
                ports[edge] = box.y + (i - (len(group) - 1) / 2) * spread

    for edge, chain in lay.edges.items():
        source, target = edge
        start = (boxes[source].x + boxes[source].width / 2, out_port[edge])
        end_x = boxes[target].x - boxes[target].width / 2
        points: list[tuple[float, float]] = [start]
        for dummy in chain[1:-1]:
            col_left, col_width = lay.columns[boxes[dummy].layer]
            points += [(col_left, boxes[dummy].y), (col_left + col_width, boxes[dummy].y)]
        points.append((end_x - _ARROW + 1, in_port[edge]))
        path: list[tuple[str, tuple[float, ...]]] = [("M", points[0])]
        for i in range(1, len(points)):
            (x0, y0), (x1, y1) = points[i - 1], points[i]
            if i % 2 == 0 and i < len(points) - 1 or abs(y1 - y0) < 0.5:
                path.append(("L", (x1, y1)))  # across a column, or level
            else:
                mid = (x1 - x0) / 2
                path.append(("C", (x0 + mid, y0, x1 - mid, y1, x1, y1)))
        status = statuses[target]
        muted = status in ("not_run", "outside")
        color = "#ced4da" if muted else _EDGE
        files = _edge_files(graph, source, target)
        title = f"{source} → {target}" + ("\n" + "\n".join(files) if files else "")
        result_scene.groups.append(_Group([_Curve(path, color, dash=muted), _Arrow(end_x, in_port[edge], color)],
                                          title=title, kind="edge"))

    for name in graph.order:
        box = boxes[name]
        status = statuses[name]
        style = _style(status)
        left, top = box.x - box.width / 2, box.y - box.height / 2
        items: list[Any] = [_Rect(left, top, box.width, box.height, style,
                                  stroke_width=2.0 if status in ("running", "failed") else 1.5,
                                  pulse=status == "running")]
        title, sub = labels[name]
        if sub:
            items.append(_Text(box.x, box.y - 2, title, _NAME_PX, style.text, bold=True))
            items.append(_Text(box.x, box.y + 13, sub, _SUB_PX, _muted(style)))
        else:
            items.append(_Text(box.x, box.y + _NAME_PX * 0.36, title, _NAME_PX, style.text, bold=True))
        result_scene.groups.append(_Group(items, title=_step_title(graph, name, result, status),
                                          link=links.get(name), kind="step", status=status or ""))

    if result is not None:
        _legend(result_scene, statuses)
    return result_scene


def _muted(style: Style) -> str:
    return "#868e96" if style.text == "#868e96" else "#495057"


def _legend(target: _Scene, statuses: Mapping[str, str | None]) -> None:
    counts: dict[str, int] = {}
    for status in statuses.values():
        if status is not None:
            counts[status] = counts.get(status, 0) + 1
    known = [s for s in STATUS_STYLES if s in counts] + (["outside"] if "outside" in counts else [])
    y = target.height + 2
    x = float(_MARGIN)
    items: list[Any] = []
    for status in known:
        style = _style(status)
        label = f"{style.label} {counts[status]}"
        items.append(_Rect(x, y, 14, 14, style, stroke_width=1.5))
        items.append(_Text(x + 20, y + 11, label, _SUB_PX, _LEGEND_TEXT, anchor="start"))
        x += 20 + text_width(label, _SUB_PX) + 18
    target.groups.append(_Group(items, kind="legend"))
    target.width = max(target.width, x - 18 + _MARGIN)
    target.height = y + 14 + _MARGIN


# -- SVG --------------------------------------------------------------------------------

def _n(v: float) -> str:
    return f"{v:.1f}".rstrip("0").rstrip(".")


def _svg_item(item: Any) -> str:
    if isinstance(item, _Rect):
        s = item.style
        dash = ' stroke-dasharray="5 3"' if s.dash else ""
        pulse = ('<animate attributeName="stroke-opacity" values="1;0.3;1" dur="1.4s" '
                 'repeatCount="indefinite"/>') if item.pulse else ""
        rx = 7 if item.w > 20 else 3
        attrs = (f'x="{_n(item.x)}" y="{_n(item.y)}" width="{_n(item.w)}" height="{_n(item.h)}" rx="{rx}" '
                 f'fill="{s.fill}" stroke="{s.stroke}" stroke-width="{_n(item.stroke_width)}"{dash}')
        return f"<rect {attrs}>{pulse}</rect>" if pulse else f"<rect {attrs}/>"
    if isinstance(item, _Text):
        weight = ' font-weight="600"' if item.bold else ""
        fill = f'style="fill:{item.color}"' if item.color.startswith("var(") else f'fill="{item.color}"'
        return (f'<text x="{_n(item.x)}" y="{_n(item.y)}" font-size="{_n(item.px)}" {fill} '
                f'text-anchor="{item.anchor}"{weight}>{escape(item.text)}</text>')
    if isinstance(item, _Curve):
        d = " ".join(cmd + " " + " ".join(_n(v) for v in pts) for cmd, pts in item.points)
        dash = ' stroke-dasharray="4 3"' if item.dash else ""
        hover = f'<path d="{d}" fill="none" stroke="#000" stroke-opacity="0" stroke-width="10"/>'
        return (f'<path d="{d}" fill="none" stroke="{item.color}" stroke-width="1.5"{dash}/>' + hover)
    if isinstance(item, _Arrow):
        x, y = item.x, item.y
        return (f'<path d="M {_n(x - _ARROW)} {_n(y - 4)} L {_n(x)} {_n(y)} L {_n(x - _ARROW)} {_n(y + 4)} Z" '
                f'fill="{item.color}"/>')
    raise TypeError(item)


def _render_svg(sc: _Scene) -> str:
    w, h = _n(sc.width), _n(sc.height)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
           f'font-family={quoteattr(_FONT)} role="img" aria-label="nbflow pipeline graph">']
    for group in sc.groups:
        kind = f' class="nbflow-{group.kind}"' if group.kind else ""
        if group.status:
            kind += f' data-status="{group.status}"'

        body = "".join(_svg_item(i) for i in group.items)
        title = f"<title>{escape(group.title)}</title>" if group.title else ""
        g = f"<g{kind}>{title}{body}</g>"
        if group.link:
            target = "" if group.link.startswith("#") else ' target="_blank"'
            g = f'<a href={quoteattr(group.link)}{target}>{g}</a>'
        out.append(g)
    out.append("</svg>")
    return "\n".join(out)


def svg(graph: Graph, result: Any = None, links: Mapping[str, str] | None = None) -> str:
    """The graph as an SVG document; with `result`, steps are coloured by status and a legend is added.

    `links` maps step names to URLs: each step's box becomes a link (the report uses it).
    """
    return _render_svg(scene(graph, result, links))


def html(graph: Graph, result: Any = None, links: Mapping[str, str] | None = None, *, fit: bool = False) -> str:
    """A self-contained HTML fragment (inline SVG, no script, nothing fetched) for Jupyter and the widget.

    `fit`: the picture shrinks to the width it is given (never grows), so every step stays in view.
    """
    sc = scene(graph, result, links)
    text = _render_svg(sc)
    if fit:
        text = text.replace("<svg ", f'<svg style="width:100%;max-width:{_n(sc.width)}px;height:auto" ', 1)
    return f'<div class="nbflow-graph" style="overflow-x:auto;max-width:100%">{text}</div>'


def image(graph: Graph, result: Any = None) -> str:
    """The graph as an <img> of an inline SVG on a white card, shrinking to the width it is given.

    For HTML that a viewer may sanitize (JupyterLab with an untrusted notebook drops inline SVG and
    leaves its text behind; an image passes, and stays readable in a dark theme).
    """
    import base64  # noqa: PLC0415

    sc = scene(graph, result)
    text = _render_svg(sc)
    card = f'<rect width="{_n(sc.width)}" height="{_n(sc.height)}" rx="6" fill="#ffffff"/>'
    text = re.sub(r"(<svg [^>]*>)", lambda m: m.group(1) + card, text, count=1)
    text = text.replace(_LEGEND_TEXT, _fallback(_LEGEND_TEXT))  # an image has no theme to follow
    data = base64.b64encode(text.encode("utf-8")).decode("ascii")
    return (f'<div class="nbflow-graph"><img alt="the pipeline graph" src="data:image/svg+xml;base64,{data}" '
            f'style="width:100%;max-width:{_n(sc.width)}px;height:auto"></div>')



def mermaid(graph: Graph, result: Any = None) -> str:
    """The graph as mermaid `flowchart LR` text, with status classes when `result` is given.

    Each grid's instances are one node, `train[…]`, labelled with their count (and progress, with `result`).
    """
    graph, result, _ = _fold_grids(graph, result, {})
    ids: dict[str, str] = {}
    used: set[str] = set()
    for name in graph.order:
        base = re.sub(r"\W", "_", name) or "step"
        if base.lower() == "end" or base[0].isdigit():
            base = "step_" + base
        candidate, n = base, 2
        while candidate in used:
            candidate, n = f"{base}_{n}", n + 1
        used.add(candidate)
        ids[name] = candidate
    lines = ["flowchart LR"]
    for name in graph.order:
        label = name.replace('"', "#quot;")
        group = result.steps.get(name) if result is not None else None
        if isinstance(group, _GroupStep):
            label += f"<br/>{group.label}"
        elif isinstance(graph.steps.get(name), _GroupRef):
            label += f"<br/>{graph.steps[name].rel_path}"
        lines.append(f'    {ids[name]}["{label}"]')
    for target in graph.order:
        for source in graph.upstream[target]:
            lines.append(f"    {ids[source]} --> {ids[target]}")
    if result is not None:
        by_status: dict[str, list[str]] = {}
        for name in graph.order:
            status = _status_of(result, name)
            if status is not None:
                by_status.setdefault(status if status in STATUS_STYLES else "outside", []).append(ids[name])
        for status, names in by_status.items():
            s = _style(status)
            dash = ",stroke-dasharray: 5 3" if s.dash else ""
            lines.append(f"    classDef {status} fill:{s.fill},stroke:{s.stroke},color:{s.text}{dash}")
            lines.append(f"    class {','.join(names)} {status}")
    return "\n".join(lines) + "\n"


# -- PNG ----------------------------------------------------------------------------------

def _fallback(color: str) -> str:
    """'#495057' for 'var(--jp-ui-font-color1, #495057)': outside a browser there is no theme."""
    found = re.fullmatch(r"var\(--[\w-]+,\s*(#[0-9a-fA-F]+)\)", color)
    return found.group(1) if found else color


def _render_png(sc: _Scene, path: Path, scale: float = 2.0) -> None:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
        from matplotlib.figure import Figure  # noqa: PLC0415
        from matplotlib.patches import FancyBboxPatch, PathPatch, Polygon  # noqa: PLC0415
        from matplotlib.path import Path as MplPath  # noqa: PLC0415
    except ImportError:
        raise NbflowError(f"{path}: writing PNG needs matplotlib: pip install 'nbflow[png]' "
                          "(or write .svg, .html or .mmd, which need nothing)") from None

    dpi = 96 * scale
    fig = Figure(figsize=(sc.width / 96, sc.height / 96), dpi=dpi)
    FigureCanvasAgg(fig)
    fig.patch.set_facecolor("white")
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, sc.width)
    ax.set_ylim(sc.height, 0)
    ax.axis("off")
    pt = 0.75  # points per SVG pixel at 96 dpi
    for group in sc.groups:
        for item in group.items:
            if isinstance(item, _Rect):
                s = item.style
                ax.add_patch(FancyBboxPatch(
                    (item.x, item.y), item.w, item.h,
                    boxstyle=f"round,pad=0,rounding_size={7 if item.w > 20 else 3}",
                    facecolor=s.fill, edgecolor=s.stroke, linewidth=item.stroke_width * pt,
                    linestyle=(0, (5 / 1.5, 3 / 1.5)) if s.dash else "solid", zorder=3))
            elif isinstance(item, _Text):
                color = _fallback(item.color)
                ax.text(item.x, item.y, item.text, fontsize=item.px * pt, color=color,
                        ha="center" if item.anchor == "middle" else "left", va="baseline",
                        fontweight="bold" if item.bold else "normal", zorder=4)
            elif isinstance(item, _Curve):
                verts: list[tuple[float, float]] = []
                codes: list[Any] = []
                for cmd, pts in item.points:
                    if cmd == "M":
                        verts.append((pts[0], pts[1]))
                        codes.append(MplPath.MOVETO)
                    elif cmd == "L":
                        verts.append((pts[0], pts[1]))
                        codes.append(MplPath.LINETO)
                    else:
                        verts += [(pts[0], pts[1]), (pts[2], pts[3]), (pts[4], pts[5])]
                        codes += [MplPath.CURVE4] * 3
                ax.add_patch(PathPatch(MplPath(verts, codes), facecolor="none", edgecolor=item.color,
                                       linewidth=1.5 * pt, linestyle=(0, (4 / 1.5, 3 / 1.5)) if item.dash
                                       else "solid", zorder=2))
            elif isinstance(item, _Arrow):
                ax.add_patch(Polygon([(item.x - _ARROW, item.y - 4), (item.x, item.y), (item.x - _ARROW, item.y + 4)],
                                     closed=True, facecolor=item.color, edgecolor="none", zorder=2))
    fig.savefig(path, dpi=dpi, facecolor="white")


# -- files ------------------------------------------------------------------------------------

def write(graph: Graph, path: str | os.PathLike | None, result: Any = None) -> str:
    """Write the picture to `path`, chosen by its suffix (.svg, .png, .html, .mmd).

    Returns the SVG text (the mermaid text for .mmd). With `path` None nothing
    is written and the SVG is returned.
    """
    if path is None:
        return svg(graph, result)
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        what = f"cannot draw the graph as {suffix!r}" if suffix else "no file suffix to choose a format by"
        raise PipelineError(Problem(f"{what}; name the file with one of {', '.join(SUFFIXES)} (for example "
                                    "dag.svg)", file=str(path)))
    if suffix == ".mmd":
        text = mermaid(graph, result)
        _write_text(path, text)
        return text
    sc = scene(graph, result)
    text = _render_svg(sc)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise NbflowError(f"{path}: cannot create the folder {path.parent}: {e.strerror}; "
                          "choose another output path") from None
    if suffix == ".png":
        try:
            _render_png(sc, path)
        except OSError as e:
            raise NbflowError(f"{path}: cannot write it: {e.strerror}; check the folder is writable") from None
    elif suffix == ".html":
        _write_text(path, page(f"{graph.root.name}: pipeline graph", html(graph, result)))
    else:
        _write_text(path, text)
    return text


def page(title: str, body: str) -> str:
    """A complete self-contained HTML page around `body`."""
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{escape(title)}</title>\n"
            "</head>\n<body style=\"margin:16px;font-family:" + _FONT.replace("'", "&#39;") + "\">\n"
            f"{body}\n</body>\n</html>\n")


def _write_text(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as e:
        raise NbflowError(f"{path}: cannot write it: {e.strerror}; check the folder exists and is writable") from None

