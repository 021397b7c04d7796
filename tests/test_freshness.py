""""Fresh" must always be true: regressions for each way a step was once wrongly skipped or crashed.

Each test runs a small pipeline for real, changes one thing, and checks what
`status` says and what a run then does (state.py's fingerprints, seen end to end).
"""

from __future__ import annotations

import datetime
import os
import pathlib
import stat
import subprocess
import sys

import numpy as np
import pytest

import nbflow
from nbflow.errors import PipelineError
from nbflow.params import CliValue
from nbflow.state import Ledger


def states(root):
    return {s.name: (s.state, s.reasons) for s in nbflow.Pipeline(root).status()}


def run(root, **kwargs):
    return nbflow.run(root, display=False, **kwargs)


def test_a_parameter_named_like_a_secret_word_is_an_ordinary_coerced_parameter(tmp_path, notebook_factory):
    notebook_factory(tmp_path / "gen.ipynb", 'outputs = {"o": "o.txt"}\nmax_tokens = 100',
                     'open(outputs["o"], "w").write(f"{type(max_tokens).__name__} {max_tokens}")')
    assert run(tmp_path, parameters={"max_tokens": CliValue("200")}).ok
    assert (tmp_path / "o.txt").read_text() == "int 200"
    assert states(tmp_path)["gen"][0] == "stale"  # status without -p: the default 100 differs from 200
    status = nbflow.Pipeline(tmp_path).status({"max_tokens": CliValue("300")})
    assert status[0].reasons == ("parameter max_tokens 200 -> 300",)
    assert run(tmp_path, parameters={"max_tokens": CliValue("300")}).steps["gen"].status == "succeeded"
    assert (tmp_path / "o.txt").read_text() == "int 300"


def test_a_changed_secret_reruns_the_step_and_is_never_written(tmp_path, notebook_factory, monkeypatch):
    notebook_factory(tmp_path / "fetch.ipynb", 'outputs = {"o": "o.txt"}\napi_token = "dev"\nretries_key = 1',
                     'open(outputs["o"], "w").write(f"{len(api_token)} {retries_key + 1}")')
    (tmp_path / "nbflow.yaml").write_text("secrets: [retries_key]\n")
    monkeypatch.setenv("NBFLOW_SECRET_API_TOKEN", "first-secret-value")
    monkeypatch.setenv("NBFLOW_SECRET_RETRIES_KEY", "41")
    assert run(tmp_path).ok
    assert (tmp_path / "o.txt").read_text() == "18 42"  # coerced: an int secret arrives as an int
    assert states(tmp_path)["fetch"] == ("fresh", ())

    monkeypatch.setenv("NBFLOW_SECRET_API_TOKEN", "second-secret")
    assert states(tmp_path)["fetch"] == ("stale", ("parameter api_token changed",))
    assert run(tmp_path).steps["fetch"].status == "succeeded"
    assert (tmp_path / "o.txt").read_text() == "13 42"

    key = tmp_path / "_nbflow" / "fingerprint.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    for path in (tmp_path / "_nbflow").rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert b"first-secret-value" not in data and b"second-secret" not in data, path


def test_code_in_the_parameters_cell_is_fingerprinted(tmp_path, notebook_factory):
    nb = notebook_factory(tmp_path / "calc.ipynb", 'outputs = {"o": "o.txt"}\ndef scale(x):\n    return x * 2',
                          'open(outputs["o"], "w").write(str(scale(21)))')
    assert run(tmp_path).ok and (tmp_path / "o.txt").read_text() == "42"
    nb.write_text(nb.read_text().replace("x * 2", "x * 3"))
    assert states(tmp_path)["calc"] == ("stale", ("cell 1 changed",))
    assert run(tmp_path).ok and (tmp_path / "o.txt").read_text() == "63"


def test_folder_outputs_and_inputs_are_hashed_as_a_whole(tmp_path, notebook_factory):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "a.csv").write_text("1\n2\n")
    (tmp_path / "raw" / "b.csv").write_text("3\n")
    notebook_factory(tmp_path / "split.ipynb", 'inputs = {"raw": "raw/"}\noutputs = {"parts": "parts/"}',
                     "import os, pathlib\nout = pathlib.Path(outputs['parts'])\nout.mkdir(exist_ok=True)\n"
                     "for f in sorted(os.listdir(inputs['raw'])):\n"
                     "    (out / f).write_text(str(len(open(os.path.join(inputs['raw'], f)).readlines())))")
    notebook_factory(tmp_path / "total.ipynb", 'inputs = {"parts": "parts/"}\noutputs = {"t": "total.txt"}',
                     "import os\nn = sum(int(open(os.path.join(inputs['parts'], f)).read()) "
                     "for f in os.listdir(inputs['parts']))\nopen(outputs['t'], 'w').write(str(n))")
    graph = nbflow.Pipeline(tmp_path).graph
    assert graph["total"] == ["split"]  # a folder input depends on the step writing inside it
    result = run(tmp_path)
    assert result.ok, result.to_json()
    assert (tmp_path / "total.txt").read_text() == "3"
    assert {n: s for n, (s, _) in states(tmp_path).items()} == {"split": "fresh", "total": "fresh"}

    os.utime(tmp_path / "raw" / "a.csv")  # a no-op touch keeps everything fresh
    assert {n: s for n, (s, _) in states(tmp_path).items()} == {"split": "fresh", "total": "fresh"}

    (tmp_path / "raw" / "c.csv").write_text("4\n5\n6\n")  # a file added by hand is named in the reason
    (tmp_path / "raw" / "b.csv").write_text("3\n4\n")
    now = states(tmp_path)
    assert now["split"] == ("stale", ("input raw/ changed: c.csv added, b.csv changed",))
    assert now["total"] == ("stale", ("upstream split reruns",))
    assert run(tmp_path).ok
    assert (tmp_path / "total.txt").read_text() == "7"

    (tmp_path / "parts" / "b.csv").write_text("100")  # an output folder edited by hand is no longer fresh
    assert states(tmp_path)["split"] == ("stale", ("output parts/ changed since it was made",))


