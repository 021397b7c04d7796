"""binder/ installs nbflow the way mybinder.org (repo2docker) uses it: requirements.txt, then postBuild.

Builds a fresh virtual environment and installs into it from the network (or pip's cache): about a
minute; then runs notebooks/tutorial.ipynb from top to bottom in it, on its own kernel, as a Binder
user does (about 10 s more), and checks what it shows (tests/tutorial_checks.py). No image is built. It runs with the rest of the suite, so a broken Binder setup fails CI.
"""

from __future__ import annotations

import pytest

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
from tutorial_checks import check_the_executed_tutorial

ROOT = Path(__file__).parents[1]
BINDER = ROOT / "binder"


def run(args: list[str], env: dict[str, str]) -> str:
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{' '.join(map(str, args))} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_postbuild_is_an_executable_bash_script():
    post_build = BINDER / "postBuild"
    assert os.access(post_build, os.X_OK)
    assert post_build.read_text().startswith("#!/bin/bash\n")
    assert "?urlpath=lab/tree/notebooks/tutorial.ipynb" in (BINDER / "README.md").read_text()


@pytest.mark.slow
def test_binder_files_install_nbflow_into_a_fresh_venv(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = str(venv / "bin" / "python")
    # as in repo2docker: the environment's python and pip come first on PATH
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}", VIRTUAL_ENV=str(venv),
               PIP_DISABLE_PIP_VERSION_CHECK="1")
    run([python, "-m", "pip", "install", "-r", str(BINDER / "requirements.txt")], env)
    run(["bash", str(BINDER / "postBuild")], env)
    where = run([python, "-c", "import nbflow, ipywidgets, jupyterlab, matplotlib; print(nbflow.__file__)"], env)
    assert Path(where.strip()) == ROOT / "nbflow" / "__init__.py"  # installed from this checkout
    assert "status" in run([str(venv / "bin" / "nbflow"), "--help"], env)  # the command line too

    # the tutorial, top to bottom, in that environment and its own kernel (what the Binder link opens), beside
    # the example's nbflow.yaml and _nbflow/ as in notebooks/
    work = tmp_path / "notebooks"
    work.mkdir()
    for name in ("tutorial.ipynb", "nbflow.yaml"):
        shutil.copy(ROOT / "notebooks" / name, work / name)
    (work / "_nbflow").mkdir()
    script = ("import json, sys, time\nimport nbformat\nfrom nbclient import NotebookClient\n"
              "nb = nbformat.read(sys.argv[1], as_version=4)\n"
              "nb.cells.append(nbformat.v4.new_code_cell('import sys; print(sys.executable)'))  # the kernel's\n"
              "started = time.perf_counter()\n"
              "NotebookClient(nb, timeout=300, kernel_name='python3', resources={'metadata': {'path': sys.argv[2]}})"
              ".execute()\n"
              "errors = [o for c in nb.cells if c.cell_type == 'code' for o in c.outputs if o.output_type == 'error']\n"
              "nbformat.write(nb, sys.argv[3])\n"
              "print(json.dumps({'seconds': round(time.perf_counter() - started, 1), 'errors': errors, "
              "'kernel': nb.cells[-1].outputs[0].text.strip()}))\n")
    executed = tmp_path / "tutorial.executed.ipynb"
    ran = json.loads(run([python, "-c", script, str(work / "tutorial.ipynb"), str(work), str(executed)],
                         env).splitlines()[-1])
    assert ran["errors"] == [] and Path(ran["kernel"]).parent == venv / "bin", ran
    print(f"the tutorial ran top to bottom in the Binder environment in {ran['seconds']} s")
    nb = nbformat.read(executed, as_version=4)
    nb.cells.pop()  # the cell added above
    check_the_executed_tutorial(nb, work)
