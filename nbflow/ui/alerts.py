"""Alert hooks: `on_failure` / `on_success` from nbflow.yaml, given the run as JSON.

Owns: running a shell command (the run's JSON on stdin and in NBFLOW_RUN_JSON)
or calling `package.module:function(run_dict)` when a run ends. A listener;
a failing hook is logged, never fails the run.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

from ..events import Event, RunFinished, RunStatus

log = logging.getLogger("nbflow")
_CALLABLE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class AlertHooks:
    def __init__(self, root: Path, on_success: str | None, on_failure: str | None, timeout: float = 60):
        self.root = Path(root)
        self.on_success = on_success
        self.on_failure = on_failure
        self.timeout = timeout

    def __call__(self, event: Event) -> None:
        if not isinstance(event, RunFinished):
            return
        hook = self.on_success if event.result.status == RunStatus.SUCCEEDED else self.on_failure
        if hook:
            payload = event.result.to_json()
            payload["pipeline"] = str(self.root)
            fire(hook, payload, self.root, self.timeout)


def fire(hook: str, payload: dict, cwd: Path, timeout: float = 60) -> None:
    text = json.dumps(payload)
    if _CALLABLE.match(hook.strip()):
        module, _, func = hook.strip().partition(":")
        sys.path.insert(0, str(cwd))
        try:
            getattr(importlib.import_module(module), func)(payload)
        except Exception:  # noqa: BLE001 - an alert must never break the run
            log.exception("alert hook %s failed", hook)
        finally:
            sys.path.remove(str(cwd))
        return
    try:
        proc = subprocess.run(hook, shell=True, input=text, text=True, cwd=cwd, timeout=timeout,  # noqa: S602
                              env={**os.environ, "NBFLOW_RUN_JSON": text}, capture_output=True)
        if proc.returncode:
            log.warning("alert hook %r exited %s: %s", hook, proc.returncode, proc.stderr.strip()[-500:])
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("alert hook %r failed: %s", hook, e)
