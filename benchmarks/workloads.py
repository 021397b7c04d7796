"""The benchmark workloads: folders of small generated notebooks.

Owns: writing each workload's notebooks (and, for Ploomber, its
`pipeline.yaml`). Stdlib only, so it runs under any interpreter; nothing here
times or executes anything.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def _notebook(cells: list[tuple[str, str]]) -> dict:
    """cells: (source, role) with role "parameters" or "" for an ordinary code cell."""
    out = []
    for i, (source, role) in enumerate(cells):
        meta = {"tags": ["parameters"]} if role == "parameters" else {}
        out.append({"cell_type": "code", "id": f"c{i}", "metadata": meta, "execution_count": None,
                    "outputs": [], "source": source})
    return {"cells": out,
            "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                         "language_info": {"name": "python"}},
            "nbformat": 4, "nbformat_minor": 5}


def _write(path: Path, cells: list[tuple[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_notebook(cells), indent=1))
    return path


def _fresh(folder: Path) -> Path:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


def step_name(i: int) -> str:
    return f"s{i:03d}"


_WRITE = 'open(outputs["out"], "w").write("x")'


def chain(folder: Path, n: int) -> list[Path]:
    """n trivial steps, each reading the previous one's file: an nbflow pipeline, runnable by papermill too."""
    _fresh(folder)
    (folder / "data").mkdir()
    paths = []
    for i in range(n):
        inputs = f'inputs = {{"prev": "data/{step_name(i - 1)}.txt"}}\n' if i else ""
        params = inputs + f'outputs = {{"out": "data/{step_name(i)}.txt"}}'
        read = 'open(inputs["prev"]).read()\n' if i else ""
        paths.append(_write(folder / f"{step_name(i)}.ipynb", [(params, "parameters"), (read + _WRITE, "")]))
    return paths


def independent(folder: Path, n: int) -> list[Path]:
    """n trivial steps that share nothing: they can all run at once."""
    _fresh(folder)
    (folder / "data").mkdir()
    return [_write(folder / f"{step_name(i)}.ipynb",
                   [(f'outputs = {{"out": "data/{step_name(i)}.txt"}}', "parameters"), (_WRITE, "")])
            for i in range(n)]


def many_cells(folder: Path, cells: int) -> Path:
    """One step of `cells` trivial code cells (plus its parameters cell)."""
    _fresh(folder)
    body = [(f"x{i} = {i}", "") for i in range(cells - 1)]
    return _write(folder / "cells.ipynb", [("n = 1", "parameters"), *body])


def dataframe_handover(folder: Path, rows: int) -> None:
    """Two steps handing over a DataFrame with nbflow.glue / consumes, timing the hand-over from inside.

    Each kernel reads its CPU clock (time.process_time: robust on a busy
    machine) around the glue cell, around the injected-parameters cell that
    loads the value, and around a trivial cell (what one cell costs anyway),
    and writes the numbers to timings-<step>.json. pandas is imported before,
    as any step handing over a DataFrame has done.
    """
    _fresh(folder)
    frame = handover_frame_code(rows)
    _write(folder / "produce.ipynb", [
        ('publishes = ["frame"]', "parameters"),
        (f"import json, time\nimport pandas as pd\nframe = {frame}", ""),
        ("t0 = time.process_time()", ""),
        ("1", ""),
        ("t1 = time.process_time()", ""),
        ('import nbflow\nnbflow.glue("frame", frame)', ""),
        ('t2 = time.process_time()\njson.dump({"trivial": t1 - t0, "glue": t2 - t1}, open("timings-produce.json", "w"))',
         ""),
    ])
    _write(folder / "consume.ipynb", [
        ('import json, time\nimport pandas as pd\nconsumes = ["frame"]\noutputs = {"rows": "rows.txt"}\nframe = None\n'
         "t0 = time.process_time()", "parameters"),
        # here nbflow injects `frame = load_value(...)`
        ("t1 = time.process_time()", ""),
        ("1", ""),
        ('t2 = time.process_time()\njson.dump({"load": t1 - t0, "trivial": t2 - t1}, open("timings-consume.json", "w"))\n'
         'open(outputs["rows"], "w").write(str(len(frame)))', ""),
    ])


def handover_frame_code(rows: int) -> str:
    """The frame the producer step builds, as an expression (also used by the parquet-alone baseline)."""
    return (f"pd.DataFrame({{'x': range({rows}), 'y': [float(i) for i in range({rows})],"
            f" 'name': [f'row{{i}}' for i in range({rows})]}})")


def dag(folder: Path, n: int) -> None:
    """n trivial steps; step i reads the files of steps i-1 and i-10 (a long, layered DAG)."""
    _fresh(folder)
    (folder / "data").mkdir()
    for i in range(n):
        ups = [j for j in (i - 1, i - 10) if j >= 0]
        inputs = ", ".join(f'"u{j}": "data/{step_name(j)}.txt"' for j in ups)
        params = (f"inputs = {{{inputs}}}\n" if ups else "") + f'outputs = {{"out": "data/{step_name(i)}.txt"}}'
        _write(folder / f"{step_name(i)}.ipynb", [(params, "parameters"), (_WRITE, "")])


