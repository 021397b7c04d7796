"""OpenLineage run events (nbflow/ui/openlineage.py), sent through the openlineage-python client.

The events are checked as a lineage backend would receive them: written by the
client's file transport and validated against the OpenLineage JSON schema (and
each facet against its own schema, tests/openlineage_spec/), and POSTed by its
HTTP transport to a server started in the test (OPENLINEAGE_URL).
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from referencing import Registry, Resource

import nbflow
from conftest import write_notebook
from nbflow.errors import PipelineError
from nbflow.ui.openlineage import dataset_name, lineage_settings

SPEC = Path(__file__).parent / "openlineage_spec"
SECRET = "tok-9f8e7d6c5b4a"


@pytest.fixture(autouse=True)
def client_environment(monkeypatch: pytest.MonkeyPatch) -> Any:
    """No OpenLineage variable from outside; none left behind (the client adds OPENLINEAGE__TRANSPORT__... itself)."""
    for name in [n for n in os.environ if n.startswith("OPENLINEAGE")]:
        monkeypatch.delenv(name)
    yield
    for name in [n for n in os.environ if n.startswith("OPENLINEAGE")]:
        del os.environ[name]


def weather_pipeline(root: Path, openlineage: str | None = None) -> Path:
    """load -> clean, with an ordinary parameter and a secret one; `openlineage` is nbflow.yaml's setting."""
    write_notebook(root / "load.ipynb", 'outputs = {"raw": "data/raw.csv"}\nmin_year = 2012\napi_token = "none"',
                   'import os\nos.makedirs("data", exist_ok=True)\n'
                   'open(outputs["raw"], "w").write(f"year\\n{min_year}\\n{len(api_token)}\\n")')
    write_notebook(root / "clean.ipynb", 'inputs = {"raw": "data/raw.csv"}\noutputs = {"clean": "data/clean.csv"}',
                   'open(outputs["clean"], "w").write(open(inputs["raw"]).read().upper())')
    if openlineage is not None:
        (root / "nbflow.yaml").write_text(f"openlineage: {openlineage}\n")
    return root


def file_transport(path: Path, namespace: str = "weather") -> str:
    return json.dumps({"namespace": namespace, "transport": {"type": "file", "log_file_path": str(path),
                                                              "append": True}})


def read_events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def validator() -> Any:
    """Validates an event, or (with `$ref` to a `_schemaURL`) a facet, against the schemas in tests/openlineage_spec."""
    resources = []
    for path in [SPEC / "OpenLineage.json", *sorted((SPEC / "facets").glob("*.json"))]:
        schema = json.loads(path.read_text())
        resources.append((schema["$id"], Resource.from_contents(schema)))
    registry = Registry().with_resources(resources)

    def validate(instance: Any, schema_url: str) -> None:
        jsonschema.Draft202012Validator({"$ref": schema_url}, registry=registry,
                                        format_checker=jsonschema.FormatChecker()).validate(instance)

    return validate


def facets_of(event: dict) -> list[dict]:
    found = list(event["run"].get("facets", {}).values()) + list(event["job"].get("facets", {}).values())
    for dataset in event.get("inputs", []) + event.get("outputs", []):
        for key in ("facets", "inputFacets", "outputFacets"):
            found += list(dataset.get(key, {}).values())
    return found


def validate_all(events: list[dict]) -> None:
    validate = validator()
    for event in events:
        validate(event, "https://openlineage.io/spec/2-0-2/OpenLineage.json")
        validate(event, "https://openlineage.io/spec/2-0-2/OpenLineage.json#/$defs/RunEvent")
        for facet in facets_of(event):
            validate(facet, facet["_schemaURL"])  # a facet whose schema is not in tests/openlineage_spec fails here


