"""Bad input: every broken notebook or settings file is a clear error naming the file, exit code 2.

Broken notebooks are in tests/notebooks/malformed/ (one file per kind of damage,
next to a good notebook); bigger or stranger inputs (huge notebooks, unicode and
spaces in paths, symlinks, broken nbflow.yaml) are generated in tmp_path.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import nbflow
from nbflow.cli import main as cli_main
from nbflow.errors import PipelineError
from nbflow.graph import build_graph

HERE = Path(__file__).parent
MALFORMED = HERE / "notebooks" / "malformed"

# file -> (line, what the user reads after "nbflow: invalid pipeline: FILE[:LINE]: ")
BROKEN = {
    "binary_junk.ipynb": (None, "not a notebook: the file is not UTF-8 text (binary data?)"),
    "duplicate_ids.ipynb": (None, ("cells 2 and 3 have the same id 'c0'; cell ids must be unique: change or "
                                   "delete one of them")),
    "empty.ipynb": (None, "the file is empty, not a notebook; delete it or save a notebook over it"),
    "invalid_json.ipynb": (3, ("not valid notebook JSON: Expecting property name enclosed in double quotes at "
                               "line 3 column 43; restore the file from version control or re-save it in Jupyter")),
    "nbformat_v3.ipynb": (None, ("notebook format v3 is not supported; convert it with `jupyter nbconvert --to "
                                 "notebook --nbformat 4 --inplace nbformat_v3.ipynb`")),
    "parameters_syntax_error.ipynb": (2, ("parameters cell (cell 1), line 2: syntax error: invalid syntax; fix "
                                          "the cell so that it runs")),
}


def cli(*args):
    return CliRunner().invoke(cli_main, [str(a) for a in args], catch_exceptions=False)


def problem_line(name: str) -> str:
    line, message = BROKEN[name]
    return f"{name}{f':{line}' if line else ''}: {message}"


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_several_broken_notebooks_are_reported_together_and_nothing_is_disturbed(fixture_pipeline):
    root = fixture_pipeline("malformed")
    before = files_of(root)
    result = cli("run", root)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr == ("nbflow: invalid pipeline: 6 problems:\n"
                             + "".join(f"  - {problem_line(name)}\n" for name in sorted(BROKEN)))
    assert files_of(root) == before  # no file touched, no _nbflow/ created, good.ipynb not run
    assert cli("status", root).exit_code == 2


def test_an_invalid_run_leaves_an_existing_ledger_alone(fixture_pipeline):
    root = fixture_pipeline("malformed")
    notebooks = sorted(p for p in root.glob("*.ipynb") if p.name != "good.ipynb")
    for path in notebooks:
        path.rename(path.with_suffix(".bak"))  # hidden from discovery: a run of good.ipynb makes a ledger
    assert nbflow.run(root, display=False).ok
    ledger = (root / "_nbflow" / "history.sqlite").read_bytes()
    for path in notebooks:
        path.with_suffix(".bak").rename(path)
    assert cli("run", root, "--force").exit_code == 2
    assert (root / "_nbflow" / "history.sqlite").read_bytes() == ledger
    conn = sqlite3.connect(root / "_nbflow" / "history.sqlite")
    assert conn.execute("SELECT count(*) FROM runs").fetchone() == (1,)
    conn.close()


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_each_kind_of_broken_notebook_names_the_file_and_the_problem(tmp_path, name):
    root = tmp_path / "pipeline"
    root.mkdir()
    shutil.copy(MALFORMED / "good.ipynb", root)
    shutil.copy(MALFORMED / name, root)
    with pytest.raises(PipelineError) as caught:
        build_graph(root)
    [problem] = caught.value.problems
    line, message = BROKEN[name]
    assert (problem.file, problem.line) == (name, line)
    assert problem.message == message
    result = cli("status", root)
    assert result.exit_code == 2 and result.stderr == f"nbflow: invalid pipeline: {problem_line(name)}\n"


def test_a_non_literal_declaration_names_the_line(tmp_path, notebook_factory):
    root = tmp_path / "p"
    notebook_factory(root / "reads.ipynb", 'base = "data"\ninputs = {"table": base + "/t.csv"}', 'x = 1')
    result = cli("status", root)
    assert result.exit_code == 2
    assert result.stderr == ("nbflow: invalid pipeline: reads.ipynb:2: parameters cell (cell 1), line 2: `inputs` "
                             "must be a literal (strings, lists, dicts), not `{\"table\": base + \"/t.csv\"}`; nbflow "
                             "reads declarations without running the notebook\n")


# -- huge notebooks ----------------------------------------------------------------------------------

def huge_notebook(path: Path, notebook_factory, megabytes: int = 20) -> Path:
    """A step with 2000 markdown cells and a stored output of `megabytes` MB, as saved by Jupyter."""
    notebook_factory(path, 'outputs = {"o": "huge.txt"}', 'print("x" * 10)\nopen(outputs["o"], "w").write("ok")')
    nb = json.loads(path.read_text())
    nb["cells"][1]["outputs"] = [{"output_type": "stream", "name": "stdout", "text": ["y" * 1000 + "\n"] * (megabytes * 1000)}]
    nb["cells"] += [{"cell_type": "markdown", "id": f"m{i}", "metadata": {}, "source": f"note {i}"} for i in range(2000)]
    path.write_text(json.dumps(nb))
    return path


def test_a_huge_notebook_is_read_statically_and_runs(tmp_path, notebook_factory):
    root = tmp_path / "huge"
    path = huge_notebook(root / "big.ipynb", notebook_factory)
    assert path.stat().st_size > 20_000_000
    assert [s.state for s in nbflow.Pipeline(root).status()] == ["stale"]
    result = nbflow.run(root, display=False)
    assert result.ok and (root / "huge.txt").read_text() == "ok"
    executed = root / result.steps["big"].notebook
    assert executed.stat().st_size < 2_000_000  # old outputs are not carried into the executed copy
    assert json.loads(executed.read_text())["cells"][1]["outputs"][0]["text"] == "xxxxxxxxxx\n"


def test_a_huge_truncated_notebook_reports_where_the_json_breaks(tmp_path, notebook_factory):
    root = tmp_path / "truncated"
    path = huge_notebook(root / "cut.ipynb", notebook_factory, megabytes=5)
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    result = cli("status", root)
    assert result.exit_code == 2
    assert result.stderr.startswith("nbflow: invalid pipeline: cut.ipynb:1: not valid notebook JSON: ")
    assert "restore the file from version control or re-save it in Jupyter" in result.stderr


# -- unicode, spaces and symlinks in paths ---------------------------------------------------------------

def test_unicode_and_spaces_in_paths(tmp_path, notebook_factory):
    root = tmp_path / "my pipeline ü"
    notebook_factory(root / "étape 1.ipynb", 'outputs = {"o": "sortie 1.txt"}\nlabel = "été"',
                     'open(outputs["o"], "w", encoding="utf-8").write(label)')
    notebook_factory(root / "sub dir" / "заметка.ipynb", 'inputs = {"i": "../sortie 1.txt"}\noutputs = {"o": "вывод.txt"}',
                     'open(outputs["o"], "w", encoding="utf-8").write(open(inputs["i"], encoding="utf-8").read() * 2)')
    result = cli("run", root, "--json", "-p", "label=naïve ☃")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert [(s["name"], s["status"]) for s in out["steps"]] == [("étape 1", "succeeded"), ("sub dir/заметка", "succeeded")]
    assert out["steps"][1]["notebook"] == f"_nbflow/runs/{out['run_id']}/sub dir/заметка.ipynb"
    assert (root / out["steps"][1]["notebook"]).exists()
    assert (root / "sub dir" / "вывод.txt").read_text(encoding="utf-8") == "naïve ☃naïve ☃"
    lineage = cli("lineage", root, root / "sub dir" / "вывод.txt", "--json")
    assert json.loads(lineage.stdout)["step"] == "sub dir/заметка"

    (root / "sub dir" / "сломан.ipynb").write_text("{not json")
    broken = cli("status", root)
    assert broken.exit_code == 2 and broken.stderr.startswith("nbflow: invalid pipeline: sub dir/сломан.ipynb:1: ")


def test_symlinked_notebooks(tmp_path, notebook_factory):
    root = tmp_path / "linked"
    real = notebook_factory(tmp_path / "elsewhere" / "real.ipynb", 'outputs = {"o": "made_here.txt"}',
                            'open(outputs["o"], "w").write("from a symlinked notebook")')
    real_bytes = real.read_bytes()
    root.mkdir()
    (root / "step.ipynb").symlink_to(real)
    result = nbflow.run(root, display=False)
    assert result.ok and list(result.steps) == ["step"]
    # the step runs in the folder of the link, as Jupyter would open it; the target is not modified
    assert (root / "made_here.txt").read_text() == "from a symlinked notebook"
    assert not (tmp_path / "elsewhere" / "made_here.txt").exists() and real.read_bytes() == real_bytes

    (root / "dangling.ipynb").symlink_to(tmp_path / "gone.ipynb")
    broken = cli("run", root)
    assert broken.exit_code == 2
    assert broken.stderr == "nbflow: invalid pipeline: dangling.ipynb: cannot read the notebook: No such file or directory\n"


# -- nbflow.yaml ----------------------------------------------------------------------------------------------

@pytest.fixture
def with_config(tmp_path, notebook_factory):
    root = tmp_path / "configured"
    notebook_factory(root / "clean.ipynb", 'min_year = 2012', 'x = 1')

    def write(text: str) -> Path:
        (root / "nbflow.yaml").write_text(text)
        return root

    return write


def test_yaml_syntax_error_gives_the_line(with_config):
    root = with_config("steps:\n  clean:\n    retries: 2\n  - oops\n")
    result = cli("run", root)
    assert result.exit_code == 2
    assert result.stderr.startswith("nbflow: invalid pipeline: nbflow.yaml:4: YAML syntax error: ")


def test_unknown_keys_give_the_line_and_a_did_you_mean(with_config):
    root = with_config("defaults:\n  retires: 2\nsteps:\n  clean:\n    timout: 5\nstepz: {}\n")
    result = cli("status", root)
    assert result.exit_code == 2
    assert result.stderr == ("nbflow: invalid pipeline: 3 problems:\n"
                             "  - nbflow.yaml:6: unknown key 'stepz' (did you mean 'steps'?)\n"
                             "  - nbflow.yaml:2: unknown key 'defaults.retires' (did you mean 'retries'?)\n"
                             "  - nbflow.yaml:5: unknown key 'steps.clean.timout' (did you mean 'timeout'?)\n")


def test_wrong_types_give_the_line_and_the_key(with_config):
    root = with_config("steps:\n  clean:\n    retries: two\n    timeout: \"10\"\njobs: 0\n")
    result = cli("run", root)
    assert result.exit_code == 2
    assert result.stderr == ("nbflow: invalid pipeline: 3 problems:\n"
                             "  - nbflow.yaml:5: 'jobs' must be at least 1\n"
                             "  - nbflow.yaml:3: 'steps.clean.retries' must be an integer, not 'two'\n"
                             "  - nbflow.yaml:4: 'steps.clean.timeout' must be an integer or a number or null, "
                             "not '10'\n")


def test_unknown_step_and_parameter_in_yaml_have_a_did_you_mean(with_config):
    root = with_config("steps:\n  claen: {retries: 1}\n  clean:\n    parameters: {min_yeer: 3}\n")
    result = cli("status", root)
    assert result.exit_code == 2
    assert result.stderr == ("nbflow: invalid pipeline: 2 problems:\n"
                             "  - nbflow.yaml:2: 'steps.claen' names no step (did you mean 'clean'?)\n"
                             "  - nbflow.yaml:3: 'steps.clean.parameters.min_yeer': step 'clean' has no parameter "
                             "'min_yeer' (did you mean 'min_year'?)\n")


# -- a damaged ledger -----------------------------------------------------------------------------------------

def damage(ledger: Path, how: str) -> None:
    """Damage the ledger as a disk, a crash or a stray write would."""
    data = ledger.read_bytes()
    page = 4096
    if how == "pages_overwritten":  # the header survives, every page after the first is junk
        junk = bytes((i * 151 + 7) % 256 for i in range(len(data) - page))
        ledger.write_bytes(data[:page] + junk)
    elif how == "truncated":
        ledger.write_bytes(data[: len(data) // 2])
    else:  # random bytes: not an sqlite file at all
        ledger.write_bytes(bytes((i * 31 + 17) % 256 for i in range(len(data))))


READ_COMMANDS = [("status",), ("history",), ("history", "--json"), ("show", "latest"), ("show", "--json", "latest"),
                 ("lineage", "data/d.txt"), ("report", "-o", "report.html")]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["pages_overwritten", "truncated", "random_bytes"])
def test_a_damaged_ledger_is_a_clear_error_everywhere_and_repair_moves_it_aside(fixture_pipeline, how):
    root = fixture_pipeline("diamond")
    first = nbflow.run(root, display=False)
    assert first.ok
    executed = files_of(root / "_nbflow" / "runs")
    ledger = root / "_nbflow" / "history.sqlite"
    damage(ledger, how)
    damaged_bytes = ledger.read_bytes()

    for command in [("run",), ("run", "--json"), *READ_COMMANDS]:
        name, *rest = command
        args = [name, root, *(root / a if a == "data/d.txt" else a for a in rest)]
        result = cli(*args)
        assert result.exit_code == 1, (command, result.output)
        assert result.stderr.startswith(f"nbflow: the run ledger {ledger} is damaged ("), (command, result.stderr)
        assert (f"the executed notebooks in _nbflow/runs/ are not affected. Move the damaged file aside with "
                f"`nbflow repair {root}`: the next run then starts a new ledger and runs every step once"
                in result.stderr), command
        assert "Traceback" not in result.output
    as_process = subprocess.run([sys.executable, "-m", "nbflow.cli", "run", str(root), "--json"],
                                capture_output=True, text=True, timeout=120)
    assert as_process.returncode == 1 and "Traceback" not in as_process.stderr
    assert json.loads(as_process.stdout)["error"].startswith(f"the run ledger {ledger} is damaged")
    assert not (root / "report.html").exists()
    assert files_of(root / "_nbflow" / "runs") == executed  # the refused run started no step
    assert ledger.read_bytes() == damaged_bytes

    repaired = cli("repair", root)
    assert repaired.exit_code == 0, repaired.output
    [aside] = [p for p in (root / "_nbflow").glob("history.sqlite.damaged-*") if not p.name.endswith(("-wal", "-shm"))]
    assert f"moved it aside to {aside}" in repaired.stdout
    assert aside.read_bytes() == damaged_bytes
    names = {p.name for p in (root / "_nbflow").iterdir() if p.name.startswith("history.sqlite")}
    assert names <= {aside.name, f"{aside.name}-wal", f"{aside.name}-shm"}  # its -wal and -shm went with it

    again = cli("run", root, "--json")
    assert again.exit_code == 0, again.output
    assert {s["status"] for s in json.loads(again.stdout)["steps"]} == {"succeeded"}  # a new ledger: all ran
    assert [r["run_id"] for r in json.loads(cli("history", root, "--json").stdout)["runs"]] == [
        json.loads(again.stdout)["run_id"]]
    assert files_of(root / "_nbflow" / "runs").items() >= executed.items()  # the first run's notebooks are kept
    assert cli("repair", root).stdout == f"{ledger} is sound; nothing moved\n"


def test_damage_found_only_when_writing_is_found_before_any_step_starts(fixture_pipeline):
    root = fixture_pipeline("diamond")
    assert nbflow.run(root, display=False).ok
    ledger = root / "_nbflow" / "history.sqlite"
    conn = sqlite3.connect(ledger)
    [(page,)] = conn.execute("SELECT rootpage FROM sqlite_master WHERE name='sqlite_sequence'").fetchall()
    conn.close()
    data = bytearray(ledger.read_bytes())
    data[(page - 1) * 4096:page * 4096] = b"\xff" * 4096  # read only to number a new step attempt
    ledger.write_bytes(bytes(data))
    (root / "data" / "seed.txt").write_text("2")  # every step would run
    assert cli("status", root).exit_code == 0 and cli("history", root).exit_code == 0  # read no damaged page
    runs_before = files_of(root / "_nbflow" / "runs")

    result = cli("run", root)
    assert result.exit_code == 1
    assert result.stderr.startswith(f"nbflow: the run ledger {ledger} is damaged ("), result.stderr
    assert files_of(root / "_nbflow" / "runs") == runs_before  # PRAGMA quick_check found it: no step started


def test_repair_of_a_sound_or_absent_ledger_moves_nothing(fixture_pipeline, tmp_path):
    root = fixture_pipeline("diamond")
    assert cli("repair", root).stdout == f"no run ledger in {root / '_nbflow'}; nothing to repair\n"
    assert not (root / "_nbflow").exists()
    missing = cli("repair", tmp_path / "nope")
    assert missing.exit_code == 2 and f"pipeline folder '{tmp_path / 'nope'}' does not exist" in missing.stderr
