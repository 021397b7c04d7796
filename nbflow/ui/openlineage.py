"""Lineage events in the OpenLineage format, sent through the `openlineage-python` client.

Owns: whether lineage is on (`openlineage:` in nbflow.yaml, else what configures
the client: OPENLINEAGE_URL, OPENLINEAGE_CONFIG, OPENLINEAGE__TRANSPORT__*, an
openlineage.yml in the current folder or ~/.openlineage/),
and `OpenLineageListener`, which turns the Runner's events into OpenLineage run
events: a job for the pipeline and one per step, each run (the pipeline's run,
each attempt of a step) with START and one of COMPLETE / FAIL / ABORT, steps
linked to the pipeline's run by the parent facet, the files a step read and
wrote as datasets with their sha256 as the dataset version, the parameters
(secrets as ***) and errors as facets. Only standard facets are used, so
Marquez, DataHub and the other consumers read every field.

The client and its transports (console, file, HTTP, Kafka, ...) are configured
as the client documents (`openlineage.yml`, environment variables), or by
`openlineage: {transport: ...}` in nbflow.yaml. Events are sent from a thread
of their own: a slow or unreachable endpoint never holds up the run, and a
failure to send is logged, never fails it. The `openlineage` package is
imported only when lineage is on; its absence then is an error naming the extra.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ..errors import PipelineError, Problem
from ..events import (Event, FileRecord, RunFinished, RunStarted, RunStatus, StepCancelled, StepFailed, StepStarted,
                      StepSucceeded)

if TYPE_CHECKING:
    from ..graph import Graph

__all__ = ["DEFAULT_NAMESPACE", "INSTALL", "OpenLineageListener", "dataset_name", "lineage_settings"]

log = logging.getLogger("nbflow")

INSTALL = 'pip install "nbflow[lineage]"'
DEFAULT_NAMESPACE = "nbflow"
#: The environment variables by which the OpenLineage client is configured (and so lineage turned on).
_CLIENT_VARIABLES = ("OPENLINEAGE_URL", "OPENLINEAGE_CONFIG")
_CLIENT_PREFIX = "OPENLINEAGE__TRANSPORT"
_CONFIG_FILE = "openlineage.yml"  # the client reads it from the current folder or ~/.openlineage/
#: How long the end of a run waits for the events still queued to be sent.
_FLUSH_TIMEOUT = 30.0
_REDACTED = "***"


def lineage_settings(configured: bool | Mapping[str, Any] | None, environ: Mapping[str, str]) -> dict[str, Any] | None:
    """The lineage settings of a run, or None when lineage is off.

    `configured` is `openlineage:` of nbflow.yaml (None: absent): `false` turns
    lineage off, `true` or a mapping turns it on. Absent, it is on where the
    OpenLineage client finds its configuration: its environment variables or
    an `openlineage.yml` in the current folder or in ~/.openlineage/.
    OPENLINEAGE_DISABLED=true (the client's switch) turns it off.
    """
    if configured is False or environ.get("OPENLINEAGE_DISABLED", "").strip().lower() == "true":
        return None
    if isinstance(configured, Mapping):
        return dict(configured)
    if configured is True:
        return {}
    if any(environ.get(name) for name in _CLIENT_VARIABLES) or any(k.startswith(_CLIENT_PREFIX) for k in environ):
        return {}
    config_files = [Path.cwd() / _CONFIG_FILE]
    if environ.get("HOME"):
        config_files.append(Path(environ["HOME"]) / ".openlineage" / _CONFIG_FILE)
    return {} if any(path.is_file() for path in config_files) else None


def dataset_name(record_path: str, root: Path) -> tuple[str, str]:
    """(namespace, name) of a file or URL, as OpenLineage names datasets.

    A local path (relative to the pipeline folder) is `file` and its absolute
    path, so that two pipelines reading one file meet at one dataset; a URL is
    `scheme://authority` and the path within it (`s3://bucket`, `key/x.parquet`).
    """
    if "://" in record_path:
        url = urlsplit(record_path)
        if url.scheme == "file":
            return "file", url.path
        return f"{url.scheme}://{url.netloc}", url.path.lstrip("/") or "/"
    return "file", os.path.normpath(root / record_path)


class OpenLineageListener:
    """Maps the Runner's events to OpenLineage run events and hands them to the client."""

    def __init__(self, graph: Graph, settings: Mapping[str, Any], client: Any = None) -> None:
        self.graph = graph
        self.root = Path(graph.root)
        self.namespace = settings.get("namespace") or os.environ.get("OPENLINEAGE_NAMESPACE") or DEFAULT_NAMESPACE
        self.secrets = set(graph.config.secrets)
        self.ol = _OpenLineage.load(self.graph)
        self.client = client if client is not None else self.ol.client(settings)
        self.pipeline = _pipeline_job_name(self.root)
        self.run_id = ""  # nbflow's id of the run
        self.run_uuid = ""  # OpenLineage's
        self.attempts: dict[str, str] = {}  # step -> the OpenLineage run id of its attempt running now
        self._queue: queue.Queue[Any] = queue.Queue()
        self._sender: threading.Thread | None = None

    def __call__(self, event: Event) -> None:
        handler = getattr(self, "_on_" + type(event).__name__, None)
        if handler is not None:
            self._send(handler(event))
        if isinstance(event, RunFinished):
            self._flush()

    # -- one OpenLineage event per nbflow event ------------------------------------------------
    def _on_RunStarted(self, e: RunStarted) -> Any:
        self.run_id = e.run_id
        self.run_uuid = self.ol.new_run_id(e.started_at)
        facets = {"processing_engine": self.ol.processing_engine(), "tags": self.ol.tags({"run_id": e.run_id})}
        if e.parameters:
            facets["executionParameters"] = self.ol.parameters(self._redacted(e.parameters))
        return self.ol.event("START", e.started_at, self.run_uuid, facets, self._pipeline_job())

    def _on_StepStarted(self, e: StepStarted) -> Any:
        self.attempts[e.step] = self.ol.new_run_id(e.started_at)
        return self._step_event("START", e.step, e.attempt, e.started_at, {},
                                inputs=self._declared(e.step, "inputs"), outputs=self._declared(e.step, "outputs"))

    def _on_StepSucceeded(self, e: StepSucceeded) -> Any:
        facets = {"executionParameters": self.ol.parameters(self._redacted(e.parameters))}
        return self._step_event("COMPLETE", e.step, e.attempt, None, facets,
                                inputs=[self._dataset(r, "input") for r in e.inputs],
                                outputs=[self._dataset(r, "output") for r in e.outputs])

    def _on_StepFailed(self, e: StepFailed) -> Any:
        facets = {"executionParameters": self.ol.parameters(self._redacted(e.parameters)),
                  "errorMessage": self.ol.error(e.error.summary(), self._language(e.step), e.error.traceback)}
        return self._step_event("FAIL", e.step, e.attempt, None, facets, inputs=self._declared(e.step, "inputs"))

    def _on_StepCancelled(self, e: StepCancelled) -> Any:
        return self._step_event("ABORT", e.step, e.attempt, None, {}, inputs=self._declared(e.step, "inputs"))

    def _on_RunFinished(self, e: RunFinished) -> Any:
        result = e.result
        state = {RunStatus.SUCCEEDED: "COMPLETE", RunStatus.CANCELLED: "ABORT"}.get(result.status, "FAIL")
        facets: dict[str, Any] = {"tags": self.ol.tags({"run_id": result.run_id})}
        if state == "FAIL":
            failed = [f"{name}: {step.status}" + (f" ({step.error.summary()})" if step.error else "")
                      for name, step in result.steps.items() if step.status in ("failed", "not_run")]
            facets["errorMessage"] = self.ol.error(f"run {result.run_id} failed: " + "; ".join(failed), "python")
        return self.ol.event(state, result.finished_at, self.run_uuid, facets, self._pipeline_job())

    # -- pieces ---------------------------------------------------------------------------------------
    def _pipeline_job(self) -> Any:
        return self.ol.job(self.namespace, self.pipeline, "DAG")

    def _step_event(self, state: str, step: str, attempt: int, at: float | None, facets: dict[str, Any], *,
                    inputs: list[Any], outputs: list[Any] | None = None) -> Any:
        run_uuid = self.attempts.pop(step, None) if state != "START" else self.attempts[step]
        if run_uuid is None:  # ended without starting (the executor failed before the attempt began)
            run_uuid = self.ol.new_run_id(at)
        facets = {**facets, "parent": self.ol.parent(run_uuid=self.run_uuid, namespace=self.namespace,
                                                    pipeline=self.pipeline),
                  "tags": self.ol.tags({"run_id": self.run_id, "step": step, "attempt": str(attempt)})}
        job = self.ol.job(self.namespace, f"{self.pipeline}.{step}", "TASK")
        return self.ol.event(state, at, run_uuid, facets, job, inputs=inputs, outputs=outputs or [])

    def _dataset(self, record: FileRecord, role: str) -> Any:
        namespace, name = dataset_name(record.path, self.root)
        return self.ol.dataset(role, namespace, name, version=record.sha256, size=record.size)

    def _declared(self, step: str, role: str) -> list[Any]:
        """The datasets a step declares (before it ran: no content identity yet)."""
        if step not in self.graph.steps:
            return []
        refs = self.graph.inputs_of(step) if role == "inputs" else self.graph.outputs_of(step)
        found = []
        for ref in refs:
            path = str(ref.path)
            namespace, name = dataset_name(path if "://" in path else os.path.relpath(path, self.root), self.root)
            found.append(self.ol.dataset(role[:-1], namespace, name))
        return found

    def _language(self, step: str) -> str:
        return self.graph.steps[step].language if step in self.graph.steps else "python"

    def _redacted(self, parameters: Mapping[str, Any]) -> dict[str, Any]:
        from ..params import is_secret_parameter  # noqa: PLC0415

        return {name: _REDACTED if is_secret_parameter(name, self.secrets) else value
                for name, value in parameters.items()}

    # -- sending ---------------------------------------------------------------------------------------
    def _send(self, event: Any) -> None:
        if self._sender is None:
            self._sender = threading.Thread(target=self._send_queued, name="nbflow-openlineage", daemon=True)
            self._sender.start()
        self._queue.put(event)

    def _send_queued(self) -> None:
        while True:
            event = self._queue.get()
            if event is None:
                break
            try:
                self.client.emit(event)
            except Exception as e:  # noqa: BLE001 - lineage must never break a run
                log.warning("OpenLineage: could not send the %s event of %s: %s", event.eventType.value,
                            event.job.name, e)
        try:
            self.client.close(_FLUSH_TIMEOUT)
        except Exception as e:  # noqa: BLE001
            log.warning("OpenLineage: closing the client failed: %s", e)

    def _flush(self) -> None:
        """The run is over: send what is queued, waiting at most _FLUSH_TIMEOUT seconds."""
        if self._sender is None:
            return
        self._queue.put(None)
        self._sender.join(_FLUSH_TIMEOUT)
        if self._sender.is_alive():
            log.warning("OpenLineage: %d event(s) of run %s were not sent within %g s; they go on being sent while "
                        "this process lives", self._queue.qsize(), self.run_id, _FLUSH_TIMEOUT)


def _pipeline_job_name(root: Path) -> str:
    """The pipeline's job: its folder, named from the project's root (`weather/notebooks`) where there is one."""
    from ..graph import project_root  # noqa: PLC0415

    project = project_root(root)
    if project is None or project == root:
        return root.name
    return f"{project.name}/{root.relative_to(project).as_posix()}"


def _iso(at: float | None) -> str:
    moment = datetime.now(timezone.utc) if at is None else datetime.fromtimestamp(at, timezone.utc)
    return moment.isoformat()


class _OpenLineage:
    """The `openlineage` package's classes, imported when lineage is on, and the facets nbflow fills in."""

    def __init__(self) -> None:
        from openlineage.client import OpenLineageClient, event_v2  # noqa: PLC0415
        from openlineage.client import __version__ as client_version  # noqa: PLC0415
        from openlineage.client.facet_v2 import (  # noqa: PLC0415
            dataset_version_dataset, error_message_run, execution_parameters_run, input_statistics_input_dataset,
            job_type_job, output_statistics_output_dataset, parent_run, processing_engine_run, tags_run)
        from openlineage.client.uuid import generate_new_uuid  # noqa: PLC0415

        from ..version import __version__  # noqa: PLC0415

        self.Client = OpenLineageClient
        self.events = event_v2
        self.client_version = client_version
        self.generate_new_uuid = generate_new_uuid
        # the modules of the facets used
        self.version = dataset_version_dataset
        self.error_facet = error_message_run
        self.parameters_facet = execution_parameters_run
        self.input_statistics = input_statistics_input_dataset
        self.output_statistics = output_statistics_output_dataset
        self.job_type = job_type_job
        self.parent_facet = parent_run
        self.engine = processing_engine_run
        self.tags_facet = tags_run
        self.nbflow_version = __version__
        #: URI of what made the events (the producer field of every event and facet): a package URL
        self.producer = f"pkg:pypi/nbflow@{__version__}"

    @classmethod
    def load(cls, graph: Graph) -> _OpenLineage:
        try:
            return cls()
        except ImportError:
            raise PipelineError(Problem(
                "OpenLineage events are turned on (`openlineage:` in nbflow.yaml, or OPENLINEAGE_URL / "
                f"OPENLINEAGE_CONFIG in the environment) but openlineage-python is not installed: {INSTALL}",
                file=graph.config.path.name if graph.config.path else None)) from None

    def client(self, settings: Mapping[str, Any]) -> Any:
        config = {"transport": dict(settings["transport"])} if settings.get("transport") else None
        try:
            return self.Client(config=config)
        except Exception as e:  # noqa: BLE001 - the client's own configuration errors, said as nbflow's
            raise PipelineError(Problem(f"the OpenLineage client cannot be configured: {e}")) from None

    def new_run_id(self, at: float | None) -> str:
        moment = datetime.now(timezone.utc) if at is None else datetime.fromtimestamp(at, timezone.utc)
        return str(self.generate_new_uuid(moment))

    def event(self, state: str, at: float | None, run_uuid: str, facets: dict[str, Any], job: Any, *,
              inputs: list[Any] | None = None, outputs: list[Any] | None = None) -> Any:
        ev = self.events
        return ev.RunEvent(eventType=ev.RunState[state], eventTime=_iso(at), producer=self.producer,
                           run=ev.Run(runId=run_uuid, facets=facets), job=job, inputs=inputs or [],
                           outputs=outputs or [])

    def job(self, namespace: str, name: str, job_type: str) -> Any:
        facet = self.job_type.JobTypeJobFacet(processingType="BATCH", integration="NBFLOW", jobType=job_type,
                                              producer=self.producer)
        return self.events.Job(namespace=namespace, name=name, facets={"jobType": facet})

    def dataset(self, role: str, namespace: str, name: str, *, version: str | None = None,
                size: int | None = None) -> Any:
        facets: dict[str, Any] = {} if version is None else {
            "version": self.version.DatasetVersionDatasetFacet(datasetVersion=version, producer=self.producer)}
        stats: dict[str, Any] = {}
        if role == "input":
            if size is not None:
                stats["inputStatistics"] = self.input_statistics.InputStatisticsInputDatasetFacet(
                    size=size, producer=self.producer)
            return self.events.InputDataset(namespace=namespace, name=name, facets=facets, inputFacets=stats)
        if size is not None:
            stats["outputStatistics"] = self.output_statistics.OutputStatisticsOutputDatasetFacet(
                size=size, producer=self.producer)
        return self.events.OutputDataset(namespace=namespace, name=name, facets=facets, outputFacets=stats)

    def parent(self, *, run_uuid: str, namespace: str, pipeline: str) -> Any:
        p = self.parent_facet
        return p.ParentRunFacet(run=p.Run(runId=run_uuid), job=p.Job(namespace=namespace, name=pipeline),
                                root=p.Root(run=p.RootRun(runId=run_uuid),
                                            job=p.RootJob(namespace=namespace, name=pipeline)),
                                producer=self.producer)

    def parameters(self, parameters: Mapping[str, Any]) -> Any:
        f = self.parameters_facet
        return f.ExecutionParametersRunFacet(
            parameters=[f.ExecutionParameter(key=name, value=value if isinstance(value, str)
                                             else json.dumps(value, default=repr))
                        for name, value in parameters.items()], producer=self.producer)

    def error(self, message: str, language: str, stack_trace: str | None = None) -> Any:
        return self.error_facet.ErrorMessageRunFacet(message=message, programmingLanguage=language,
                                                     stackTrace=stack_trace or None, producer=self.producer)

    def processing_engine(self) -> Any:
        return self.engine.ProcessingEngineRunFacet(version=self.nbflow_version, name="nbflow",
                                                    openlineageAdapterVersion=self.client_version,
                                                    producer=self.producer)

    def tags(self, values: Mapping[str, str]) -> Any:
        t = self.tags_facet
        return t.TagsRunFacet(tags=[t.TagsRunFacetFields(key=f"nbflow.{key}", value=value, source="NBFLOW")
                                    for key, value in values.items()], producer=self.producer)