def test_a_fifo_is_a_clear_error_not_a_hang(tmp_path, notebook_factory):
    os.mkfifo(tmp_path / "pipe")
    notebook_factory(tmp_path / "reads.ipynb", 'inputs = {"p": "pipe"}\noutputs = {"o": "o.txt"}', "pass")
    with pytest.raises(PipelineError, match=r"reads.ipynb: pipe is a FIFO \(named pipe\), not a regular file or "
                                            r"folder"):
        run(tmp_path)
    with pytest.raises(PipelineError, match="is a FIFO"):
        nbflow.Pipeline(tmp_path).status()

    (tmp_path / "reads.ipynb").unlink()
    notebook_factory(tmp_path / "writes.ipynb", 'outputs = {"o": "out.fifo"}', "import os\nos.mkfifo(outputs['o'])")
    result = run(tmp_path)
    error = result.steps["writes"].error
    assert result.steps["writes"].status == "failed"
    assert error.kind == "missing_output" and "declared output out.fifo is a FIFO" in error.evalue


def test_an_output_reaching_the_state_folder_through_a_symlink_is_refused(tmp_path, notebook_factory):
    notebook_factory(tmp_path / "ok.ipynb", 'outputs = {"o": "o.txt"}', "open(outputs['o'], 'w').write('x')")
    assert run(tmp_path).ok
    os.symlink(tmp_path / "_nbflow", tmp_path / "innocent")
    notebook_factory(tmp_path / "evil.ipynb", 'outputs = {"o": "innocent/history.sqlite"}',
                     "open(outputs['o'], 'w').write('gone')")
    with pytest.raises(PipelineError, match=r"output 'innocent/history.sqlite' is inside _nbflow/ \(through a "
                                            r"symlink"):
        run(tmp_path)
    ledger = Ledger(tmp_path / "_nbflow", create=False)
    assert len(ledger.runs()) == 1  # intact
    ledger.close()


def test_values_from_python_reach_the_kernel_as_plain_literals(tmp_path, notebook_factory):
    notebook_factory(tmp_path / "p.ipynb", 'outputs = {"o": "o.txt"}\npath = "x"\nrate = 0.1\nday = "2020-01-01"',
                     "open(outputs['o'], 'w').write(repr((path, rate, day)))")
    result = run(tmp_path, parameters={"path": pathlib.Path("data") / "x.csv", "rate": np.float64(0.25),
                                       "day": datetime.date(2021, 3, 4)})
    assert result.ok, result.to_json()
    assert (tmp_path / "o.txt").read_text() == "('data/x.csv', 0.25, '2021-03-04')"


def test_an_internal_error_during_a_run_never_leaves_it_running(tmp_path, notebook_factory, monkeypatch):
    notebook_factory(tmp_path / "a.ipynb", 'outputs = {"o": "o.txt"}', "open(outputs['o'], 'w').write('x')")
    import nbflow.execute

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in nbflow")

    monkeypatch.setattr(nbflow.execute, "assess", broken)
    with pytest.raises(RuntimeError, match="a bug in nbflow"):
        run(tmp_path)
    ledger = Ledger(tmp_path / "_nbflow", create=False)
    assert [r["status"] for r in ledger.runs()] == ["failed"]
    ledger.close()


def test_status_and_run_of_a_folder_declared_without_a_slash_do_not_crash(tmp_path, notebook_factory):
    """A saved model is often a folder: declared as a plain path it is still hashed as a whole."""
    notebook_factory(tmp_path / "fit.ipynb", 'outputs = {"model": "model"}',
                     "import os\nos.makedirs(outputs['model'], exist_ok=True)\n"
                     "open(os.path.join(outputs['model'], 'weights.bin'), 'w').write('w')")
    proc = subprocess.run([sys.executable, "-m", "nbflow.cli", "run", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    proc = subprocess.run([sys.executable, "-m", "nbflow.cli", "status", str(tmp_path)], capture_output=True,
                          text=True)
    assert proc.returncode == 0 and "fresh" in proc.stdout, proc.stderr
