"""The graph as a picture: SVG without graphviz, PNG, HTML, mermaid, colours by status, the layout."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace

import pytest

import nbflow
from nbflow.errors import PipelineError
from nbflow.events import RunResult, RunStatus, StepError, StepResult, StepStatus
from nbflow.graph import build_graph
from nbflow.ui import plot

SVG = "{http://www.w3.org/2000/svg}"
NBFLOW = str(Path(sys.executable).parent / "nbflow")


def edges_of(graph):
    return {(u, name) for name in graph.order for u in graph.upstream[name]}


def groups(root: ET.Element, kind: str) -> list[ET.Element]:
    return [g for g in root.iter(f"{SVG}g") if g.get("class") == f"nbflow-{kind}"]


def step_groups(svg_text: str) -> dict[str, ET.Element]:
    """Each step's <g>, by the step name written in its box."""
    root = ET.fromstring(svg_text)
    return {g.find(f"{SVG}text").text: g for g in groups(root, "step")}


def chain(root: Path, names: list[str], notebook_factory, extra_edges: dict[str, list[str]] | None = None) -> None:
    """A pipeline where each named step reads the file of the one before it (and of `extra_edges`)."""
    extra_edges = extra_edges or {}
    for i, name in enumerate(names):
        ups = ([names[i - 1]] if i else []) + extra_edges.get(name, [])
        depth = "../" * name.count("/")
        inputs = {f"in{j}": f"{depth}data/{u.replace('/', '__')}.txt" for j, u in enumerate(ups)}
        outputs = {"out": f"{depth}data/{name.replace('/', '__')}.txt"}
        notebook_factory(root / f"{name}.ipynb", f"inputs = {inputs!r}\noutputs = {outputs!r}", "pass")
    (root / "data").mkdir(exist_ok=True)


