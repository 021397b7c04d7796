"""URLs as declared paths: normal form, edges between URLs, freshness from the store's metadata.

Against a real local S3 server (moto's), never a mock of what it can provide.
"""

from __future__ import annotations

import json
import uuid

import pytest

import nbflow
from nbflow import stores
from nbflow.errors import PipelineError
from nbflow.graph import build_graph

from s3_server import s3, s3_server  # noqa: F401  (fixture)

# integration: runs with the full suite (`pytest -m "slow or not slow"`, what CI runs)
pytestmark = pytest.mark.slow


def test_a_url_is_normalised_and_a_local_path_is_not_a_url():
    assert stores.normalise("S3://bkt//raw/../raw/a.csv/") == "s3://bkt/raw/a.csv"
    assert stores.normalise("gs://bkt/x/./y.parquet") == "gs://bkt/x/y.parquet"
    assert stores.normalise("https://Example.org/data.csv?x=1") == "https://example.org/data.csv?x=1"
    assert stores.is_url("s3://b/k") and stores.is_url("abfs://c/k")
    assert not stores.is_url("../data/x.csv") and not stores.is_url("file:///data/x.csv")
    assert stores.parents("s3://b/x/y.csv") == ["s3://b/x", "s3://b"]


def test_edges_match_on_the_normalised_url_and_folder_urls(tmp_path, notebook_factory):
    notebook_factory(tmp_path / "load.ipynb", 'outputs = {"raw": "S3://bkt/raw//a.csv"}')
    notebook_factory(tmp_path / "clean.ipynb", 'inputs = {"raw": "s3://bkt/raw/a.csv"}\n'
                                               'outputs = {"clean": "s3://bkt/clean/part-1.parquet"}')
    notebook_factory(tmp_path / "report.ipynb", 'inputs = {"all": "s3://bkt/clean/", "local": "data/x.csv"}')
    notebook_factory(tmp_path / "other.ipynb", 'inputs = {"x": "s3://other-bkt/raw/a.csv"}')
    graph = build_graph(tmp_path)
    assert graph.upstream["clean"] == ("load",)
    assert graph.upstream["report"] == ("clean",)
    assert graph.upstream["other"] == ()  # another bucket is another object
    assert [ref.path for ref in graph.inputs_of("report")] == ["s3://bkt/clean", tmp_path / "data" / "x.csv"]


def test_a_missing_filesystem_package_names_what_to_install():
    with pytest.raises(PipelineError, match=r"pip install gcsfs"):
        stores.identity("gs://bkt/x.csv")


def test_identity_comes_from_metadata_and_changes_with_the_object(s3_server):
    fs = s3()
    bucket = f"b-{uuid.uuid4().hex[:8]}"
    fs.mkdir(bucket)
    fs.pipe(f"{bucket}/raw/a.csv", b"x\n1\n")
    first = stores.identity(f"s3://{bucket}/raw/a.csv")
    assert first is not None and first[0].startswith("etag:") and first[1] == 4
    assert stores.identity(f"s3://{bucket}/raw/a.csv") == first  # asked again: the same, no download
    folder = stores.identity(f"s3://{bucket}/raw")
    assert folder is not None and folder[0].startswith("tree:")
    fs.pipe(f"{bucket}/raw/a.csv", b"x\n2\n")
    assert stores.identity(f"s3://{bucket}/raw/a.csv")[0] != first[0]
    assert stores.identity(f"s3://{bucket}/raw")[0] != folder[0]
    assert stores.identity(f"s3://{bucket}/raw/missing.csv") is None
    with pytest.raises(PipelineError, match=r"the bucket no-such-bucket-[\w-]+ does not exist"):
        stores.identity(f"s3://no-such-bucket-{bucket}/x.csv")


