""""Fresh" must always be true: regressions for each way a step was once wrongly skipped or crashed.

Each test runs a small pipeline for real, changes one thing, and checks what
`status` says and what a run then does (state.py's fingerprints, seen end to end).
"""

from __future__ import annotations

import datetime
import os
import pathlib
import shlex
import stat
import subprocess
import sys

import numpy as np
import pytest
from conftest import write_notebook
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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


def test_secrets_given_on_the_command_line_or_per_step_are_never_written(tmp_path, notebook_factory):
    """`-p total.delay=...` (a declared secret, named per step), `-p api_token ...` and `--parameter=...`: the
    ledger keeps the run's parameters and its command line (audit), both with *** for every secret value."""
    notebook_factory(tmp_path / "total.ipynb", 'outputs = {"o": "o.txt"}\ndelay = "1"\napi_token = "dev"\nx = 0',
                     'open(outputs["o"], "w").write(f"{len(delay)} {len(api_token)} {x}")')
    (tmp_path / "nbflow.yaml").write_text("secrets: [delay]\n")
    done = subprocess.run([sys.executable, "-m", "nbflow.cli", "run", str(tmp_path), "-p", "total.delay=HUNTER2-42",
                           "-p", "api_token", "--parameter=x=7"], capture_output=True, text=True)
    assert done.returncode == 2 and "HUNTER2" not in done.stderr  # "-p api_token" alone: refused, nothing echoed
    done = subprocess.run([sys.executable, "-m", "nbflow.cli", "run", str(tmp_path), "-p", "total.delay=HUNTER2-42",
                           "-ptotal.api_token=ZZ-TOP-99", "--parameter=x=7"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "o.txt").read_text() == "10 9 7"
    assert nbflow.run(tmp_path, parameters={"total.delay": "HUNTER2-43", "api_token": "ZZ-TOP-98", "x": 8}).ok
    ledger = Ledger(tmp_path / "_nbflow", create=False)
    try:
        runs = ledger.runs()
    finally:
        ledger.close()
    calls = [r["audit"]["call"] for r in runs if r.get("audit")]
    assert any(shlex.split(c)[-4:] == ["-p", "total.delay=***", "-ptotal.api_token=***", "--parameter=x=7"]
               for c in calls), calls
    assert any("'total.delay': '***'" in c and "'x': 8" in c for c in calls), calls
    for path in (tmp_path / "_nbflow").rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert b"HUNTER2" not in data and b"ZZ-TOP" not in data, path


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


def test_a_folder_input_depends_on_every_step_writing_inside_it_and_names_a_file_added_by_hand(tmp_path,
                                                                                              notebook_factory):
    for name in ("north", "south"):
        notebook_factory(tmp_path / f"{name}.ipynb", f'outputs = {{"report": "reports/{name}.csv"}}',
                         "import os\nos.makedirs('reports', exist_ok=True)\n"
                         f"open(outputs['report'], 'w').write('{name}')")
    notebook_factory(tmp_path / "merge.ipynb", 'inputs = {"reports": "reports/"}\noutputs = {"all": "all.txt"}',
                     "import os\nnames = sorted(os.listdir(inputs['reports']))\n"
                     "open(outputs['all'], 'w').write(','.join(names))")
    assert nbflow.Pipeline(tmp_path).graph["merge"] == ["north", "south"]  # no step writes reports/ itself
    assert run(tmp_path).ok and (tmp_path / "all.txt").read_text() == "north.csv,south.csv"
    (tmp_path / "reports" / "east.csv").write_text("east")
    assert states(tmp_path)["merge"] == ("stale", ("input reports/ changed: east.csv added",))
    assert states(tmp_path)["north"] == ("fresh", ())
    assert run(tmp_path).ok and (tmp_path / "all.txt").read_text() == "east.csv,north.csv,south.csv"


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


# -- the property: after any edit, status is right and a run equals a forced run -------------------------------


SECRET_VAR = "NBFLOW_SECRET_API_TOKEN"


def _write_step(root, j, ups, reads_raw, reads_dir, const, offset):
    inputs = {f"u{u}": f"s{u}.txt" for u in ups}
    if reads_raw:
        inputs["raw"] = "raw.txt"
    if reads_dir:
        inputs["dir"] = "rawdir/"
    parameters = (f"inputs = {inputs!r}\noutputs = {{'o': 's{j}.txt'}}\nk = {j}\napi_token = 'dev'\n"
                  f"max_tokens = 10\ndef shift(x):\n    return x + {offset}")
    code = (f"import os\nC = {const}\nparts = [str(shift(k)), str(max_tokens), str(len(api_token)), str(C)]\n"
            "for name, path in sorted(inputs.items()):\n"
            "    if path.endswith('/'):\n"
            "        parts += [f + '=' + open(os.path.join(path, f)).read() for f in sorted(os.listdir(path))]\n"
            "    else:\n"
            "        parts.append(open(path).read())\n"
            "open(outputs['o'], 'w').write('|'.join(parts))")
    write_notebook(root / f"s{j}.ipynb", parameters, code)


@st.composite
def pipelines(draw):
    n = draw(st.integers(2, 4))
    steps = []
    for j in range(n):
        ups = draw(st.sets(st.integers(0, j - 1), max_size=2)) if j else set()
        steps.append({"ups": sorted(ups), "raw": draw(st.booleans()), "dir": draw(st.booleans()), "const": 1,
                      "offset": 1})
    return steps


EDITS = st.sampled_from(["code", "parameters_cell", "parameter", "secret_like_name", "secret", "input",
                         "folder_file", "touch"])


@pytest.mark.slow
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                HealthCheck.function_scoped_fixture])
@given(steps=pipelines(), edits=st.lists(st.tuples(EDITS, st.integers(0, 3)), min_size=1, max_size=3))
def test_after_any_edit_status_is_right_and_a_run_equals_a_forced_run(tmp_path_factory, steps, edits):
    import shutil

    root = tmp_path_factory.mktemp("pipeline")
    (root / "raw.txt").write_text("r0")
    (root / "rawdir").mkdir()
    (root / "rawdir" / "a.txt").write_text("a0")
    for j, s in enumerate(steps):
        _write_step(root, j, s["ups"], s["raw"], s["dir"], s["const"], s["offset"])
    overrides: dict[str, CliValue] = {}
    old_secret = os.environ.get(SECRET_VAR)
    os.environ[SECRET_VAR] = "secret-0"
    down = {j: {i for i, s in enumerate(steps) if j in s["ups"]} for j in range(len(steps))}

    def closure(names):
        seen, todo = set(names), list(names)
        while todo:
            for d in down[todo.pop()]:
                if d not in seen:
                    seen.add(d)
                    todo.append(d)
        return seen

    try:
        assert run(root, parameters=overrides).ok
        for n, (kind, pick) in enumerate(edits, start=1):
            j = pick % len(steps)
            if kind == "code":
                steps[j]["const"] += 1
                _write_step(root, j, steps[j]["ups"], steps[j]["raw"], steps[j]["dir"], steps[j]["const"],
                            steps[j]["offset"])
                edited = {j}
            elif kind == "parameters_cell":
                steps[j]["offset"] += 1
                _write_step(root, j, steps[j]["ups"], steps[j]["raw"], steps[j]["dir"], steps[j]["const"],
                            steps[j]["offset"])
                edited = {j}
            elif kind == "parameter":
                overrides[f"s{j}.k"] = CliValue(str(100 + n))
                edited = {j}
            elif kind == "secret_like_name":
                overrides[f"s{j}.max_tokens"] = CliValue(str(200 + n))
                edited = {j}
            elif kind == "secret":
                os.environ[SECRET_VAR] = "secret-" + "x" * n
                edited = set(range(len(steps)))  # every step has api_token
            elif kind == "input":
                (root / "raw.txt").write_text(f"r{n}")
                edited = {i for i, s in enumerate(steps) if s["raw"]}
            elif kind == "folder_file":
                (root / "rawdir" / f"added{n}.txt").write_text(f"d{n}")
                edited = {i for i, s in enumerate(steps) if s["dir"]}
            else:  # a no-op touch: same content, new mtime
                os.utime(root / "raw.txt")
                os.utime(root / "rawdir" / "a.txt")
                edited = set()
            status = {s.name: s.state for s in nbflow.Pipeline(root).status(overrides)}
            expected = {f"s{i}" for i in closure(edited)}
            assert {name for name, state in status.items() if state == "stale"} == expected, (kind, j, status)

            assert run(root, parameters=overrides).ok
            forced = tmp_path_factory.mktemp("forced")
            for f in root.iterdir():
                if f.suffix == ".ipynb" or f.name in ("raw.txt", "rawdir"):
                    (shutil.copytree if f.is_dir() else shutil.copy)(f, forced / f.name)
            assert run(forced, parameters=overrides, force=True).ok
            for i in range(len(steps)):
                assert (root / f"s{i}.txt").read_text() == (forced / f"s{i}.txt").read_text(), (kind, i)
    finally:
        if old_secret is None:
            os.environ.pop(SECRET_VAR, None)
        else:
            os.environ[SECRET_VAR] = old_secret