def test_cli_plot_writes_an_svg_naming_every_step_without_graphviz(fixture_pipeline, tmp_path):
    root = fixture_pipeline("diamond")
    bin_dir = tmp_path / "bin"  # a PATH with nothing on it but nbflow: certainly no `dot`
    bin_dir.mkdir()
    env = {**os.environ, "PATH": str(bin_dir)}
    out = tmp_path / "pictures" / "dag.svg"
    proc = subprocess.run([NBFLOW, "plot", str(root), "-o", str(out)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout
    tree = ET.parse(out).getroot()
    assert tree.tag == f"{SVG}svg" and float(tree.get("width")) > 100
    texts = {t.text for t in tree.iter(f"{SVG}text")}
    graph = build_graph(root)
    assert set(graph.steps) <= texts == {"a", "b", "c", "d", "sub/e"}
    assert len(groups(tree, "edge")) == len(edges_of(graph)) == 4


def test_cli_plot_refuses_an_unknown_suffix_naming_the_supported_ones(fixture_pipeline, tmp_path):
    root = fixture_pipeline("diamond")
    proc = subprocess.run([NBFLOW, "plot", str(root), "-o", str(tmp_path / "dag.pdf")], capture_output=True,
                          text=True)
    assert proc.returncode == 2
    assert "Invalid value for '-o'" in proc.stderr and "dag.pdf" in proc.stderr
    assert ".svg, .png, .html, .mmd" in proc.stderr
    assert not (tmp_path / "dag.pdf").exists()
    with pytest.raises(PipelineError, match="no file suffix"):
        plot.write(build_graph(root), tmp_path / "dag")


def test_edge_tooltips_name_the_files_that_link_the_steps(fixture_pipeline):
    graph = build_graph(fixture_pipeline("diamond"))
    tree = ET.fromstring(plot.svg(graph))
    titles = [g.find(f"{SVG}title").text for g in groups(tree, "edge")]
    assert any(t.startswith("a → b\n") and "data/a.txt" in t for t in titles), titles


def test_mermaid_is_a_flowchart_with_every_edge(fixture_pipeline):
    graph = build_graph(fixture_pipeline("diamond"))
    text = plot.mermaid(graph)
    lines = text.splitlines()
    assert lines[0] == "flowchart LR"
    ids = {m.group(2): m.group(1) for m in re.finditer(r'^\s+(\w+)\["([^"]+)"\]$', text, re.M)}
    assert set(ids) == set(graph.steps)
    arrows = {tuple(line.split(" --> ")) for line in (x.strip() for x in lines) if " --> " in line}
    assert arrows == {(ids[u], ids[v]) for u, v in edges_of(graph)}


def test_mermaid_ids_are_safe_for_awkward_step_names(tmp_path, notebook_factory):
    chain(tmp_path, ["end", "etl/clean", "etl_clean", "2nd"], notebook_factory)
    graph = build_graph(tmp_path)
    text = plot.mermaid(graph)
    ids = re.findall(r"^\s+(\S+)\[", text, re.M)
    assert len(ids) == len(set(ids)) == 4
    assert all(re.fullmatch(r"[A-Za-z_]\w*", i) and i.lower() != "end" for i in ids), ids


def test_mermaid_draws_a_grid_as_one_node_with_its_count(fixture_pipeline):
    graph = build_graph(fixture_pipeline("grid"))
    text = plot.mermaid(graph)
    assert 'train___["train[…]<br/>6 grid instances"]' in text
    assert "prep --> train___" in text and "train___ --> summary" in text and text.count("-->") == 2


def test_mmd_and_html_files(fixture_pipeline, tmp_path):
    graph = build_graph(fixture_pipeline("diamond"))
    assert plot.write(graph, tmp_path / "g.mmd") == (tmp_path / "g.mmd").read_text()
    svg_text = plot.write(graph, tmp_path / "g.html")
    page = (tmp_path / "g.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and svg_text in page


def test_html_is_self_contained_and_holds_the_svg(fixture_pipeline):
    root = fixture_pipeline("diamond")
    graph = build_graph(root)
    fragment = plot.html(graph)
    assert plot.svg(graph) in fragment
    assert "<script" not in fragment and "<link" not in fragment and "@import" not in fragment
    urls = set(re.findall(r"https?://[^\s\"']+", fragment))
    assert urls == {"http://www.w3.org/2000/svg"}  # a namespace name, never fetched
    assert nbflow.Pipeline(root)._repr_html_() == fragment


def every_status_result(graph) -> RunResult:
    steps = {"a": StepResult("a", StepStatus.SUCCEEDED, 1, 1.5),
             "b": StepResult("b", StepStatus.FAILED, 2, 0.2, error=StepError("exception", "KeyError", "'x'", cell=3)),
             "c": StepResult("c", StepStatus.RUNNING, 1),
             "d": StepResult("d", StepStatus.NOT_RUN),
             "sub/e": StepResult("sub/e", StepStatus.SKIPPED)}
    return RunResult("r1", str(graph.root), RunStatus.FAILED, steps, 0.0, 2.0)


def test_steps_are_coloured_by_status_with_a_legend(fixture_pipeline):
    graph = build_graph(fixture_pipeline("diamond"))
    result = every_status_result(graph)
    text = plot.svg(graph, result)
    boxes = step_groups(text)
    for name, step in result.steps.items():
        rect = boxes[name].find(f"{SVG}rect")
        style = plot.STATUS_STYLES[step.status.value]
        assert (rect.get("fill"), rect.get("stroke")) == (style.fill, style.stroke), name
    assert boxes["d"].find(f"{SVG}rect").get("stroke-dasharray")
    assert boxes["a"].find(f"{SVG}rect").get("stroke-dasharray") is None
    assert boxes["c"].find(f"{SVG}rect").find(f"{SVG}animate") is not None  # running: the border pulses
    failed_texts = [t.text for t in boxes["b"].iter(f"{SVG}text")]
    assert failed_texts == ["b", "failed · cell 3 · 2 attempts"]
    assert "KeyError" in boxes["b"].find(f"{SVG}title").text
    legend = [g for g in ET.fromstring(text).iter(f"{SVG}g") if g.get("class") == "nbflow-legend"]
    labels = [t.text for t in legend[0].iter(f"{SVG}text")]
    assert labels == ["running 1", "succeeded 1", "skipped (fresh) 1", "failed 1", "not run 1"]
    assert "legend" not in plot.svg(graph)  # no run, no legend


def test_any_object_with_step_statuses_will_do(fixture_pipeline):
    graph = build_graph(fixture_pipeline("diamond"))
    result = SimpleNamespace(steps={"a": SimpleNamespace(status="cancelled"), "b": SimpleNamespace(status="pending")})
    boxes = step_groups(plot.svg(graph, result))
    assert boxes["a"].find(f"{SVG}rect").get("fill") == plot.STATUS_STYLES["cancelled"].fill
    assert boxes["b"].find(f"{SVG}rect").get("fill") == plot.STATUS_STYLES["pending"].fill
    assert "not part of this run" in boxes["d"].find(f"{SVG}title").text
    assert "class a cancelled" in plot.mermaid(graph, result)


def test_links_make_boxes_clickable(fixture_pipeline):
    graph = build_graph(fixture_pipeline("diamond"))
    text = plot.svg(graph, links={"a": "#step-a", "b": "runs/x/b.ipynb"})
    anchors = {a.get("href"): a.get("target") for a in ET.fromstring(text).iter(f"{SVG}a")}
    assert anchors == {"#step-a": None, "runs/x/b.ipynb": "_blank"}


def test_png_is_drawn_without_system_libraries(fixture_pipeline, tmp_path):
    pytest.importorskip("matplotlib")
    graph = build_graph(fixture_pipeline("diamond"))
    out = tmp_path / "dag.png"
    returned = plot.write(graph, out, every_status_result(graph))
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert returned.startswith("<svg")


def test_no_steps_still_gives_a_valid_picture(tmp_path):
    text = plot.svg(build_graph(tmp_path))
    assert "no steps" in "".join(ET.fromstring(text).itertext())


def boxes_overlap(a, b) -> bool:
    return (abs(a.x - b.x) * 2 < a.width + b.width) and (abs(a.y - b.y) * 2 < a.height + b.height)


def test_layout_flows_left_to_right_without_overlaps(tmp_path, notebook_factory):
    names = [f"s{i}" for i in range(14)]
    extra = {"s5": ["s1"], "s9": ["s2", "s6"], "s13": ["s3"], "s11": ["s4"]}
    chain(tmp_path, names, notebook_factory, extra)
    graph = build_graph(tmp_path)
    lay = plot.layout(graph, {n: (n, "") for n in graph.order})
    real = [b for k, b in lay.boxes.items() if isinstance(k, str)]
    assert len(real) == 14
    for i, a in enumerate(real):
        for b in real[i + 1:]:
            assert not boxes_overlap(a, b), (a.key, b.key)
    for u, v in edges_of(graph):
        assert lay.boxes[u].x < lay.boxes[v].x  # every edge points right
    # long edges bend around the steps in between instead of crossing them
    for chain_ in lay.edges.values():
        for dummy in chain_[1:-1]:
            assert not any(boxes_overlap(lay.boxes[dummy], b) for b in real)


def test_diamond_is_drawn_without_crossings(fixture_pipeline):
    graph = build_graph(fixture_pipeline("diamond"))
    lay = plot.layout(graph, {n: (n, "") for n in graph.order})
    rows: dict[int, list] = {}
    for key, box in sorted(lay.boxes.items(), key=lambda kv: kv[1].y):
        rows.setdefault(box.layer, []).append(key)
    succ: dict = {}
    for path in lay.edges.values():
        for a, b in zip(path, path[1:]):
            succ.setdefault(a, []).append(b)
    layers = [rows[i] for i in sorted(rows)]
    assert sum(plot._crossings(layers[i], layers[i + 1], succ) for i in range(len(layers) - 1)) == 0


def test_the_same_graph_gives_the_same_picture_in_every_process(fixture_pipeline):
    root = fixture_pipeline("diamond")
    code = ("from nbflow.graph import build_graph; from nbflow.ui import plot; "
            f"print(plot.svg(build_graph({str(root)!r})))")
    outputs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2", "3")}
    assert len(outputs) == 1


def test_importing_nbflow_and_plotting_svg_loads_no_heavy_library(fixture_pipeline):
    root = fixture_pipeline("diamond")
    code = ("import sys; from nbflow.graph import build_graph; from nbflow.ui import plot; "
            f"plot.svg(build_graph({str(root)!r})); "
            "print(sorted(m for m in ('matplotlib', 'rich', 'graphviz', 'croniter', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"