def test_an_unreachable_store_is_an_error_naming_the_url_before_any_step(tmp_path, notebook_factory, monkeypatch,
                                                                         s3_server):
    port = s3_server.rsplit(":", 1)[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    notebook_factory(tmp_path / "read.ipynb", 'inputs = {"raw": "s3://bkt/raw.csv"}', "print(1)")
    (tmp_path / "nbflow.yaml").write_text("storage:\n  s3:\n    config_kwargs: {retries: {max_attempts: 1}}\n"
                                          "    skip_instance_cache: true\n")
    with pytest.raises(PipelineError) as raised:
        nbflow.run(tmp_path, display=False)
    message = str(raised.value)
    assert "s3://bkt/raw.csv" in message and "cannot connect" in message and "does not exist" not in message
    assert not (tmp_path / "_nbflow" / "runs").exists() or not any((tmp_path / "_nbflow" / "runs").iterdir())
    assert port  # the real server still runs; only this run's endpoint is wrong


def test_storage_options_in_nbflow_yaml_are_checked_and_never_hold_credentials(tmp_path, notebook_factory):
    notebook_factory(tmp_path / "a.ipynb", 'inputs = {}')
    (tmp_path / "nbflow.yaml").write_text("storage:\n  s3:\n    endpoint_url: http://x\n    secret: abc\n")
    with pytest.raises(PipelineError, match=r"storage.s3.secret.*credential"):
        build_graph(tmp_path)


def _pipeline(root, bucket, notebook_factory):
    """A local source file and S3 objects mixed: load (local -> s3), clean (s3 -> s3), report (s3 folder -> local)."""
    (root / "data").mkdir(parents=True)
    (root / "data" / "raw.csv").write_text("x\n1\n2\n3\n")
    notebook_factory(root / "load.ipynb",
                     f'inputs = {{"raw": "data/raw.csv"}}\noutputs = {{"raw": "s3://{bucket}/raw/raw.csv"}}',
                     'import pandas as pd\npd.read_csv(inputs["raw"]).to_csv(outputs["raw"], index=False)')
    notebook_factory(root / "clean.ipynb",
                     f'inputs = {{"raw": "s3://{bucket}/raw/raw.csv"}}\n'
                     f'outputs = {{"clean": "s3://{bucket}/clean/part-0.csv"}}',
                     'import pandas as pd\ndf = pd.read_csv(inputs["raw"])\n'
                     'df.assign(y=df.x * 2).to_csv(outputs["clean"], index=False)')
    notebook_factory(root / "report.ipynb",
                     f'inputs = {{"clean": "s3://{bucket}/clean/"}}\noutputs = {{"total": "data/total.txt"}}',
                     'import fsspec, pandas as pd\nfs, path = fsspec.core.url_to_fs(inputs["clean"])\n'
                     'total = sum(pd.read_csv(fs.open(p)).y.sum() for p in fs.find(path))\n'
                     'open(outputs["total"], "w").write(str(total))')
    return root


def test_a_pipeline_with_s3_data_runs_records_identities_and_goes_stale_on_a_changed_object(
        tmp_path, notebook_factory, s3_server):
    fs = s3()
    bucket = f"b-{uuid.uuid4().hex[:8]}"
    fs.mkdir(bucket)
    root = _pipeline(tmp_path / "pipe", bucket, notebook_factory)
    result = nbflow.run(root, display=False, jobs=2)
    assert result.ok, result.to_json()
    assert (root / "data" / "total.txt").read_text() == "12"
    assert fs.cat(f"{bucket}/clean/part-0.csv") == b"x,y\n1,2\n2,4\n3,6\n"

    again = nbflow.run(root, display=False)
    assert {s.status.value for s in again.steps.values()} == {"skipped"}

    lineage = nbflow.lineage(root, f"s3://{bucket}/clean/part-0.csv")
    assert lineage["step"] == "clean" and lineage["sha256"].startswith("etag:") and lineage["current_matches"]
    assert [i["path"] for i in lineage["inputs"]] == [f"s3://{bucket}/raw/raw.csv"]
    assert lineage["inputs"][0]["made_by"]["step"] == "load"

    fs.pipe(f"{bucket}/raw/raw.csv", b"x\n5\n")  # someone else rewrites the object
    stale = {s["name"]: s for s in _status(root)}
    assert stale["load"]["state"] == "stale"  # its output changed since it was made
    assert stale["clean"]["state"] == "stale"
    assert any(f"s3://{bucket}/raw/raw.csv" in r and "changed" in r for r in stale["clean"]["reasons"])
    assert stale["report"]["reasons"] == ["upstream clean reruns"]  # its own input is as it was


def _status(root):
    from click.testing import CliRunner  # noqa: PLC0415

    from nbflow.cli import main  # noqa: PLC0415

    out = CliRunner().invoke(main, ["status", str(root), "--json"])
    assert out.exit_code == 0, out.output
    return json.loads(out.output)["steps"]
