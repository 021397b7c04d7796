"""Parameter grids (DESIGN s.8): instances, partition folders, fan-in, left-behind outputs, values.

tests/notebooks/grid/: prep -> train (gridded: scale x power, 6 instances) -> summary (reads metrics/),
and `other`, independent of them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import nbflow
from nbflow.graph import build_graph
from nbflow.grid import (folded, format_value, injected_outputs, instance_name, parse_selection, partitioned,
                         value_problem)

INSTANCES = [f"train[scale={s},power={p}]" for s in ("0.5", "2.0") for p in (1, 2, 3)]


def nbflow_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nbflow.cli", *args], capture_output=True, text=True, timeout=300)


def statuses(proc: subprocess.CompletedProcess) -> dict[str, str]:
    assert proc.returncode in (0, 1), proc.stderr
    return {s["name"]: s["status"] for s in json.loads(proc.stdout)["steps"]}


def states(root: Path, **kwargs) -> dict[str, tuple[str, tuple[str, ...]]]:
    return {s.name: (s.state, s.reasons) for s in nbflow.Pipeline(root, **kwargs).status()}


def run(root: Path, *steps: str, **kwargs) -> nbflow.RunResult:
    result = nbflow.run(root, steps, display=False, **kwargs)
    assert isinstance(result, nbflow.RunResult)
    return result


def injected_cell(root: Path, notebook: str) -> str:
    cells = json.loads((root / notebook).read_text())["cells"]
    return next("".join(c["source"]) for c in cells if "injected-parameters" in c["metadata"].get("tags", []))


# -- names and paths --------------------------------------------------------------------------

def test_values_are_written_as_yaml_writes_them_in_names_and_partition_folders():
    assert [format_value(v) for v in (0.1, 1.0, 1e-05, 3, True, False, "ridge")] == [
        "0.1", "1.0", "1e-05", "3", "true", "false", "ridge"]
    pairs = (("alpha", 0.1), ("seed", 1))
    assert instance_name("train", pairs) == "train[alpha=0.1,seed=1]"
    assert instance_name("etl/fit", (("model", "ridge"),)) == "etl/fit[model=ridge]"
    assert partitioned("metrics/scores.parquet", pairs) == "metrics/alpha=0.1/seed=1/scores.parquet"
    assert partitioned("../data/m.csv", pairs) == "../data/alpha=0.1/seed=1/m.csv"
    assert partitioned("parts/", pairs) == "parts/alpha=0.1/seed=1/"  # a folder output: partitions at its end
    assert partitioned("scores.csv", pairs) == "alpha=0.1/seed=1/scores.csv"
    assert parse_selection("train[seed=1, alpha=0.1]") == ("train", {"seed": "1", "alpha": "0.1"})
    assert parse_selection("train") is None and parse_selection("train[x]") is None


def test_values_that_cannot_be_a_path_segment_or_an_instance_name_are_named():
    assert value_problem("ridge") is None and value_problem(0.5) is None and value_problem(True) is None
    for value, why in [("a/b", "'/'"), ("a=b", "'='"), ("line\nbreak", r"\n"), ("a,b", "','"), ("[x]", "'['"),
                       ("", "empty"), (" x", "space"), (None, "not a string"), ([1, 2], "not a string")]:
        problem = value_problem(value)
        assert problem is not None and why in problem, (value, problem)


def test_instances_of_one_grid_fold_in_sentences():
    assert folded(["prep", *INSTANCES]) == ["prep", "train (6 instances)"]
    assert folded(INSTANCES[:2]) == INSTANCES[:2]  # two are named


def test_a_gridded_step_becomes_its_instances_right_after_reading(fixture_pipeline):
    graph = build_graph(fixture_pipeline("grid"))
    assert list(graph.grids) == ["train"] and list(graph.grids["train"].instances) == INSTANCES
    assert [n for n in graph.order if n.startswith("train")] == INSTANCES  # the grid's order, not the alphabet
    assert "train" not in graph.steps and graph.upstream["summary"] == tuple(sorted(INSTANCES))
    step = graph.steps["train[scale=2.0,power=3]"]
    assert step.instance_of == "train" and step.grid == (("scale", 2.0), ("power", 3))
    assert step.outputs == {"scores": ("metrics/scale=2.0/power=3/scores.parquet",)}
    assert injected_outputs(step) == {"scores": "metrics/scale=2.0/power=3/scores.parquet"}
    assert graph.grids["train"].step.outputs == {"scores": ("metrics/scores.parquet",)}  # as the notebook says
    assert graph.resolve_name("train") == INSTANCES
    assert graph.resolve_name("train[power=3]") == [INSTANCES[2], INSTANCES[5]]
    assert graph.resolve_name("train[power=3, scale=0.5]") == [INSTANCES[2]]
    assert graph.resolve_name("train[power=4]") is None


def test_outputs_declared_as_a_list_keep_their_shape(tmp_path, notebook_factory):
    notebook_factory(tmp_path / "fit.ipynb", 'outputs = {"both": ["m/a.csv", "m/b.csv"], "one": "m/c.csv"}\nk = 1',
                     "pass")
    (tmp_path / "nbflow.yaml").write_text("steps:\n  fit:\n    grid: {k: [1, 2]}\n")
    step = build_graph(tmp_path).steps["fit[k=2]"]
    assert injected_outputs(step) == {"both": ["m/k=2/a.csv", "m/k=2/b.csv"], "one": "m/k=2/c.csv"}


# -- running a grid ------------------------------------------------------------------------------

@pytest.mark.slow
def test_each_instance_writes_its_partition_and_the_fan_in_reads_them_all(fixture_pipeline):
    root = fixture_pipeline("grid")
    source = (root / "train.ipynb").read_bytes()
    first = nbflow_cli("run", str(root), "-j", "2", "--json")
    assert statuses(first) == {"prep": "succeeded", **dict.fromkeys(INSTANCES, "succeeded"),
                               "summary": "succeeded", "other": "succeeded"}, first.stderr
    for name in INSTANCES:
        scale, power = (v.split("=")[1] for v in name[6:-1].split(","))
        path = root / "metrics" / f"scale={scale}" / f"power={power}" / "scores.parquet"
        assert pd.read_parquet(path)["total"].item() == float(scale) * sum(x ** int(power) for x in range(1, 11))
    assert not (root / "metrics" / "scores.parquet").exists()  # the notebook's own path is never written
    table = pd.read_csv(root / "summary.csv")
    assert list(table.columns) == ["total", "scale", "power"] and len(table) == 6
    assert table.iloc[-1].tolist() == [2.0 * 3025, 2.0, 3]

    # the instance's injected-parameters cell: its grid values and its own outputs, relative paths
    run_id = json.loads(first.stdout)["run_id"]
    assert injected_cell(root, f"_nbflow/runs/{run_id}/train[scale=0.5,power=2].ipynb") == (
        "# Parameters\nscale = 0.5\npower = 2\noutputs = {'scores': 'metrics/scale=0.5/power=2/scores.parquet'}\n")
    assert (root / "train.ipynb").read_bytes() == source  # the source notebook is never modified

    assert set(statuses(nbflow_cli("run", str(root), "--json")).values()) == {"skipped"}
    status = json.loads(nbflow_cli("status", str(root), "--json").stdout)
    rows = {s["name"]: s for s in status["steps"]}
    assert rows[INSTANCES[0]]["outputs"] == ["metrics/scale=0.5/power=1/scores.parquet", "value total"]
    assert rows["summary"]["upstream"] == sorted(INSTANCES) and status["left_behind"] == []
    lineage = nbflow_cli("lineage", str(root), str(root / "metrics/scale=2.0/power=1/scores.parquet"), "--json")
    made = json.loads(lineage.stdout)
    assert made["step"] == "train[scale=2.0,power=1]" and made["parameters"]["scale"] == 2.0


@pytest.mark.slow
def test_the_notebook_run_by_hand_keeps_its_defaults_and_plain_paths(fixture_pipeline):
    import nbformat
    from nbclient import NotebookClient

    root = fixture_pipeline("grid")
    assert run(root, "prep").ok
    nb = nbformat.read(root / "train.ipynb", as_version=4)
    NotebookClient(nb, kernel_name="python3", resources={"metadata": {"path": str(root)}}).execute()
    assert pd.read_parquet(root / "metrics" / "scores.parquet")["total"].item() == 55.0  # scale 1.0, power 1
    # the pipeline never reads or overwrites it, and status says it lies where the instances write
    left = nbflow.Pipeline(root).left_behind()
    assert left == [{"step": "train", "path": "metrics/scores.parquet",
                     "why": "train.ipynb's own output path, written by a run by hand? its instances write "
                            "partition folders"}]


@pytest.mark.slow
def test_adding_a_value_reruns_only_the_new_instances_and_removing_one_leaves_outputs_behind(fixture_pipeline):
    root = fixture_pipeline("grid")
    assert run(root, jobs=2).ok
    config = root / "nbflow.yaml"
    config.write_text(config.read_text().replace("scale: [0.5, 2.0]", "scale: [0.5, 2.0, 3.0]"))
    now = states(root)
    new = [f"train[scale=3.0,power={p}]" for p in (1, 2, 3)]
    assert {n for n, (s, _) in now.items() if s == "stale"} == {*new, "summary"}
    assert now[new[0]] == ("stale", ("never run",))
    assert now["summary"][1][-1] == "upstream train (3 instances) reruns"
    result = run(root, jobs=2)
    assert {n for n, s in result.steps.items() if s.status == "succeeded"} == {*new, "summary"}
    assert len(pd.read_csv(root / "summary.csv")) == 9

    config.write_text(config.read_text().replace("scale: [0.5, 2.0, 3.0]", "scale: [2.0, 3.0]"))
    pipeline = nbflow.Pipeline(root)
    assert pipeline.left_behind() == [{"step": "train", "path": "metrics/scale=0.5/",
                                       "why": "no longer in the grid of train"}]
    proc = nbflow_cli("status", str(root))
    assert "left behind (1; kept until `nbflow clean" in proc.stdout and "metrics/scale=0.5/" in proc.stdout
    assert (root / "metrics" / "scale=0.5" / "power=1" / "scores.parquet").exists()  # never deleted silently
    assert run(root, "train").ok and (root / "metrics" / "scale=0.5").is_dir()  # nor by a run

    assert "--left-behind" in nbflow_cli("clean", "--help").stdout
    cleaned = nbflow_cli("clean", str(root), "--left-behind")
    assert cleaned.returncode == 0, cleaned.stderr
    assert cleaned.stdout.splitlines()[:2] == ["removed 1 left-behind output(s):",
                                               "  metrics/scale=0.5/  (no longer in the grid of train)"]
    assert not (root / "metrics" / "scale=0.5").exists() and (root / "_nbflow" / "runs").is_dir()
    reasons = states(root)["summary"][1]
    assert reasons[0] == ("input metrics/ changed: scale=0.5/power=1/scores.parquet removed, "
                          "scale=0.5/power=2/scores.parquet removed, scale=0.5/power=3/scores.parquet removed")
    assert reasons[1:] == tuple(f"input value total of train[scale=0.5,power={p}] removed" for p in (1, 2, 3))
    assert run(root).ok and len(pd.read_csv(root / "summary.csv")) == 6


@pytest.mark.slow
def test_one_instance_or_a_slice_of_the_grid_selected_by_name(fixture_pipeline):
    root = fixture_pipeline("grid")
    one = statuses(nbflow_cli("run", str(root), "train[scale=2.0,power=3]", "--json"))
    assert one == {"prep": "succeeded", "train[scale=2.0,power=3]": "succeeded"}
    some = statuses(nbflow_cli("run", str(root), "train[power=3]", "--json"))
    assert some == {"prep": "skipped", "train[scale=0.5,power=3]": "succeeded", "train[scale=2.0,power=3]": "skipped"}
    every = statuses(nbflow_cli("run", str(root), "train", "--only", "--force", "--json"))
    assert every == dict.fromkeys(INSTANCES, "succeeded")
    bad = nbflow_cli("run", str(root), "train[power=4]", "trian")
    assert bad.returncode == 2
    assert "no instance of 'train' matches 'train[power=4]': power is one of 1, 2, 3" in bad.stderr
    assert "no step named 'trian' (did you mean 'train'?); steps: other, prep, train[…], summary" in bad.stderr


@pytest.mark.slow
def test_a_failing_instance_stops_only_the_fan_in_and_keeps_its_retries(fixture_pipeline):
    root = fixture_pipeline("grid")
    config = root / "nbflow.yaml"
    config.write_text(config.read_text() + "    retries: 1\n    retry_delay: 0\n")
    result = run(root, grid={"train": {"scale": [-1.0, 1.0], "power": [1]}}, jobs=2)
    bad = result.steps["train[scale=-1.0,power=1]"]
    assert bad.status == "failed" and bad.attempts == 2 and bad.error.ename == "ValueError"
    assert result.steps["train[scale=1.0,power=1]"].status == "succeeded"
    assert result.steps["other"].status == "succeeded" and result.steps["summary"].status == "not_run"
    shown = nbflow.show(root)
    assert [(s["step"], s["attempt"], s["status"]) for s in shown["steps"] if "-1.0" in s["step"]] == [
        ("train[scale=-1.0,power=1]", 1, "failed"), ("train[scale=-1.0,power=1]", 2, "failed")]
    again = states(root, grid={"train": {"scale": [-1.0, 1.0], "power": [1]}})
    assert again["train[scale=-1.0,power=1]"][1][0].startswith("last run failed")
    assert again["train[scale=1.0,power=1]"] == ("fresh", ())


@pytest.mark.slow
def test_values_published_by_a_gridded_step_reach_the_consumer_as_one_row_per_instance(fixture_pipeline):
    root = fixture_pipeline("grid")
    result = run(root, "summary", grid={"train": {"scale": [1.0], "power": [1, 2]}})
    assert result.ok, result.to_json()
    cell = injected_cell(root, result.steps["summary"].notebook)
    assert cell == ("# Parameters\ntotal = __import__(\"nbflow\").load_value('_nbflow/values/total.grid', "
                    "grid=[{'scale': 1.0, 'power': 1}, {'scale': 1.0, 'power': 2}])\n")
    total = nbflow.load_value(root / "_nbflow/values/total.grid", grid=[{"scale": 1.0, "power": 1},
                                                                       {"scale": 1.0, "power": 2}])
    assert total.to_dict("records") == [{"scale": 1.0, "power": 1, "total": 55.0},
                                        {"scale": 1.0, "power": 2, "total": 385.0}]


# -- what is refused before any kernel starts ---------------------------------------------------------

def test_every_bad_grid_is_reported_at_once_naming_the_file_the_step_and_the_key(fixture_pipeline):
    root = fixture_pipeline("grid")
    (root / "nbflow.yaml").write_text(
        "steps:\n"
        "  train:\n"
        "    grid:\n"
        "      scal: [1.0]\n"
        "      power: []\n"
        "  prep:\n"
        "    grid:\n"
        '      n: [1, 2, 2, "a/b", "x=1", "two\\nlines"]\n'
        "  other:\n"
        "    grid: {}\n")
    proc = nbflow_cli("run", str(root), "--json")
    assert proc.returncode == 2
    problems = {(p["line"], p["step"], p["message"]) for p in json.loads(proc.stdout)["problems"]}
    assert problems == {
        (4, "train", "'steps.train.grid.scal': step 'train' has no parameter 'scal' (did you mean 'scale'?)"),
        (5, "train", "'steps.train.grid.power': the list of values of 'power' is empty: a grid needs at least "
                     "one value per key"),
        (8, "prep", "'steps.prep.grid.n': value 2 is listed twice"),
        *((8, "prep", f"'steps.prep.grid.n': value {shown} contains {char}, which cannot be part of a partition "
                      "folder `key=value` or of an instance name `step[key=value,...]`")
          for shown, char in (("'a/b'", "'/'"), ("'x=1'", "'='"), ("'two\\nlines'", "\\n"))),
        (10, "other", "'steps.other.grid': a grid maps parameters of the step to lists of values, e.g. "
                      "{alpha: [0.1, 1.0]}"),
    }
    assert all(p["file"] == "nbflow.yaml" for p in json.loads(proc.stdout)["problems"])
    assert not (root / "_nbflow").exists()  # refused before anything started


def test_values_that_cannot_name_a_folder_and_p_on_a_gridded_parameter_are_errors(fixture_pipeline):
    root = fixture_pipeline("grid")
    (root / "nbflow.yaml").write_text("steps:\n  train:\n    grid:\n      scale: [1.0, 2.0]\n      power: [1]\n")
    with pytest.raises(nbflow.PipelineError) as err:
        nbflow.run(root, grid={"prep": {"n": ["a/b", 3, "x=1", "two\nlines", "txt"]}}, display=False)
    assert [(p.file, p.step, p.message) for p in err.value.problems] == [(None, "prep", m) for m in [
        "grid['prep']['n']: value 'a/b' contains '/', which cannot be part of a partition folder `key=value` or of "
        "an instance name `step[key=value,...]`",
        "grid['prep']['n']: value 'x=1' contains '=', which cannot be part of a partition folder `key=value` or of "
        "an instance name `step[key=value,...]`",
        "grid['prep']['n']: value 'two\\nlines' contains \\n, which cannot be part of a partition folder "
        "`key=value` or of an instance name `step[key=value,...]`",
        "grid['prep']['n']: value 'txt' is not int like the default 10 in prep.ipynb"]]
    assert not (root / "_nbflow").exists()
    with pytest.raises(nbflow.PipelineError) as err:
        nbflow.Pipeline(root, grid={"trian": {"scale": [1.0]}, "train": {"scale": range(2), "power": 3}})
    assert [str(p) for p in err.value.problems] == [
        "grid['trian']: no step named 'trian' (did you mean 'train'?)",
        "grid['train']['power']: the values of 'power' must be a list, e.g. [3]"]  # a range is a list of ints

    proc = nbflow_cli("run", str(root), "-p", "power=2", "-p", "train.scale=3", "-p", "n=3")
    assert proc.returncode == 2 and "2 problems:" in proc.stderr
    assert ("nbflow.yaml:5: -p power: 'power' of step 'train' takes its values from the grid "
            "('steps.train.grid.power' in nbflow.yaml: 1); change the grid, or run one instance: nbflow run "
            "PIPELINE \"train[scale=1.0,power=1]\"") in proc.stderr
    assert ("nbflow.yaml:4: -p train.scale: 'scale' of step 'train' takes its values from the grid "
            "('steps.train.grid.scale' in nbflow.yaml: 1.0, 2.0)") in proc.stderr


def test_reading_the_plain_path_of_a_gridded_output_is_an_error_naming_the_folder(fixture_pipeline,
                                                                                 notebook_factory):
    root = fixture_pipeline("grid")
    notebook_factory(root / "best.ipynb", 'inputs = {"scores": "metrics/scores.parquet"}\noutputs = {}', "pass")
    with pytest.raises(nbflow.PipelineError) as err:
        build_graph(root)
    [problem] = err.value.problems
    assert problem.file == "best.ipynb" and problem.step == "best"
    assert problem.message == (
        "reads metrics/scores.parquet, the output path of gridded step 'train' as its notebook declares it, but "
        "each instance writes its own file under partition folders (metrics/scale=0.5/power=1/scores.parquet, "
        "...); read them all as a folder input ending in '/': inputs = {'scores': \"metrics/\"}")


def test_a_folder_output_of_a_gridded_step_gets_its_partitions_at_its_end(tmp_path, notebook_factory):
    notebook_factory(tmp_path / "split.ipynb", 'outputs = {"parts": "parts/"}\nshard = 0',
                     "import os\nos.makedirs(outputs['parts'], exist_ok=True)\n"
                     "for i in range(2):\n    open(os.path.join(outputs['parts'], f'{i}.txt'), 'w').write(str(shard))")
    notebook_factory(tmp_path / "count.ipynb", 'inputs = {"parts": "parts/"}\noutputs = {"n": "n.txt"}',
                     "import os\nn = sum(len(files) for _, _, files in os.walk(inputs['parts']))\n"
                     "open(outputs['n'], 'w').write(str(n))")
    (tmp_path / "nbflow.yaml").write_text("steps:\n  split:\n    grid: {shard: [1, 2, 3]}\n")
    result = run(tmp_path)
    assert result.ok, result.to_json()
    assert (tmp_path / "n.txt").read_text() == "6"
    assert (tmp_path / "parts" / "shard=2" / "1.txt").read_text() == "2"
    (tmp_path / "parts" / "shard=2" / "1.txt").write_text("edited")  # a folder output is checked as a whole
    assert states(tmp_path)["split[shard=2]"] == ("stale", ("output parts/shard=2/ changed since it was made",))


def test_a_folder_input_depends_on_every_instance_writing_inside_it(fixture_pipeline):
    graph = build_graph(fixture_pipeline("grid"))
    assert set(graph.upstream["summary"]) == set(INSTANCES)
    assert graph.source_inputs("summary") == []  # made by the instances: not source data
    assert os.path.basename(str(graph.inputs_of("summary")[0].path)) == "metrics"
