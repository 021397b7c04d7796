"""The graph: edges from paths and values, and every problem reported at once."""

from __future__ import annotations

import pytest

from nbflow.errors import PipelineError
from nbflow.graph import build_graph, resolve_parameters, secret_environment, select_steps
from nbflow.params import CliValue, EnvRef, ValueRef


def test_diamond_edges_order_and_not_steps(fixture_pipeline):
    graph = build_graph(fixture_pipeline("diamond"))
    assert graph.upstream == {"a": (), "b": ("a",), "c": ("a",), "d": ("b", "c"), "sub/e": ()}
    order = list(graph.order)
    assert order.index("a") < order.index("b") < order.index("d") and order.index("c") < order.index("d")
    assert [n.name for n in graph.not_steps] == ["driver"]
    assert graph.descendants(["a"]) == {"b", "c", "d"} and graph.ancestors(["d"]) == {"a", "b", "c"}
    assert [r.label for r in graph.source_inputs("a")] == ["data/seed.txt"]


def test_cycle_is_printed_as_a_path(fixture_pipeline):
    with pytest.raises(PipelineError) as err:
        build_graph(fixture_pipeline("cycle"))
    message = str(err.value)
    assert "cycle: " in message
    path = message.split("cycle: ")[1].split(";")[0].split(" -> ")
    assert path[0] == path[-1] and set(path) == {"x", "y", "z"}


def test_every_problem_reported_together(fixture_pipeline):
    with pytest.raises(PipelineError) as err:
        build_graph(fixture_pipeline("many_problems"))
    text = str(err.value)
    assert "broken.ipynb:1: not valid notebook JSON" in text
    assert "nonliteral.ipynb:2:" in text and "must be a literal" in text
    assert "steps 'dup1' and 'dup2' both write same.txt" in text


def test_state_folder_is_never_discovered(fixture_pipeline, notebook_factory):
    root = fixture_pipeline("diamond")
    notebook_factory(root / "_nbflow" / "runs" / "r1" / "a.ipynb", 'outputs = {"a": "zzz.txt"}')
    notebook_factory(root / ".ipynb_checkpoints" / "a-checkpoint.ipynb", 'outputs = {"a": "data/a.txt"}')
    assert "a" in build_graph(root).steps  # no duplicate step, no duplicate producer


def test_include_exclude(fixture_pipeline):
    root = fixture_pipeline("diamond")
    (root / "nbflow.yaml").write_text("exclude: ['sub/*', 'driver.ipynb']\n")
    graph = build_graph(root)
    assert "sub/e" not in graph.steps and not graph.not_steps


def test_unknown_yaml_step_and_parameter(fixture_pipeline):
    root = fixture_pipeline("diamond")
    (root / "nbflow.yaml").write_text("steps:\n  bb:\n    retries: 1\n  b:\n    parameters: {ofset: 2}\n")
    with pytest.raises(PipelineError) as err:
        build_graph(root)
    text = str(err.value)
    assert "nbflow.yaml:2: 'steps.bb' names no step (did you mean 'b'?)" in text
    assert "step 'b' has no parameter 'ofset' (did you mean 'offset'?)" in text


def test_select_steps_adds_what_they_need(fixture_pipeline):
    graph = build_graph(fixture_pipeline("diamond"))
    assert select_steps(graph, ["b"]) == ["a", "b"]
    with pytest.raises(PipelineError, match="no step named 'dd' \\(did you mean 'd'\\?\\)"):
        select_steps(graph, ["dd"])


