"""How a run is carried out, resolved once from nbflow.yaml, the environment and the caller's arguments.

Owns: the one rule for each setting (an argument wins over the environment,
which wins over nbflow.yaml, which wins over the default). The Runner, the
executors and the kernel pools receive a `RunSettings` and read nothing else:
no module below looks at nbflow.yaml or at `NBFLOW_FORKSERVER` on its own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

from .config import Config

FORKSERVER_ENV = "NBFLOW_FORKSERVER"
_OFF = {"0", "false", "no", "off"}


@dataclass(frozen=True)
class RunSettings:
    jobs: int  # steps at once
    executor: str  # "local" or "dask"
    dask_address: str | None = None
    fail_fast: bool = False
    forkserver: bool = True  # kernels forked from a warm process where possible
    forkserver_off: str | None = None  # what turned the fork server off, said in each kernel's fallback reason


def resolve(config: Config, *, jobs: int | None = None, executor: str | None = None,
            dask_address: str | None = None, fail_fast: bool = False,
            environ: Mapping[str, str] | None = None) -> RunSettings:
    environ = os.environ if environ is None else environ
    forkserver, off = config.forkserver, None if config.forkserver else "forkserver: false in nbflow.yaml"
    value = environ.get(FORKSERVER_ENV)
    if value is not None and value.strip().lower() in _OFF:
        forkserver, off = False, f"{FORKSERVER_ENV}={value}"
    return RunSettings(jobs=max(1, jobs or config.jobs or os.cpu_count() or 1),
                       executor=executor or config.executor, dask_address=dask_address, fail_fast=fail_fast,
                       forkserver=forkserver, forkserver_off=off)