def ploomber_chain(folder: Path, n: int) -> None:
    """The same chain for Ploomber: `upstream` / `product` in the parameters cell, a pipeline.yaml."""
    _fresh(folder)
    tasks = []
    for i in range(n):
        name = step_name(i)
        upstream = f'["{step_name(i - 1)}"]' if i else "None"
        read = f'open(upstream["{step_name(i - 1)}"]["data"]).read()\n' if i else ""
        _write(folder / f"{name}.ipynb", [(f"upstream = {upstream}\nproduct = None", "parameters"),
                                          (read + 'open(product["data"], "w").write("x")', "")])
        tasks.append(f"  - source: {name}.ipynb\n    product:\n      nb: output/{name}.ipynb\n"
                     f"      data: output/{name}.txt\n")
    (folder / "pipeline.yaml").write_text("tasks:\n" + "".join(tasks))


def papermill_notebook(folder: Path) -> Path:
    """One ordinary papermill notebook: a parameters cell (`alpha`), a few small cells that compute and print."""
    _fresh(folder)
    return _write(folder / "report.ipynb", [
        ("alpha = 0.1\nn = 1000", "parameters"),
        ("import math\nimport statistics", ""),
        ("values = [math.sin(alpha * i) for i in range(n)]", ""),
        ("mean = statistics.fmean(values)\nprint(f'mean {mean:.4f}')", ""),
        ("{'alpha': alpha, 'n': n, 'mean': mean}", ""),
    ])


_SWEEP_PARAMETERS = 'outputs = {"out": "parts/out.txt"}\na = 0\nb = 0'
_SWEEP = ('import os\nos.makedirs(os.path.dirname(outputs["out"]), exist_ok=True)\n'
          'open(outputs["out"], "w").write(f"{a} {b}")')
_GATHER = ('import os\nfound = [f for _, _, files in os.walk(inputs["parts"]) for f in files]\n'
           'open(outputs["all"], "w").write(str(len(found)))')


def grid(folder: Path, a: int, b: int) -> None:
    """A gridded step of a x b trivial instances (keys a and b, each writing parts/a=../b=../out.txt) and
    a fan-in that reads the folder parts/: an nbflow pipeline whose notebooks papermill can run too."""
    _fresh(folder)
    _write(folder / "sweep.ipynb", [(_SWEEP_PARAMETERS, "parameters"), (_SWEEP, "")])
    _write(folder / "gather.ipynb", [('inputs = {"parts": "parts/"}\noutputs = {"all": "all.txt"}', "parameters"),
                                     (_GATHER, "")])
    (folder / "nbflow.yaml").write_text(f"steps:\n  sweep:\n    grid:\n      a: {list(range(a))}\n"
                                        f"      b: {list(range(b))}\n")


def ploomber_grid(folder: Path, a: int, b: int, jobs: int) -> None:
    """The same grid for Ploomber: a task with `grid:` and a fan-in whose upstream is every instance."""
    _fresh(folder)
    _write(folder / "sweep.ipynb", [("upstream = None\nproduct = None\na = 0\nb = 0", "parameters"),
                                    ('open(product["data"], "w").write(f"{a} {b}")', "")])
    _write(folder / "gather.ipynb", [('upstream = ["sweep-*"]\nproduct = None', "parameters"),
                                     ('open(product["data"], "w").write(str(len(upstream["sweep-*"])))', "")])
    (folder / "pipeline.yaml").write_text(
        f"executor:\n  dotted_path: ploomber.executors.Parallel\n  processes: {jobs}\n"
        "tasks:\n"
        "  - source: sweep.ipynb\n    name: sweep-[[a]]-[[b]]\n"
        "    product:\n      nb: output/sweep-[[a]]-[[b]].ipynb\n      data: output/parts/a=[[a]]-b=[[b]].txt\n"
        f"    grid:\n      a: {list(range(a))}\n      b: {list(range(b))}\n"
        "  - source: gather.ipynb\n    product:\n      nb: output/gather.ipynb\n      data: output/all.txt\n")


#: The file the edited step of the watch workload writes, first thing, with the time its first cell ran.
WATCH_STAMP = "first-cell-ran-at.txt"


def watch_chain(folder: Path, n: int) -> Path:
    """A chain of n trivial steps for watch mode; returns the notebook to edit (the middle one).

    The edited step's first cell (its parameters cell) writes time.time() to WATCH_STAMP before anything else.
    """
    chain(folder, n)
    edited = folder / f"{step_name(n // 2)}.ipynb"
    nb = json.loads(edited.read_text())
    params = nb["cells"][0]
    params["source"] = (f'open({WATCH_STAMP!r}, "w").write(repr(__import__("time").time()))\n'
                        + "".join(params["source"]))
    edited.write_text(json.dumps(nb, indent=1))
    return edited


def touch_watch_notebook(path: Path, i: int) -> None:
    """Save the notebook with its last cell changed (a comment), rewriting the file in place as Jupyter does."""
    nb = json.loads(path.read_text())
    cell = nb["cells"][-1]
    cell["source"] = "".join(cell["source"]).split("\n# edit ")[0] + f"\n# edit {i}"
    with open(path, "w") as f:
        f.write(json.dumps(nb, indent=1))