def test_parameters_precedence_and_errors(fixture_pipeline):
    root = fixture_pipeline("diamond")
    (root / "nbflow.yaml").write_text("steps:\n  b:\n    parameters: {offset: 5}\n")
    graph = build_graph(root)
    params = resolve_parameters(graph, {"scale": CliValue("3")})
    assert params["a"] == {"scale": 3} and params["b"] == {"offset": 5} and params["c"] == {}
    assert resolve_parameters(graph, {"b.offset": CliValue("7")})["b"] == {"offset": 7}
    with pytest.raises(PipelineError) as err:
        resolve_parameters(graph, {"scal": CliValue("3"), "a.scale": CliValue("big"), "zz.q": CliValue("1")})
    text = str(err.value)
    assert "no step has a parameter 'scal' (did you mean 'scale'?)" in text
    assert "step 'a', parameter 'scale': expected int like the default 2, got 'big'" in text
    assert "no step named 'zz'" in text


def test_values_make_edges_and_inject_references(fixture_pipeline):
    graph = build_graph(fixture_pipeline("values"))
    assert graph.upstream["consume"] == ("produce",)
    params = resolve_parameters(graph)
    assert params["consume"]["table"] == ValueRef("_nbflow/values/table")


def test_secret_parameters_become_environment_references(tmp_path, notebook_factory, monkeypatch):
    notebook_factory(tmp_path / "s.ipynb", 'outputs = {}\napi_token = "dev"\nuser = "me"\nretries_key = 3')
    (tmp_path / "nbflow.yaml").write_text("secrets: [user, retries_key]\n")
    graph = build_graph(tmp_path)
    params = resolve_parameters(graph, {"api_token": CliValue("s3cr3t")})
    # a secret with no value from outside keeps the notebook's default: nothing is injected
    assert params["s"] == {"api_token": EnvRef("NBFLOW_SECRET_API_TOKEN")}
    assert params["s"]["api_token"].text == "s3cr3t"
    assert secret_environment(params["s"]) == {"NBFLOW_SECRET_API_TOKEN": "s3cr3t"}
    # declared or detected, a secret's value also comes from its environment variable, coerced like any parameter
    monkeypatch.setenv("NBFLOW_SECRET_USER", "ci-bot")
    monkeypatch.setenv("NBFLOW_SECRET_RETRIES_KEY", "5")
    params = resolve_parameters(graph)["s"]
    assert params["user"].text == "ci-bot" and not params["user"].typed
    assert params["retries_key"] == EnvRef("NBFLOW_SECRET_RETRIES_KEY", typed=True) and params["retries_key"].text == "5"
    assert repr(params["retries_key"]) == (
        '__import__("ast").literal_eval(__import__("os").environ[\'NBFLOW_SECRET_RETRIES_KEY\'])')
    monkeypatch.setenv("NBFLOW_SECRET_RETRIES_KEY", "five")
    with pytest.raises(PipelineError) as err:
        resolve_parameters(graph)
    assert "expected int like the default 3" in str(err.value) and "five" not in str(err.value)


def test_names_that_merely_contain_secret_words_are_ordinary_parameters(tmp_path, notebook_factory):
    """max_tokens=200 -> 300 must be a coerced int that changes the fingerprint, not a secret string."""
    notebook_factory(tmp_path / "s.ipynb", 'outputs = {}\nmax_tokens = 200\nsort_keys = True\nkeyword = "a"\n'
                     'tokenizer = "bpe"')
    params = resolve_parameters(build_graph(tmp_path), {"max_tokens": CliValue("300"), "sort_keys": CliValue("no"),
                                                        "keyword": CliValue("b"), "tokenizer": CliValue("wp")})
    assert params["s"] == {"max_tokens": 300, "sort_keys": False, "keyword": "b", "tokenizer": "wp"}


