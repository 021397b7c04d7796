"""Run settings: one rule each, resolved once, honoured by every executor's kernels."""

from __future__ import annotations

import json

import pytest

import nbflow
from nbflow.config import Config
from nbflow.settings import resolve


def test_an_argument_wins_over_the_environment_over_nbflow_yaml():
    config = Config(jobs=3, executor="dask", forkserver=True)
    assert resolve(config, environ={}).jobs == 3 and resolve(config, jobs=5, environ={}).jobs == 5
    assert resolve(config, environ={}).executor == "dask" and resolve(config, executor="local").executor == "local"
    off = resolve(config, environ={"NBFLOW_FORKSERVER": "off"})
    assert not off.forkserver and off.forkserver_off == "NBFLOW_FORKSERVER=off"
    assert resolve(config, environ={"NBFLOW_FORKSERVER": "1"}).forkserver
    yaml_off = resolve(Config(forkserver=False), environ={})
    assert not yaml_off.forkserver and yaml_off.forkserver_off == "forkserver: false in nbflow.yaml"


@pytest.mark.parametrize("how", ["nbflow.yaml", "environment"])
def test_turning_the_fork_server_off_gives_ordinary_kernels(tmp_path, notebook_factory, monkeypatch, how):
    """A forked kernel's parent is the fork server; an ordinary kernel's is nbflow (jupyter_client's Popen)."""
    notebook_factory(tmp_path / "a.ipynb", 'outputs = {"o": "o.json"}',
                     "import json, os\njson.dump({'ppid': os.getppid()}, open(outputs['o'], 'w'))")
    if how == "nbflow.yaml":
        (tmp_path / "nbflow.yaml").write_text("forkserver: false\n")
    else:
        monkeypatch.setenv("NBFLOW_FORKSERVER", "0")
    assert nbflow.run(tmp_path, display=False).ok
    import os

    assert json.loads((tmp_path / "o.json").read_text())["ppid"] == os.getpid()
    (tmp_path / "nbflow.yaml").write_text("forkserver: true\n")
    monkeypatch.delenv("NBFLOW_FORKSERVER", raising=False)
    assert nbflow.run(tmp_path, display=False, force=True).ok
    assert json.loads((tmp_path / "o.json").read_text())["ppid"] != os.getpid()  # forked from the server
