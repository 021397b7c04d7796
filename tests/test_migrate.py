"""`nbflow import ploomber`: a Ploomber project converted and run; what cannot be converted is listed.

The Ploomber projects are files in tests/notebooks/ploomber_*/ (Ploomber's own format, built by hand;
Ploomber itself is not needed).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import nbflow
from conftest import FIXTURES
from nbflow.errors import CommandError, PipelineError
from nbflow.graph import build_graph
from nbflow.migrate import import_ploomber

# integration: runs with the full suite (`pytest -m "slow or not slow"`, what CI runs)
pytestmark = pytest.mark.slow

NBFLOW = [sys.executable, "-m", "nbflow.cli"]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*NBFLOW, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "NO_COLOR": "1"})


def digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def code_cells(path: Path) -> list[str]:
    cells = json.loads(path.read_text())["cells"]
    return ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]


def test_a_ploomber_project_converted_by_the_cli_runs_then_is_fresh(tmp_path):
    project = FIXTURES / "ploomber_project"
    before = digest(project)
    out = tmp_path / "converted"

    proc = cli("import", "ploomber", str(project / "pipeline.yaml"), "-o", str(out))

    assert proc.returncode == 0, proc.stderr
    assert "converted 4 Ploomber task(s)" in proc.stdout and "everything was converted" in proc.stdout
    assert digest(project) == before  # the Ploomber project is never modified
    # one notebook per task; the project's other files (data, the function's module) at the same places
    assert sorted(digest(out)) == [".gitignore", "data/weather.csv", "load.ipynb", "monthly.ipynb", "summary.ipynb",
                                   "tasks.py", "wettest.ipynb"]
    pipeline = nbflow.Pipeline(out)
    assert pipeline.graph == {"load": [], "monthly": ["load"], "wettest": ["load"], "summary": ["monthly", "wettest"]}
    steps = pipeline.steps
    # the nb product is dropped; a file the code names is declared, so editing it reruns the step
    assert steps["load"].inputs == {"weather": ("data/weather.csv",)}
    assert steps["load"].outputs == {"data": ("output/weather.csv",)}
    assert steps["load"].parameters["min_year"].default == 2013  # params: from pipeline.yaml
    assert steps["monthly"].inputs == {"load_data": ("output/weather.csv",)}  # upstream['load']['data']
    assert steps["wettest"].inputs == {"load_data": ("output/weather.csv",)}
    assert steps["wettest"].outputs == {"wettest": ("output/wettest.csv",)}
    assert steps["summary"].inputs == {"monthly_table": ("output/monthly/precipitation.csv",),
                                       "wettest": ("output/wettest.csv",)}  # a single product: upstream['wettest']
    assert steps["summary"].parameters["title"].default == "Seattle"
    # the code reads inputs/outputs, in the quotes it used (an f-string keeps working)
    summary = "\n".join(code_cells(out / "summary.ipynb"))
    assert 'pd.read_csv(inputs["monthly_table"])' in summary and "pd.read_csv(inputs['wettest'])" in summary
    assert 'open(outputs["report"], "w")' in summary and "print(f\"wrote {outputs['report']}\")" in summary
    assert "df.to_csv(outputs[\"data\"], index=False)" in code_cells(out / "load.ipynb")[-1]
    assert code_cells(out / "wettest.ipynb")[-1] == (
        'from tasks import wettest\n\n'
        'wettest(product=outputs["wettest"], upstream={"load": {"data": inputs["load_data"]}})')
    for name in steps:
        for source in code_cells(out / f"{name}.ipynb"):
            code = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith("#"))
            assert "upstream[" not in code and "product[" not in code, (name, source)

    result = nbflow.run(out, display=False)
    assert result.ok, {n: (s.status, s.error) for n, s in result.steps.items()}
    assert {n: s.status.value for n, s in result.steps.items()} == dict.fromkeys(steps, "succeeded")
    # what `ploomber build` of the same project writes (checked against Ploomber 0.23 by hand)
    assert json.loads((out / "output/summary.json").read_text()) == {
        "title": "Seattle", "months": 4, "total_mm": 61.4, "wettest_day": "2014-04-12"}
    assert not (project / "output").exists()

    again = nbflow.run(out, display=False)
    assert {n: s.status.value for n, s in again.steps.items()} == dict.fromkeys(steps, "skipped")
    # as with Ploomber, editing the function task's code reruns it (and what reads its product)
    with (out / "tasks.py").open("a") as f:
        f.write("# edited\n")
    stale = {s.name: s.reasons for s in nbflow.Pipeline(out).status() if s.state == "stale"}
    assert list(stale) == ["wettest", "summary"] and "tasks.py" in stale["wettest"][0]


def test_a_ploomber_project_run_unconverted_gets_the_hint_not_failing_steps(fixture_pipeline):
    root = fixture_pipeline("ploomber_project")
    with pytest.raises(PipelineError) as caught:
        build_graph(root)
    problems = caught.value.problems
    assert sorted(p.file for p in problems) == ["monthly.ipynb", "scripts/load.py", "scripts/summary.py"]
    for p in problems:
        assert "looks like a Ploomber task" in p.message
        assert "`nbflow import ploomber pipeline.yaml`" in p.message

    proc = cli("run", str(root))
    assert proc.returncode == 2 and proc.stderr.count("looks like a Ploomber task") == 3
    assert not (root / "_nbflow").exists()  # no step ran


def test_a_notebook_with_ordinary_parameters_named_like_ploombers_is_a_step(tmp_path, notebook_factory):
    notebook_factory(tmp_path / "a.ipynb", 'outputs = {"x": "x.txt"}\nupstream = None\nproduct = "shoes"',
                     "open(outputs['x'], 'w').write(product)")
    assert list(build_graph(tmp_path).steps) == ["a"]


def test_what_cannot_be_converted_is_listed_never_dropped(tmp_path):
    project = FIXTURES / "ploomber_unconvertible"
    before = digest(project)

    proc = cli("import", "ploomber", str(project), "-o", str(tmp_path / "out"), "--json")

    assert proc.returncode == 0, proc.stderr
    done = json.loads(proc.stdout)
    assert list(done) == ["pipeline", "out", "steps", "unconverted", "notes", "copied", "config"]
    assert [s["name"] for s in done["steps"]] == ["fit", "plot"]
    messages = [(i["task"], i["message"]) for i in done["unconverted"]]
    expected = [
        (None, "clients: database and storage clients are not converted"),
        (None, "on_finish: the hook is not converted"),
        ("create_table", "sql/create_table.sql is an SQL task"),
        ("create_table", "product ['clean', 'table'] is a database relation"),
        ("dump", "function tasks.dump has a serializer"),
        ("missing", "no top-level `def missing` in tasks.py"),
        ("fit", "{{git}} has no value at conversion (Ploomber fills it in when it builds)"),
        ("fit", "grid is a list of 2 grids"),
        ("fit", "on_failure: task hooks are not converted"),
        ("fit", "upstream 'create_table' writes no file"),
        ("fit", "upstream 'plto' is not a task of pipeline.yaml (did you mean 'plot'?)"),
        ("fit", "`upstream[name]` is not rewritten"),
        ("fit", '`product["nb"]` is the executed notebook'),
        ("plot", "`upstream` in the parameters cell is not a literal list of task names"),
        ("plot", "`upstream[\"fit\"]`: 'fit' is not an upstream task of this one"),
        ("plot", "the cell is not valid Python (a cell magic?)"),
    ]
    for task, fragment in expected:
        assert any(t == task and fragment in m for t, m in messages), (task, fragment, messages)
    assert len(messages) == len(expected)
    where = {i["message"][:30]: (i["file"], i["cell"], i["line"]) for i in done["unconverted"]}
    assert where["`upstream[name]` is not rewrit"] == ("fit.ipynb", 3, 4)  # the cell and line in the new notebook
    # env.yaml's value is the parameter's default; {{root}} is the project folder, made relative
    params = code_cells(tmp_path / "out" / "fit.ipynb")[0]
    assert "sample = 0.25\n" in params and 'outputs = {"model": "output/model-{{git}}.pickle"}' in params
    assert digest(project) == before
    # the text form lists the same
    text = cli("import", "ploomber", str(project), "-o", str(tmp_path / "again"))
    assert f"could not convert ({len(expected)})" in text.stdout
    assert "task fit, fit.ipynb cell 3 line 4: `upstream[name]` is not rewritten" in text.stdout


def test_a_grid_goes_to_nbflow_yaml_and_its_outputs_to_partition_folders(tmp_path):
    out = tmp_path / "out"
    done = import_ploomber(FIXTURES / "ploomber_grid" / "pipeline.yaml", out)

    assert yaml.safe_load((out / "nbflow.yaml").read_text()) == {
        "steps": {"fit": {"grid": {"alpha": [0.1, 1.0], "seed": [1, 2, 3]}}}}
    steps = {s.name: s for s in done.steps}
    assert steps["fit"].task == "fit-[[alpha]]-[[seed]]" and steps["fit"].grid == {"alpha": [0.1, 1.0],
                                                                                    "seed": [1, 2, 3]}
    # [[placeholders]] leave the paths: each instance writes under output/metrics/alpha=.../seed=.../
    assert steps["fit"].outputs == {"metrics": "output/metrics/metrics.csv"}
    parameters = code_cells(out / "fit.ipynb")[0]
    assert parameters.endswith("alpha = 0.5\nfolds = 3\nseed = 1")  # default kept, params, a grid key added
    # a wildcard upstream reads the folder of every instance; code using it is listed, not guessed
    assert steps["compare"].inputs == {"fit_metrics": "output/metrics/"}
    [issue] = done.unconverted
    assert (issue.task, issue.file, issue.cell, issue.line) == ("compare", "compare.ipynb", 3, 3)
    assert "read the folder inputs['fit_metrics']" in issue.message
    assert any("grid written to nbflow.yaml" in n.message and "output/metrics/alpha=0.1/seed=1/metrics.csv"
               in n.message for n in done.notes)

    # the converted grid runs: one instance per (alpha, seed); the fan-in once its listed line reads the folder
    compare = json.loads((out / "compare.ipynb").read_text())
    cell = compare["cells"][issue.cell - 1]
    cell["source"] = "".join(cell["source"]).replace(
        'pd.concat(pd.read_csv(products["metrics"]) for products in upstream["fit-*"].values())',
        'pd.concat(pd.read_csv(p) for p in Path(inputs["fit_metrics"]).glob("*/*/metrics.csv"))')
    cell["source"] = "from pathlib import Path\n" + cell["source"]
    (out / "compare.ipynb").write_text(json.dumps(compare))
    result = nbflow.run(out, display=False, jobs=2)
    assert result.ok, result.to_json()
    assert sorted(n for n in result.steps if n.startswith("fit")) == sorted(
        f"fit[alpha={a},seed={s}]" for a in (0.1, 1.0) for s in (1, 2, 3))
    assert (out / "output" / "metrics" / "alpha=1.0" / "seed=3" / "metrics.csv").is_file()
    best = (out / "output" / "best.csv").read_text().splitlines()
    assert best[0] == "alpha,seed,folds,score" and best[1].startswith("1.0,")


def test_parameters_cells_and_code_are_rewritten_in_place(tmp_path, notebook_factory):
    project = tmp_path / "project"
    (project / "pipeline.yaml").parent.mkdir()
    (project / "pipeline.yaml").write_text(
        "tasks:\n"
        "  - {source: raw.ipynb, product: {nb: out/raw.ipynb, data: out/raw.csv, meta: out/meta.json}}\n"
        "  - source: nested/use.py\n"
        "    local_execution: true\n"
        "    product: {nb: out/use.html, result: out/result.txt}\n"
        "    params: {path: '{{here}}/out', when: 2024-01-02, resources_: {cfg: config.json}}\n")
    (project / "config.json").write_text("{}")
    notebook_factory(project / "raw.ipynb",
                     "upstream = None; product = None  # injected by Ploomber\nn = 3",
                     "%matplotlib inline\nimport json\nopen(product['data'], 'w').write('a')",
                     "json.dump({'n': n}, open(product[\"meta\"], 'w'))",
                     "for product in ['x']:\n    print(product['nb'])")
    (project / "nested").mkdir()
    (project / "nested" / "use.py").write_text(
        '# %% tags=["parameters"]\nupstream = {"raw": None}\nproduct = None\npath = None\nwhen = None\n'
        "resources_ = None\n\n"
        "# %%\n"
        "text = open(upstream['raw']['data']).read()\n"
        "print(f\"{upstream['raw']['meta']} {resources_['cfg']}\")\n"
        "open(product['result'], 'w').write(text)\n")

    done = import_ploomber(project / "pipeline.yaml", tmp_path / "out")

    out = tmp_path / "out"
    raw = code_cells(out / "raw.ipynb")
    assert raw[0] == ('# converted from Ploomber: upstream[...] and product[...] are read from these\n'
                      'inputs = {}\n'
                      'outputs = {\n    "data": "out/raw.csv",\n    "meta": "out/meta.json",\n}  # injected by Ploomber\n'
                      'n = 3')
    assert raw[2] == "%matplotlib inline\nimport json\nopen(outputs['data'], 'w').write('a')"
    assert raw[3] == "json.dump({'n': n}, open(outputs[\"meta\"], 'w'))"
    assert raw[4] == "for product in ['x']:\n    print(product['nb'])"  # its own `product`: left alone
    assert [(i.task, i.cell, i.message) for i in done.unconverted] == [
        ("raw", 5, "the cell assigns its own `product`; `product[...]` in it was not rewritten")]
    # local_execution: the notebook sits where Ploomber ran it, and its paths are relative to that folder
    [use] = [s for s in done.steps if s.task == "use"]
    assert use.name == "nested/use" and use.notebook == "nested/use.ipynb"
    assert use.inputs == {"raw_data": "../out/raw.csv", "raw_meta": "../out/meta.json",
                          "resources_cfg": "../config.json"}
    assert use.outputs == {"result": "../out/result.txt"}
    assert use.parameters == {"path": "../out", "when": "2024-01-02"}  # {{here}} relative; a date as ISO text
    use_cells = code_cells(out / "nested" / "use.ipynb")
    assert use_cells[0].endswith('path = "../out"\nwhen = "2024-01-02"\nresources_ = None')
    assert use_cells[-1] == ("text = open(inputs['raw_data']).read()\n"
                             "print(f\"{inputs['raw_meta']} {inputs['resources_cfg']}\")\n"
                             "open(outputs['result'], 'w').write(text)")
    graph = build_graph(out)
    assert graph.upstream["nested/use"] == ("raw",)


def test_the_output_folder_must_be_new_or_empty_and_the_file_must_exist(tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    proc = cli("import", "ploomber", str(FIXTURES / "ploomber_project"), "-o", str(full), "--json")
    assert proc.returncode == 2 and "is not empty" in proc.stderr
    assert json.loads(proc.stdout)["exit_code"] == 2
    assert sorted(p.name for p in full.iterdir()) == ["keep.txt"]
    with pytest.raises(CommandError, match="no such file"):
        import_ploomber(tmp_path / "nowhere" / "pipeline.yaml", tmp_path / "out")
    with pytest.raises(CommandError, match="would hold the Ploomber project itself"):
        import_ploomber(FIXTURES / "ploomber_project", FIXTURES)


def test_the_default_output_folder_is_beside_the_project(fixture_pipeline):
    project = fixture_pipeline("ploomber_project")
    done = import_ploomber(project)
    assert done.out == project.parent / "ploomber_project-nbflow"
    assert (done.out / "summary.ipynb").is_file()