def test_values_from_python_become_plain_literals_or_are_refused(tmp_path, notebook_factory):
    import datetime
    import enum
    import pathlib

    import numpy as np

    notebook_factory(tmp_path / "s.ipynb", 'outputs = {}\npath = "a"\nrate = 0.5\nday = "2020-01-01"\nn = 1\n'
                     'items = [1]\nother = None')

    class Level(enum.IntEnum):
        HIGH = 3

    graph = build_graph(tmp_path)
    params = resolve_parameters(graph, {"path": pathlib.Path("data/x.csv"), "rate": np.float64(0.25),
                                        "day": datetime.date(2021, 3, 4), "n": Level.HIGH,
                                        "items": [np.int64(2), pathlib.Path("p")]})["s"]
    assert params == {"path": "data/x.csv", "rate": 0.25, "day": "2021-03-04", "n": 3, "items": [2, "p"]}
    assert all(type(v) in (str, float, int, list) for v in params.values())

    class Sneaky:
        def __repr__(self):
            return "__import__('os').system('touch pwned')"

    with pytest.raises(PipelineError, match=r"step 's', parameter 'other': a .*Sneaky cannot be passed"):
        resolve_parameters(graph, {"other": Sneaky()})


def test_yaml_dates_become_iso_strings(tmp_path, notebook_factory):
    notebook_factory(tmp_path / "s.ipynb", 'outputs = {}\nday = "2020-01-01"')
    (tmp_path / "nbflow.yaml").write_text("steps:\n  s:\n    parameters: {day: 2022-05-06}\n")
    assert resolve_parameters(build_graph(tmp_path))["s"] == {"day": "2022-05-06"}


def test_overriding_a_consumed_value_is_an_error(fixture_pipeline):
    graph = build_graph(fixture_pipeline("values"))
    for key in ("table", "consume.table"):
        with pytest.raises(PipelineError, match=rf"-p {key}: step 'consume' consumes 'table' from step 'produce'"):
            resolve_parameters(graph, {key: CliValue("x")})


def test_yaml_parameters_are_type_checked(fixture_pipeline):
    root = fixture_pipeline("diamond")
    (root / "nbflow.yaml").write_text("steps:\n  a:\n    parameters: {scale: '3'}\n")
    with pytest.raises(PipelineError, match=r"nbflow.yaml:2: 'steps.a.parameters.scale' must be int like the default 2"):
        resolve_parameters(build_graph(root))


def test_cycle_follows_the_arrows(fixture_pipeline):
    with pytest.raises(PipelineError) as err:
        build_graph(fixture_pipeline("cycle"))
    path = str(err.value).split("cycle: ")[1].split(";")[0].split(" -> ")
    # x writes x.txt which y reads: y comes right after x in the printed path
    assert path[path.index("x") + 1] == "y"


def test_a_folder_inside_or_around_a_pipeline_is_not_a_second_ledger_unsaid(fixture_pipeline):
    import nbflow

    root = fixture_pipeline("diamond")
    assert nbflow.run(root, display=False).ok  # root/_nbflow/ now marks the pipeline
    with pytest.raises(PipelineError, match=rf"{root / 'sub'} is inside the pipeline {root} .*run `nbflow run {root}`"):
        build_graph(root / "sub")
    with pytest.raises(PipelineError, match=rf"{root} below {root.parent} is a pipeline already .*"
                                            rf"create {root.parent / 'nbflow.yaml'} \(it may be empty\)"):
        build_graph(root.parent)
    (root / "sub" / "nbflow.yaml").write_text("")  # a pipeline of its own, on purpose
    assert list(build_graph(root / "sub").steps) == ["e"]


def test_a_folder_the_enclosing_pipeline_excludes_is_a_pipeline_of_its_own(tmp_path, notebook_factory):
    """The tutorial works in notebooks/tutorial_work/, which notebooks/nbflow.yaml excludes."""
    notebook_factory(tmp_path / "a.ipynb", 'outputs = {}', "x = 1")
    (tmp_path / "nbflow.yaml").write_text('exclude: ["scratch/**"]\n')
    notebook_factory(tmp_path / "scratch" / "b.ipynb", 'outputs = {}', "x = 1")
    assert list(build_graph(tmp_path / "scratch").steps) == ["b"]
    assert list(build_graph(tmp_path).steps) == ["a"]
