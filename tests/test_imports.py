"""A project shaped like the real ones: nested notebooks importing the project's own package.

tests/notebooks/real_project/ has a pyproject.toml at its root (which makes it
the default `pythonpath`), a `config` module and a `src` package there,
root-relative data, a folder output, and its notebooks two levels down.
"""

from __future__ import annotations

import json
import shutil

import pytest

import nbflow
from nbflow.imports import imported_names, project_modules

from conftest import FIXTURES


@pytest.fixture
def project(tmp_path):
    root = tmp_path / "weatherlab"
    shutil.copytree(FIXTURES / "real_project", root)
    return root


def stale(pipeline):
    return {s.name: s.reasons for s in nbflow.Pipeline(pipeline).status() if s.state == "stale"}


def test_imported_names_and_project_modules(project):
    assert imported_names("import pandas as pd\nfrom src.features import add_features\nfrom config import PATHS") \
        == ("pandas", "src.features", "src.features.add_features", "config", "config.PATHS")
    found = project_modules(["pandas", "src.features", "config"], [project, project / "notebooks" / "01_prepare"])
    assert [p.relative_to(project).as_posix() for p in found] == ["config.py", "src/__init__.py", "src/features.py"]
    assert imported_names("%matplotlib inline\nimport x") == ()  # magics: not Python, nothing read


@pytest.mark.slow
def test_the_project_runs_and_a_module_edit_makes_exactly_its_importers_stale(project):
    pipeline = project / "notebooks"
    result = nbflow.run(pipeline, display=False)
    assert result.ok, result.to_json()
    assert sorted(p.name for p in (project / "data" / "features").iterdir()) == ["year=2012"]
    assert json.loads((project / "reports" / "summary.json").read_text())["days"] == 300
    assert stale(pipeline) == {}

    with open(project / "src" / "plotting.py", "a") as f:
        f.write("\n\ndef unused():\n    return None\n")
    assert stale(pipeline) == {"02_analysis/monthly": ("module ../src/plotting.py changed",)}

    features = project / "src" / "features.py"
    features.write_text(features.read_text().replace('frame["precipitation"] > 0', 'frame["precipitation"] > 1'))
    now = stale(pipeline)
    assert now["01_prepare/prepare"] == ("module ../src/features.py changed",)
    assert now["02_analysis/summary"] == ("upstream 01_prepare/prepare reruns",)
    second = nbflow.run(pipeline, display=False)
    assert second.ok and {n: s.status.value for n, s in second.steps.items()} == dict.fromkeys(second.steps, "succeeded")
    assert stale(pipeline) == {}


@pytest.mark.slow
def test_a_missing_project_module_names_the_pythonpath_fix(project):
    pipeline = project / "notebooks"
    (pipeline / "nbflow.yaml").write_text("pythonpath: []\n")  # no project root on sys.path
    result = nbflow.run(pipeline, display=False)
    error = result.steps["01_prepare/prepare"].error
    assert error.ename == "ModuleNotFoundError"
    assert f"{project / 'config.py'} exists above the notebook's folder" in error.evalue
    assert "add `pythonpath: [..]` to nbflow.yaml" in error.evalue
    (pipeline / "nbflow.yaml").write_text("pythonpath: [..]\n")
    assert nbflow.run(pipeline, display=False).ok


def test_env_reaches_steps_is_fingerprinted_and_refers_to_the_caller_s_environment(tmp_path, notebook_factory,
                                                                                   monkeypatch):
    notebook_factory(tmp_path / "a.ipynb", 'outputs = {"o": "o.txt"}',
                     "import os\nopen(outputs['o'], 'w').write(os.environ['REGION'] + '|' + os.environ['TOKEN_ISH'])")
    monkeypatch.setenv("CALLER_REGION", "eu-west-1")
    (tmp_path / "nbflow.yaml").write_text("env: {REGION: $CALLER_REGION, TOKEN_ISH: s3cr3t-value}\n")
    assert nbflow.run(tmp_path, display=False).ok
    assert (tmp_path / "o.txt").read_text() == "eu-west-1|s3cr3t-value"
    assert stale(tmp_path) == {}
    monkeypatch.setenv("CALLER_REGION", "us-east-1")
    assert stale(tmp_path) == {"a": ("env REGION changed",)}
    assert b"s3cr3t-value" not in (tmp_path / "_nbflow" / "history.sqlite").read_bytes()
    monkeypatch.delenv("CALLER_REGION")
    with pytest.raises(nbflow.PipelineError, match=r"'env.REGION' refers to \$CALLER_REGION, which is not set"):
        nbflow.run(tmp_path, display=False)


@pytest.mark.parametrize("forkserver", [True, False], ids=["forked-kernel", "ordinary-kernel"])
def test_pythonpath_comes_first_on_sys_path_in_both_kinds_of_kernel(tmp_path, notebook_factory, forkserver):
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "helpers.py").write_text("ANSWER = 42\n")
    pipeline = tmp_path / "pipe"
    notebook_factory(pipeline / "a.ipynb", 'outputs = {"o": "o.txt"}',
                     "import sys, helpers\nopen(outputs['o'], 'w').write(f'{helpers.ANSWER} {sys.path[0]}')")
    (pipeline / "nbflow.yaml").write_text(f"pythonpath: [../lib]\nforkserver: {str(forkserver).lower()}\n")
    assert nbflow.run(pipeline, display=False).ok
    assert (pipeline / "o.txt").read_text() == f"42 {tmp_path / 'lib'}"  # first, as PYTHONPATH puts it
