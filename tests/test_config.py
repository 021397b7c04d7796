"""nbflow.yaml: defaults, per-step settings, errors with line and key."""

from __future__ import annotations

import pytest

from nbflow.config import load_config
from nbflow.errors import PipelineError


def test_absent_file_gives_defaults(tmp_path):
    config = load_config(tmp_path)
    assert config.path is None and config.executor == "local" and config.for_step("x").retries == 0


def test_step_settings_overlay_defaults(tmp_path):
    (tmp_path / "nbflow.yaml").write_text(
        "defaults: {retries: 1, timeout: 30}\nsteps:\n  stats:\n    parameters: {min_mass: 3000}\n    retries: 2\n"
        "secrets: [api_token]\njobs: 3\nschedule: '0 6 * * *'\non_failure: 'python alert.py'\n")
    config = load_config(tmp_path)
    stats = config.for_step("stats")
    assert (stats.retries, stats.timeout, stats.parameters) == (2, 30, {"min_mass": 3000})
    assert config.for_step("other").retries == 1
    assert config.secrets == ("api_token",) and config.jobs == 3 and config.on_failure == "python alert.py"


@pytest.mark.parametrize("text, expected", [
    ("defaults:\n  retires: 2\n", "nbflow.yaml:2: unknown key 'defaults.retires' (did you mean 'retries'?)"),
    ("jobs: many\n", "nbflow.yaml:1: 'jobs' must be an integer or null, not 'many'"),
    ("steps:\n  a:\n    timeout: soon\n", "nbflow.yaml:3: 'steps.a.timeout' must be"),
    ("include: [\n", "nbflow.yaml:2: YAML syntax error"),
    ("executor: spark\n", "'executor' must be 'local' or 'dask'"),
    ("schedule: 'every day'\n", "'schedule' is not a valid cron expression"),
    ("exclud: ['x']\n", "did you mean 'exclude'?"),
])
def test_errors_name_line_and_key(tmp_path, text, expected):
    (tmp_path / "nbflow.yaml").write_text(text)
    with pytest.raises(PipelineError) as err:
        load_config(tmp_path)
    assert expected in str(err.value)
    assert err.value.exit_code == 2


def test_all_errors_reported_together(tmp_path):
    (tmp_path / "nbflow.yaml").write_text("jobs: x\nexecutr: local\nsteps:\n  a: {retries: -1}\n")
    with pytest.raises(PipelineError) as err:
        load_config(tmp_path)
    assert len(err.value.problems) == 3