def by_job(events: list[dict]) -> list[tuple[str, str]]:
    return [(e["job"]["name"], e["eventType"]) for e in events]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_events_of_a_run_are_valid_openlineage_with_datasets_versions_and_parameters(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "events.jsonl"
    root = weather_pipeline(tmp_path / "weather", file_transport(log))
    monkeypatch.setenv("NBFLOW_SECRET_API_TOKEN", SECRET)
    result = nbflow.run(root, parameters={"min_year": 2014}, display=False)
    assert result.ok
    events = read_events(log)
    validate_all(events)
    assert by_job(events) == [("weather", "START"), ("weather.load", "START"), ("weather.load", "COMPLETE"),
                              ("weather.clean", "START"), ("weather.clean", "COMPLETE"), ("weather", "COMPLETE")]
    assert {e["job"]["namespace"] for e in events} == {"weather"}
    assert SECRET not in log.read_text()

    pipeline_run = events[0]["run"]["runId"]
    assert events[-1]["run"]["runId"] == pipeline_run
    assert events[0]["job"]["facets"]["jobType"]["jobType"] == "DAG"
    assert events[0]["run"]["facets"]["processing_engine"]["name"] == "nbflow"
    tags = {t["key"]: t["value"] for t in events[0]["run"]["facets"]["tags"]["tags"]}
    assert tags["nbflow.run_id"] == result.run_id
    for start, end in ((events[1], events[2]), (events[3], events[4])):
        assert start["run"]["runId"] == end["run"]["runId"] != pipeline_run
        parent = end["run"]["facets"]["parent"]
        assert parent["run"]["runId"] == parent["root"]["run"]["runId"] == pipeline_run
        assert (parent["job"]["namespace"], parent["job"]["name"]) == ("weather", "weather")
        assert end["job"]["facets"]["jobType"]["jobType"] == "TASK"

    raw, clean = root / "data" / "raw.csv", root / "data" / "clean.csv"
    load_done, clean_start, clean_done = events[2], events[3], events[4]
    assert [(o["namespace"], o["name"]) for o in load_done["outputs"]] == [("file", str(raw))]
    assert load_done["outputs"][0]["facets"]["version"]["datasetVersion"] == sha256(raw)
    assert load_done["outputs"][0]["outputFacets"]["outputStatistics"]["size"] == raw.stat().st_size
    assert [(i["namespace"], i["name"]) for i in clean_start["inputs"]] == [("file", str(raw))]  # declared
    assert [(i["name"], i["facets"]["version"]["datasetVersion"]) for i in clean_done["inputs"]] == [
        (str(raw), sha256(raw))]
    assert [(o["name"], o["facets"]["version"]["datasetVersion"]) for o in clean_done["outputs"]] == [
        (str(clean), sha256(clean))]

    parameters = {p["key"]: p["value"] for p in load_done["run"]["facets"]["executionParameters"]["parameters"]}
    assert parameters["min_year"] == "2014" and parameters["api_token"] == "***"
    given = {p["key"]: p["value"] for p in events[0]["run"]["facets"]["executionParameters"]["parameters"]}
    assert given == {"min_year": "2014"}


def test_a_failed_step_is_fail_with_its_error_and_the_run_fails(tmp_path: Path) -> None:
    log = tmp_path / "events.jsonl"
    root = weather_pipeline(tmp_path / "weather", file_transport(log))
    write_notebook(root / "boom.ipynb", 'inputs = {"raw": "data/raw.csv"}\nvalue = 0', "y = 10 / value")
    result = nbflow.run(root, display=False)
    assert not result.ok
    events = read_events(log)
    validate_all(events)
    boom = [e for e in events if e["job"]["name"] == "weather.boom"]
    assert [e["eventType"] for e in boom] == ["START", "FAIL"]
    error = boom[1]["run"]["facets"]["errorMessage"]
    assert error["message"].startswith("ZeroDivisionError: division by zero")
    assert error["programmingLanguage"] == "python" and "ZeroDivisionError" in error["stackTrace"]
    assert boom[1]["outputs"] == []
    assert by_job(events)[-1] == ("weather", "FAIL")
    assert "boom: failed" in events[-1]["run"]["facets"]["errorMessage"]["message"]


def test_a_cancelled_run_is_abort_for_the_run_and_its_running_step(tmp_path: Path) -> None:
    log = tmp_path / "events.jsonl"
    root = tmp_path / "hangs"
    write_notebook(root / "sleepy.ipynb", "seconds = 60", "import time\ntime.sleep(seconds)")
    (root / "nbflow.yaml").write_text(f"openlineage: {file_transport(log, 'ns')}\n")
    handle = nbflow.run(root, background=True, display=False)
    deadline = time.monotonic() + 60
    while not (log.exists() and '"hangs.sleepy"' in log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # into the sleeping cell
    handle.cancel()
    handle.wait()
    events = read_events(log)
    validate_all(events)
    assert by_job(events) == [("hangs", "START"), ("hangs.sleepy", "START"), ("hangs.sleepy", "ABORT"),
                              ("hangs", "ABORT")]


class _Collector(http.server.BaseHTTPRequestHandler):
    received: list[tuple[str, str, dict]] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append((self.path, self.headers.get("Content-Type", ""), json.loads(body)))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def lineage_server() -> Any:
    _Collector.received = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _Collector.received
    server.shutdown()
    server.server_close()
    thread.join()


def test_openlineage_url_turns_lineage_on_and_events_are_posted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lineage_server: tuple[str, list]) -> None:
    url, received = lineage_server
    monkeypatch.setenv("OPENLINEAGE_URL", url)
    root = tmp_path / "shop"
    write_notebook(root / "ok.ipynb", 'outputs = {"sales": "sales.csv"}', 'open(outputs["sales"], "w").write("1")')
    write_notebook(root / "bad.ipynb", "value = 0", "y = 1 / value")  # no nbflow.yaml: the environment turns it on

    assert not nbflow.run(root, display=False).ok
    assert {(path, kind.split(";")[0]) for path, kind, _ in received} == {("/api/v1/lineage", "application/json")}
    events = [event for _, _, event in received]
    validate_all(events)
    assert {e["job"]["namespace"] for e in events} == {"nbflow"}  # the default namespace
    pairs = by_job(events)
    assert pairs[0] == ("shop", "START") and pairs[-1] == ("shop", "FAIL")
    assert [p for p in pairs if p[0] == "shop.ok"] == [("shop.ok", "START"), ("shop.ok", "COMPLETE")]
    assert [p for p in pairs if p[0] == "shop.bad"] == [("shop.bad", "START"), ("shop.bad", "FAIL")]

    received.clear()
    assert nbflow.run(root, ["ok"], force=True, display=False).ok
    assert by_job([event for _, _, event in received]) == [
        ("shop", "START"), ("shop.ok", "START"), ("shop.ok", "COMPLETE"), ("shop", "COMPLETE")]


def test_an_unreachable_endpoint_is_logged_and_never_fails_the_run(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    transport = {"type": "http", "url": f"http://127.0.0.1:{port}", "retry": {"total": 0, "connect": 0, "read": 0}}
    root = weather_pipeline(tmp_path / "weather", json.dumps({"transport": transport}))
    with caplog.at_level("WARNING", logger="nbflow"):
        assert nbflow.run(root, display=False).ok
    assert any("OpenLineage: could not send the START event of weather" in r.getMessage() for r in caplog.records)


def test_on_and_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert lineage_settings(None, {}) is None  # off by default
    assert lineage_settings(None, {"OPENLINEAGE_URL": "http://x"}) == {}
    assert lineage_settings(None, {"OPENLINEAGE_CONFIG": "/etc/openlineage.yml"}) == {}
    assert lineage_settings(None, {"OPENLINEAGE__TRANSPORT__TYPE": "console"}) == {}
    assert lineage_settings(None, {"OPENLINEAGE_NAMESPACE": "x"}) is None  # names jobs, configures no transport
    assert lineage_settings(True, {}) == {}
    assert lineage_settings({"namespace": "etl"}, {}) == {"namespace": "etl"}
    assert lineage_settings(False, {"OPENLINEAGE_URL": "http://x"}) is None  # nbflow.yaml says no
    assert lineage_settings(None, {"OPENLINEAGE_URL": "http://x", "OPENLINEAGE_DISABLED": "true"}) is None
    assert lineage_settings(True, {"OPENLINEAGE_DISABLED": "TRUE"}) is None
    home = tmp_path / "home"
    (home / ".openlineage").mkdir(parents=True)
    assert lineage_settings(None, {"HOME": str(home)}) is None
    (home / ".openlineage" / "openlineage.yml").write_text("transport: {type: console}\n")
    assert lineage_settings(None, {"HOME": str(home)}) == {}  # the client's configuration file
    (tmp_path / "openlineage.yml").write_text("transport: {type: console}\n")
    assert lineage_settings(None, {}) == {}  # in the current folder


def test_openlineage_namespace_names_the_jobs_unless_nbflow_yaml_does(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "events.jsonl"
    root = weather_pipeline(tmp_path / "weather", json.dumps({"transport": {"type": "file", "log_file_path": str(log),
                                                                           "append": True}}))
    monkeypatch.setenv("OPENLINEAGE_NAMESPACE", "from-env")
    assert nbflow.run(root, display=False).ok
    assert {e["job"]["namespace"] for e in read_events(log)} == {"from-env"}


def test_datasets_are_named_as_openlineage_names_files_and_urls(tmp_path: Path) -> None:
    assert dataset_name("data/x.csv", tmp_path) == ("file", str(tmp_path / "data" / "x.csv"))
    assert dataset_name("../shared/y.csv", tmp_path / "p") == ("file", str(tmp_path / "shared" / "y.csv"))
    assert dataset_name("s3://bucket/raw/2024/x.parquet", tmp_path) == ("s3://bucket", "raw/2024/x.parquet")
    assert dataset_name("gs://b/k", tmp_path) == ("gs://b", "k")
    assert dataset_name("https://example.org/data.csv", tmp_path) == ("https://example.org", "data.csv")
    assert dataset_name("file:///srv/data.csv", tmp_path) == ("file", "/srv/data.csv")


def test_the_client_missing_when_lineage_is_on_says_which_extra_to_install(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = weather_pipeline(tmp_path / "weather", "true")
    monkeypatch.setitem(sys.modules, "openlineage.client", None)  # as if openlineage-python were not installed
    with pytest.raises(PipelineError, match=r'pip install "nbflow\[lineage\]"') as raised:
        nbflow.run(root, display=False)
    assert raised.value.exit_code == 2
    (root / "nbflow.yaml").write_text("openlineage: false\n")
    assert nbflow.run(root, display=False).ok  # the lock was released


def test_openlineage_settings_in_nbflow_yaml_are_checked(tmp_path: Path) -> None:
    root = weather_pipeline(tmp_path / "a", "{namespce: etl}")
    with pytest.raises(PipelineError, match=r"nbflow.yaml:1: unknown key 'openlineage.namespce' .*namespace"):
        nbflow.run(root, display=False)
    root = weather_pipeline(tmp_path / "b", "3")
    with pytest.raises(PipelineError, match="'openlineage' must be true or false or a mapping, not 3"):
        nbflow.run(root, display=False)


def test_lineage_is_off_by_default_and_then_imports_nothing_of_openlineage(tmp_path: Path) -> None:
    root = weather_pipeline(tmp_path / "weather")
    code = ("import sys, nbflow; assert nbflow.run(sys.argv[1], display=False).ok; "
            "print(sorted(m for m in sys.modules if m.startswith('openlineage')))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENLINEAGE")}
    env["HOME"] = str(tmp_path)  # no ~/.openlineage/openlineage.yml
    done = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True, env=env,
                          timeout=120, check=True, cwd=tmp_path)
    assert done.stdout.strip() == "[]"
