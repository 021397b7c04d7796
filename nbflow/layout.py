"""Where nbflow keeps what it keeps: the layout of `<pipeline>/_nbflow/`.

Owns every path below the state folder (the ledger, the lock, executed
notebooks of runs and of earlier attempts, the newest copies, published
values, the fingerprint key, the cron log). Everything else asks a
`StateLayout` for these paths and never spells them out. Imports nothing from
nbflow: every module may use it.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from pathlib import Path

STATE_DIR = "_nbflow"


def new_run_id() -> str:
    """A run's id, which names its folder `runs/<run_id>/`: when it started, then 6 random hex digits."""
    return time.strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(3)


@dataclass(frozen=True)
class StateLayout:
    """The state folder of the pipeline folder `root` (an absolute path)."""

    root: Path

    @classmethod
    def of(cls, pipeline: str | Path) -> "StateLayout":
        return cls(Path(pipeline).absolute())

    @classmethod
    def from_state_dir(cls, state_dir: str | Path) -> "StateLayout":
        return cls(Path(state_dir).absolute().parent)

    @property
    def state_dir(self) -> Path:
        return self.root / STATE_DIR

    @property
    def ledger(self) -> Path:
        return self.state_dir / "history.sqlite"

    @property
    def lock(self) -> Path:
        return self.state_dir / "lock"

    @property
    def fingerprint_key(self) -> Path:
        """The key of the keyed hashes that stand for secret values in fingerprints."""
        return self.state_dir / "fingerprint.key"

    @property
    def runs_dir(self) -> Path:
        return self.state_dir / "runs"

    def run_dir(self, run_id: str) -> Path:
        return self.runs_dir / run_id

    def executed(self, run_id: str, step: str) -> Path:
        """The executed copy of a step in a run (its last attempt)."""
        return self.run_dir(run_id) / f"{step}.ipynb"

    @property
    def attempts_dir(self) -> Path:
        return self.state_dir / "attempts"

    def attempt(self, run_id: str, step: str, attempt: int) -> Path:
        """An earlier attempt of a retried step. Outside `runs/<run_id>/`, so no step name can collide with it."""
        return self.attempts_dir / run_id / f"attempt-{attempt}" / f"{step}.ipynb"

    def latest(self, step: str) -> Path:
        return self.state_dir / "latest" / f"{step}.ipynb"

    @property
    def values_dir(self) -> Path:
        return self.state_dir / "values"

    def value(self, name: str, partition: str = "") -> Path:
        """A published value's file; an instance of a grid publishes its own under its partition folders."""
        return value_file(self.values_dir, name, partition)

    def grid_value(self, name: str) -> Path:
        """The folder of a value that a gridded step publishes: one file per instance, in partition folders."""
        return self.values_dir / f"{name}.grid"

    @property
    def cron_log(self) -> Path:
        return self.state_dir / "cron.log"

    def rel(self, path: str | Path) -> str:
        """A path below the pipeline folder, relative to it (posix)."""
        return Path(path).relative_to(self.root).as_posix()


def value_file(values_dir: Path, name: str, partition: str = "") -> Path:
    """`values/<name>`, or `values/<name>.grid/<key=value/...>/<name>` for an instance (partition) of a grid."""
    if partition:
        return values_dir / f"{name}.grid" / partition / name
    return values_dir / name
