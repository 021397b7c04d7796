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
    ("steps:\n  a:\n    grid: [1, 2]\n", "nbflow.yaml:3: 'steps.a.grid' must be a mapping, not [1, 2]"),
    ("steps:\n  a:\n    gird: {x: [1]}\n", "nbflow.yaml:3: unknown key 'steps.a.gird' (did you mean 'grid'?)"),
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


@pytest.mark.parametrize("text, expected", [
    ("defaults:\n  timeout: -5\n", "nbflow.yaml:2: 'defaults.timeout' must be more than 0 seconds, or null for no "
                                   "limit, not -5"),
    ("steps:\n  a:\n    timeout: 0\n", "nbflow.yaml:3: 'steps.a.timeout' must be more than 0 seconds"),
    ("steps:\n  a:\n    cell_timeout: -0.5\n", "nbflow.yaml:3: 'steps.a.cell_timeout' must be more than 0 seconds, "
                                               "or null for no limit, not -0.5"),
    ("defaults:\n  cell_timeout: .nan\n", "nbflow.yaml:2: 'defaults.cell_timeout' must be more than 0 seconds"),
    ("defaults:\n  retry_delay: -1\n", "nbflow.yaml:2: 'defaults.retry_delay' must be a number of seconds, at least 0, "
                                       "not -1"),
    ("steps:\n  a:\n    retry_delay: .inf\n", "nbflow.yaml:3: 'steps.a.retry_delay' must be a number of seconds"),
    ("steps:\n  a:\n    retries: -1\n", "nbflow.yaml:3: 'steps.a.retries' must be at least 0"),
])
def test_numbers_out_of_bounds_name_line_and_key(tmp_path, text, expected):
    (tmp_path / "nbflow.yaml").write_text(text)
    with pytest.raises(PipelineError) as err:
        load_config(tmp_path)
    assert expected in str(err.value)


def test_bounds_allow_zero_delay_and_no_limit(tmp_path):
    (tmp_path / "nbflow.yaml").write_text("defaults: {retry_delay: 0, timeout: null, cell_timeout: 0.5}\n"
                                          "steps:\n  a: {timeout: 600}\n")
    config = load_config(tmp_path)
    assert (config.defaults.retry_delay, config.defaults.timeout, config.defaults.cell_timeout) == (0, None, 0.5)
    assert config.for_step("a").timeout == 600


def test_a_grid_is_read_with_the_line_of_each_key_and_instances_share_their_steps_settings(tmp_path):
    (tmp_path / "nbflow.yaml").write_text("steps:\n  train:\n    retries: 2\n    grid:\n      alpha: [0.1, 1.0]\n"
                                          "      seed: [1, 2]\n")
    config = load_config(tmp_path)
    assert config.steps["train"].grid == {"alpha": [0.1, 1.0], "seed": [1, 2]}
    assert config.grid_lines == {"train": {"": 4, "alpha": 5, "seed": 6}}
    assert config.for_step("train[alpha=0.1,seed=2]").retries == 2


@pytest.mark.parametrize("options, refused", [
    ("{key: AKIA123, secret: abc}", ["storage.s3.key", "storage.s3.secret"]),
    ("{token: abc}", ["storage.s3.token"]),
    ("{password: x, username: y}", ["storage.s3.password", "storage.s3.username"]),
    ("{client_kwargs: {aws_secret_access_key: x, region_name: eu-west-1}}",
     ["storage.s3.client_kwargs.aws_secret_access_key"]),
    ("{client_kwargs: {aws_access_key_id: x, aws_session_token: y}}",
     ["storage.s3.client_kwargs.aws_access_key_id", "storage.s3.client_kwargs.aws_session_token"]),
    ("{account_name: acct, account_key: x}", ["storage.s3.account_key"]),  # adlfs's, whatever the protocol
    ("{connection_string: 'AccountKey=x', sas_token: y, client_secret: z}",
     ["storage.s3.connection_string", "storage.s3.sas_token", "storage.s3.client_secret"]),
    ("{headers: {Authorization: Bearer x}}", ["storage.s3.headers.Authorization"]),
    ("{token: {type: service_account, private_key: x}}", ["storage.s3.token"]),
])
def test_storage_options_that_hold_credentials_are_refused_by_name(tmp_path, options, refused):
    (tmp_path / "nbflow.yaml").write_text(f"storage:\n  s3: {options}\n")
    with pytest.raises(PipelineError) as err:
        load_config(tmp_path)
    said = str(err.value)
    for key in refused:
        assert f"nbflow.yaml:2: '{key}' is a credential" in said
    assert len(err.value.problems) == len(refused)
    assert "never from nbflow.yaml" in said


@pytest.mark.parametrize("options", [
    "{sse_kms_key_id: arn:aws:kms:eu-west-1:1:key/abc, requester_pays: true}",
    "{s3_additional_kwargs: {ServerSideEncryption: 'aws:kms', SSEKMSKeyId: abc}}",
    "{endpoint_url: 'http://minio:9000', anon: false, profile: dev, client_kwargs: {region_name: eu-west-1}}",
    "{key_prefix: raw, cache_key_length: 8, use_listings_cache: false}",
    "{token: anon, project: p}",  # gcsfs: a way to sign in, not a credential
])
def test_storage_options_that_merely_mention_a_key_are_accepted(tmp_path, options):
    (tmp_path / "nbflow.yaml").write_text(f"storage:\n  s3: {options}\n")
    config = load_config(tmp_path)
    assert config.storage["s3"]
