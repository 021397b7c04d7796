"""What nbflow remembers: the run ledger, fingerprints, freshness and the run lock.

Owns: `_nbflow/history.sqlite` (schema, versioning, transactions), file
hashing (with a stat cache), step fingerprints and the reasons a step is
stale, and `_nbflow/lock`. The ledger is written by `LedgerRecorder`, a
listener of the Runner's events; nothing here executes notebooks.
"""

from __future__ import annotations

import difflib
import fcntl
import hashlib
import hmac
import json
import os
import socket
import sqlite3
import stat
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

from . import stores
from .errors import LedgerDamaged, PipelineError, PipelineLocked, Problem, StateError
from .events import (Event, FileRecord, RunFinished, RunStarted, RunStatus, StepCancelled, StepFailed,
                     StepNotRun, StepSkipped, StepStarted, StepSucceeded, cell_label)
from .graph import FileRef, Graph, relative_to
from .grid import folded
from .imports import project_modules
from .layout import StateLayout
from .params import EnvRef, ValueRef, is_secret_parameter
from .version import __version__

SCHEMA_VERSION = 3  # 2: runs.audit, step_runs.worker; 3: step_runs.error_execution
REDACTED = "***"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, started_at REAL NOT NULL, finished_at REAL, status TEXT NOT NULL,
    pid INTEGER, host TEXT, parameters TEXT, plan TEXT, nbflow_version TEXT, audit TEXT);
CREATE TABLE IF NOT EXISTS step_runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT NOT NULL REFERENCES runs(run_id),
    step TEXT NOT NULL, attempt INTEGER NOT NULL, status TEXT NOT NULL,
    started_at REAL, finished_at REAL, duration_s REAL, notebook TEXT,
    fingerprint TEXT, fingerprint_parts TEXT, parameters TEXT, reasons TEXT,
    error_kind TEXT, error_name TEXT, error_value TEXT, error_cell INTEGER, error_traceback TEXT, worker TEXT,
    error_execution INTEGER);
CREATE TABLE IF NOT EXISTS files (
    step_run_id INTEGER NOT NULL REFERENCES step_runs(id), role TEXT NOT NULL,
    label TEXT NOT NULL, path TEXT NOT NULL, sha256 TEXT NOT NULL, size INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS file_cache (
    path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, sha256 TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS step_runs_by_step ON step_runs(step, status, finished_at);
CREATE INDEX IF NOT EXISTS files_by_path ON files(path);
"""


# file_cache rows read in one query by a ledger (beyond that, one query per file)
_MAX_PRELOADED_HASHES = 50_000


def redact(parameters: dict[str, Any], secrets: tuple[str, ...] | set[str] = ()) -> dict[str, Any]:
    return {k: (REDACTED if is_secret_parameter(k, secrets) else v) for k, v in parameters.items()}


class Ledger:
    """The run ledger of one pipeline. Every write is one transaction.

    Every statement goes through `_LedgerConnection`, which turns a damaged
    file into LedgerDamaged. Opened to write a run (`create=True`), the file is
    checked first (PRAGMA quick_check), so that damage is found before any
    step starts.
    """

    def __init__(self, state_dir: Path, *, create: bool = True):
        self.state_dir = Path(state_dir)
        self.root = self.state_dir.parent
        self._root_prefix = os.path.join(str(self.root), "")
        # file_cache, read in one query when first needed (None: not yet; False: too large, read per file),
        # and the rows hashed since, written with the next transaction or at close()
        self._hashes: dict[str, tuple[int, int, str]] | None | bool = None
        self._unsaved_hashes: dict[str, tuple[int, int, str]] = {}
        path = StateLayout.from_state_dir(self.state_dir).ledger
        self.path = path
        try:
            if create:
                self.state_dir.mkdir(parents=True, exist_ok=True)
            elif not path.exists():
                self.conn = self._connect(":memory:")
                self._init()
                return
            self.conn = self._connect(path, timeout=30)
            try:
                self._init()
            except sqlite3.OperationalError:
                if create or os.access(self.state_dir, os.W_OK):
                    raise
                # a read-only _nbflow/ (read-only mount): read the ledger without its WAL index
                self.conn.close()
                self.conn = self._connect(f"{path.absolute().as_uri()}?immutable=1", uri=True)
                self._init()
            if create:
                self.check()
        except LedgerDamaged:
            self.conn.close()
            raise
        except (OSError, sqlite3.Error) as e:
            raise StateError(f"cannot open the run ledger {path}: {e}; check that {self.state_dir} is "
                             "writable and the disk is not full") from None

    def _connect(self, database: str | Path, **options: Any) -> _LedgerConnection:
        conn = sqlite3.connect(database, isolation_level=None, check_same_thread=False, factory=_LedgerConnection,
                               **options)
        assert isinstance(conn, _LedgerConnection)
        conn.ledger = self
        return conn

    def _init(self) -> None:
        version = self.conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StateError(f"{self.path} was written by a newer nbflow (schema {version}); upgrade nbflow")
        if version == 0:
            try:
                self.conn.execute("PRAGMA journal_mode=WAL")
            except sqlite3.Error:
                pass
            self.conn.executescript(f"BEGIN; {_SCHEMA} PRAGMA user_version={SCHEMA_VERSION}; COMMIT;")
        elif version < SCHEMA_VERSION:
            # nbflow 0.1's ledger (1): the runs get an audit column, the steps a worker; before 3, a failed
            # step's In [n] (error_execution: its old rows keep their error_cell, shown as 'cell 4')
            added = {1: ["runs ADD COLUMN audit TEXT", "step_runs ADD COLUMN worker TEXT"],
                     2: ["step_runs ADD COLUMN error_execution INTEGER"]}
            alter = "".join(f"ALTER TABLE {change}; " for v in range(version, SCHEMA_VERSION) for change in added[v])
            try:
                self.conn.executescript(f"BEGIN; {alter}PRAGMA user_version={SCHEMA_VERSION}; COMMIT;")
            except sqlite3.OperationalError:
                _rollback(self.conn)  # read-only: read it as it is (columns it lacks read as NULL)

    def check(self, thorough: bool = False) -> None:
        """Raise LedgerDamaged unless sqlite finds the file sound (quick_check; integrity_check if `thorough`)."""
        pragma = "integrity_check" if thorough else "quick_check"
        problems = [row[0] for row in self.conn.execute(f"PRAGMA {pragma}").fetchall()]
        if problems != ["ok"]:
            first = " ".join(str(problems[0] if problems else "no answer").split())
            raise self.damaged(f"{pragma}: {first[:200]}")

    def damaged(self, detail: str) -> LedgerDamaged:
        return LedgerDamaged(str(self.path), detail, str(self.root))

    def transaction(self):
        return _Transaction(self)

    def close(self) -> None:
        if self._unsaved_hashes:
            try:
                with self.transaction():
                    pass  # writes them
            except (StateError, LedgerDamaged):
                pass  # a cache: the files are hashed again next time
        self.conn.close()

    # -- files -------------------------------------------------------------------
    def rel(self, path: Path | str) -> str:
        """A path as the ledger records it: relative to the pipeline folder; a URL as it is."""
        if isinstance(path, str) and stores.is_url(path):
            return path
        text = os.fspath(path)
        if text.startswith(self._root_prefix):  # the usual case, without pathlib's cost
            return text[len(self._root_prefix):].replace(os.sep, "/")
        return relative_to(Path(path), self.root)

    def _cached_hash(self, key: str) -> tuple[int, int, str] | None:
        """file_cache's row for `key`: (size, mtime_ns, sha256). A pipeline asks for hundreds: one query reads all."""
        if key in self._unsaved_hashes:
            return self._unsaved_hashes[key]
        if self._hashes is None:
            rows = self.conn.execute("SELECT path, size, mtime_ns, sha256 FROM file_cache LIMIT ?",
                                     (_MAX_PRELOADED_HASHES + 1,)).fetchall()
            self._hashes = {r[0]: (r[1], r[2], r[3]) for r in rows} if len(rows) <= _MAX_PRELOADED_HASHES else False
        if self._hashes is not False:
            assert isinstance(self._hashes, dict)
            return self._hashes.get(key)
        row = self.conn.execute("SELECT size, mtime_ns, sha256 FROM file_cache WHERE path=?", (key,)).fetchone()
        return (row[0], row[1], row[2]) if row else None

    def _write_unsaved_hashes(self, c: sqlite3.Connection) -> None:
        """Inside a transaction: the file hashes computed since the last one (a cache, so no fsync of their own)."""
        unsaved, self._unsaved_hashes = self._unsaved_hashes, {}
        c.executemany("INSERT OR REPLACE INTO file_cache VALUES (?,?,?,?)",
                      [(key, *row) for key, row in unsaved.items()])
        if isinstance(self._hashes, dict):
            self._hashes.update(unsaved)

    def file_hash(self, path: Path | str, storage: Mapping[str, Mapping[str, Any]] | None = None
                  ) -> tuple[str, int] | None:
        """(sha256, size) of a file or a folder, or None when it does not exist.

        A folder's hash covers the names and contents of every file below it
        (see `tree`). Files are hashed once per (size, mtime_ns). Anything that
        is neither (a FIFO, a device) is a PipelineError: reading it could hang.
        A URL's identity comes from the store's metadata (`etag:...`, see
        stores.identity; `storage` is nbflow.yaml's options), never from its bytes.
        """
        if isinstance(path, str):
            return stores.identity(path, storage)
        try:
            st = os.stat(path)
        except OSError:
            return None
        if stat.S_ISDIR(st.st_mode):
            return stores.tree_identity(self.tree(path))
        if not stat.S_ISREG(st.st_mode):
            raise PipelineError(Problem(
                f"{self.rel(path)} is {_file_kind(st.st_mode)}, not a regular file or folder; nbflow hashes what "
                "a step reads and writes to know whether it changed: declare a file or a folder instead"))
        key = self.rel(path)
        row = self._cached_hash(key)
        if row and row[0] == st.st_size and row[1] == st.st_mtime_ns:
            return row[2], st.st_size
        sha = sha256_file(path)
        # written with the next transaction (a step's success records the file anyway) or at close(); a
        # read-only ledger (status) just hashes again next time
        self._unsaved_hashes[key] = (st.st_size, st.st_mtime_ns, sha)
        return sha, st.st_size

    def describe(self, path: Path | str, storage: Mapping[str, Mapping[str, Any]] | None = None
                 ) -> tuple[tuple[str, int] | None, dict[str, tuple[str, int]] | None]:
        """`file_hash` and, for a folder, its files (as `tree` gives them), walking or listing it once."""
        if isinstance(path, str):
            return stores.describe(path, storage)
        if os.path.isdir(path):
            files = self.tree(path)
            return stores.tree_identity(files), files
        return self.file_hash(path), None

    def tree(self, folder: Path | str, storage: Mapping[str, Mapping[str, Any]] | None = None
             ) -> dict[str, tuple[str, int]]:
        """Every file below `folder` (relative posix path -> (sha256, size)), sorted by path."""
        if isinstance(folder, str):
            return stores.tree(folder, storage)
        files: dict[str, tuple[str, int]] = {}
        for current, dirs, names in os.walk(folder):
            dirs.sort()
            for name in sorted(names):
                path = os.path.join(current, name)
                hashed = self.file_hash(Path(path))
                if hashed is not None and not hashed[0].startswith("tree:"):
                    files[Path(os.path.relpath(path, folder)).as_posix()] = hashed
        return dict(sorted(files.items()))

    def file_records(self, refs: list[FileRef], storage: Mapping[str, Mapping[str, Any]] | None = None
                     ) -> tuple[FileRecord, ...]:
        records = []
        for ref in refs:
            hashed = self.file_hash(ref.path, storage)
            if hashed is not None:
                records.append(FileRecord(ref.label, self.rel(ref.path), hashed[0], hashed[1]))
        return tuple(records)

    # -- queries -----------------------------------------------------------------
    def last_success(self, step: str) -> dict[str, Any] | None:
        row = self.conn.execute(
            "SELECT id, run_id, fingerprint, fingerprint_parts, finished_at FROM step_runs "
            "WHERE step=? AND status='succeeded' ORDER BY finished_at DESC, id DESC LIMIT 1", (step,)).fetchone()
        if row is None:
            return None
        outputs = self.conn.execute("SELECT label, path, sha256, size FROM files WHERE step_run_id=? AND role='output'",
                                    (row[0],)).fetchall()
        return {"id": row[0], "run_id": row[1], "fingerprint": row[2], "parts": json.loads(row[3] or "{}"),
                "finished_at": row[4], "outputs": [FileRecord(*o) for o in outputs]}

    def failed_since(self, step: str, since: float) -> tuple[str, str] | None:
        """(run_id, status) of the newest failed, cancelled or interrupted attempt after `since`."""
        row = self.conn.execute(
            "SELECT run_id, status FROM step_runs WHERE step=? AND status IN ('failed','cancelled','interrupted') "
            "AND started_at > ? ORDER BY started_at DESC LIMIT 1", (step, since)).fetchone()
        return (row[0], row[1]) if row else None

    def runs(self, limit: int | None = None, *, run_id: str | None = None) -> list[dict[str, Any]]:
        """Past runs, newest first (`run_id`: that one only), with their step counts."""
        audit = "audit" if self._has_audit() else "NULL"
        sql = (f"SELECT run_id, started_at, finished_at, status, pid, host, parameters, {audit} FROM runs "
               + ("WHERE run_id=? " if run_id else "") + "ORDER BY started_at DESC")
        rows = self.conn.execute(sql + (f" LIMIT {int(limit)}" if limit else ""),
                                 (run_id,) if run_id else ()).fetchall()
        now = _StatusNow(self.state_dir)
        result = []
        for r in rows:
            counts: dict[str, int] = {}
            for status, n in self.conn.execute(
                    "SELECT status, COUNT(*) FROM step_runs s WHERE run_id=? AND id = (SELECT MAX(id) FROM step_runs "
                    "WHERE run_id=s.run_id AND step=s.step) GROUP BY status", (r[0],)).fetchall():
                counts[now(status)] = counts.get(now(status), 0) + n
            result.append({"run_id": r[0], "started_at": r[1], "finished_at": r[2], "status": now(r[3]), "pid": r[4],
                           "host": r[5], "parameters": json.loads(r[6] or "{}"),
                           "duration_s": None if r[2] is None else round(r[2] - r[1], 3), "steps": counts,
                           "audit": json.loads(r[7]) if r[7] else None})
        return result

    def _has_audit(self) -> bool:
        return self._has_column("runs", "audit")

    def _has_column(self, table: str, column: str) -> bool:
        """Whether a table has a column of schema 2 (a read-only 0.1 ledger has not)."""
        return any(row[1] == column for row in self.conn.execute(f"PRAGMA table_info({table})").fetchall())

    def step_runs(self, run_id: str) -> list[dict[str, Any]]:
        cols = ["id", "step", "attempt", "status", "started_at", "finished_at", "duration_s", "notebook",
                "fingerprint", "parameters", "reasons", "error_kind", "error_name", "error_value", "error_cell",
                "error_traceback", "worker", "error_execution"]
        # a read-only ledger of an older schema lacks some columns: they read as NULL
        selected = [f"NULL AS {c}" if c in ("worker", "error_execution") and not self._has_column("step_runs", c)
                    else c for c in cols]
        rows = self.conn.execute(f"SELECT {', '.join(selected)} FROM step_runs WHERE run_id=? ORDER BY id",
                                 (run_id,)).fetchall()
        now = _StatusNow(self.state_dir)
        result = []
        for row in rows:
            d = dict(zip(cols, row))
            d["status"] = now(d["status"])
            d["parameters"] = json.loads(d["parameters"] or "{}")
            d["reasons"] = json.loads(d["reasons"] or "[]")
            # the failing cell as users see it: 'In [4]' ('cell 4' for a failure recorded before schema 3)
            d["error_where"] = cell_label(d["error_execution"], d["error_cell"]) if d["error_name"] else None
            d["files"] = [dict(zip(("role", "label", "path", "sha256", "size"), f)) for f in self.conn.execute(
                "SELECT role, label, path, sha256, size FROM files WHERE step_run_id=?", (d["id"],))]
            result.append(d)
        return result

    def lineage(self, rel_path: str) -> dict[str, Any] | None:
        """The newest successful step run that wrote `rel_path`: run, step, parameters, sha256, inputs."""
        row = self.conn.execute(
            "SELECT s.id, s.run_id, s.step, s.finished_at, f.sha256, s.parameters FROM files f "
            "JOIN step_runs s ON s.id=f.step_run_id "
            "WHERE f.path=? AND f.role='output' AND s.status='succeeded' ORDER BY s.finished_at DESC LIMIT 1",
            (rel_path,)).fetchone()
        if row is None:
            return None
        inputs = [dict(zip(("label", "path", "sha256"), f)) for f in self.conn.execute(
            "SELECT label, path, sha256 FROM files WHERE step_run_id=? AND role='input'", (row[0],)).fetchall()]
        return {"run_id": row[1], "step": row[2], "finished_at": row[3], "sha256": row[4],
                "parameters": json.loads(row[5] or "{}"), "inputs": inputs}

    def find_run(self, wanted: str | None) -> str:
        """The run id that `wanted` names: "latest" (or None), or a unique prefix of an id."""
        from .errors import CommandError, did_you_mean  # noqa: PLC0415

        ids = [r[0] for r in self.conn.execute("SELECT run_id FROM runs ORDER BY started_at DESC").fetchall()]
        if not ids:
            raise CommandError(f"no runs recorded yet in {self.path}; run `nbflow run {self.root}` first")
        if wanted in (None, "", "latest"):
            return ids[0]
        matches = [i for i in ids if i.startswith(wanted)]
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise CommandError(f"{wanted!r} matches {len(matches)} runs; give more of the id")
        raise CommandError(f"no run {wanted!r}{did_you_mean(wanted, ids)}; see `nbflow history {self.root}`")

    # -- writes ------------------------------------------------------------------
    def record_skipped(self, run_id: str, audit: dict[str, Any]) -> None:
        """A scheduled run that did not start because another one holds the pipeline."""
        now = time.time()
        with self.transaction() as c:
            c.execute("INSERT INTO runs (run_id, started_at, finished_at, status, pid, host, parameters, plan, "
                      "nbflow_version, audit) VALUES (?,?,?,?,?,?,?,?,?,?)",
                      (run_id, now, now, RunStatus.SKIPPED.value, os.getpid(), socket.gethostname(), "{}", "[]",
                       __version__, json.dumps(audit)))

    def mark_interrupted(self) -> list[str]:
        """Runs (and step attempts) left `running` by an nbflow that died: record them as interrupted.

        Call it holding the run lock: then nothing is running.
        """
        ids = [r[0] for r in self.conn.execute("SELECT run_id FROM runs WHERE status='running'")]
        # a step can be left running in a finished run when recording its end failed (disk full)
        stuck = self.conn.execute("SELECT 1 FROM step_runs WHERE status='running' LIMIT 1").fetchone()
        if ids or stuck:
            with self.transaction() as c:
                now = time.time()
                c.execute("UPDATE step_runs SET status='interrupted', finished_at=? WHERE status='running'", (now,))
                c.execute("UPDATE runs SET status='interrupted', finished_at=? WHERE status='running'", (now,))
        return ids


class _StatusNow:
    """A recorded status as it stands now: `running` with no run holding the lock is `interrupted`.

    What nbflow records after it was killed (kill -9, power loss) until the
    next run writes it; the read views say it at once, without writing.
    """

    def __init__(self, state_dir: Path):
        self.state_dir = state_dir
        self.running: bool | None = None  # asked once, when a `running` status is met

    def __call__(self, status: str) -> str:
        if status != RunStatus.RUNNING.value:
            return status
        if self.running is None:
            self.running = RunLock(self.state_dir).held()
        return status if self.running else RunStatus.INTERRUPTED.value


class _Transaction:
    def __init__(self, ledger: Ledger):
        self.ledger = ledger

    def __enter__(self) -> sqlite3.Connection:
        conn = self.ledger.conn
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            raise self._cannot_write(e) from None
        if self.ledger._unsaved_hashes:
            try:
                self.ledger._write_unsaved_hashes(conn)
            except BaseException as e:
                _rollback(conn)
                if isinstance(e, sqlite3.Error):
                    raise self._cannot_write(e) from None
                raise
        return conn

    def __exit__(self, exc_type, exc, tb) -> Literal[False]:
        conn = self.ledger.conn
        if exc_type is None:
            try:
                conn.execute("COMMIT")
                return False
            except LedgerDamaged:
                _rollback(conn)
                raise
            except sqlite3.Error as e:
                _rollback(conn)
                raise self._cannot_write(e) from None
        _rollback(conn)
        if isinstance(exc, sqlite3.Error):
            raise self._cannot_write(exc) from None
        return False

    def _cannot_write(self, e: sqlite3.Error) -> StateError:
        return StateError(f"cannot write the run ledger {self.ledger.path}: {e}; "
                          "check that the folder is writable and the disk is not full")


def _rollback(conn: sqlite3.Connection) -> None:
    # sqlite has already rolled back by itself after some errors (disk full): then there is nothing to undo
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except LedgerDamaged:
            pass  # the error that led here is the one to report


def _is_damage(e: sqlite3.Error) -> bool:
    """sqlite's answer for a file that is not a database or has malformed pages.

    Not the OperationalErrors (locked, read-only, disk full, cannot open): the
    file is fine there, the folder or the disk is not.
    """
    code = getattr(e, "sqlite_errorcode", None)  # None for errors of the sqlite3 module itself
    return code is not None and (code & 0xFF) in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


class _LedgerConnection(sqlite3.Connection):
    """A connection to the ledger whose statements raise LedgerDamaged for a damaged file."""

    ledger: Ledger

    def cursor(self, factory: Any = None) -> Any:
        return super().cursor(factory or _LedgerCursor)

    def execute(self, sql: str, parameters: Any = (), /) -> Any:
        return self.cursor().execute(sql, parameters)

    def executemany(self, sql: str, parameters: Any, /) -> Any:
        return self.cursor().executemany(sql, parameters)

    def executescript(self, script: str, /) -> Any:
        return self.cursor().executescript(script)


class _LedgerCursor(sqlite3.Cursor):
    """Reading rows goes on reading pages: fetching can find damage too, not only executing."""

    def _converted(self, e: sqlite3.Error) -> Exception:
        # The error's traceback holds this cursor; closed, its statement cannot keep the
        # connection open after Ledger.close() (sqlite would then never checkpoint the -wal).
        super().close()
        connection = self.connection
        if _is_damage(e) and isinstance(connection, _LedgerConnection):
            return connection.ledger.damaged(str(e))
        return e

    def _guarded(self, call: Callable[..., Any], *args: Any) -> Any:
        try:
            return call(*args)
        except sqlite3.DatabaseError as e:
            raise self._converted(e) from None

    def execute(self, sql: str, parameters: Any = (), /) -> Any:
        return self._guarded(super().execute, sql, parameters)

    def executemany(self, sql: str, parameters: Any, /) -> Any:
        return self._guarded(super().executemany, sql, parameters)

    def executescript(self, script: str, /) -> Any:
        return self._guarded(super().executescript, script)

    def fetchone(self) -> Any:
        return self._guarded(super().fetchone)

    def fetchmany(self, size: int | None = None) -> list[Any]:
        return self._guarded(super().fetchmany, self.arraysize if size is None else size)

    def fetchall(self) -> list[Any]:
        return self._guarded(super().fetchall)

    def __next__(self) -> Any:
        return self._guarded(super().__next__)


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a regular file"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# -- fingerprints and freshness -------------------------------------------------

def fingerprint_parts(graph: Graph, name: str, parameters: dict[str, Any], ledger: Ledger,
                      kernel: str | None = None) -> dict[str, Any]:
    """Everything a step's result depends on: every code cell, parameters, kernel, input contents.

    A secret's value is represented by a keyed hash (see `secret_digest`), never by itself.
    Folder inputs also keep their file list, so that a reason can name the file that changed.
    """
    step = graph.steps[name]
    effective = {}
    for pname, param in step.parameters.items():
        value = parameters.get(pname, _DEFAULT)
        if isinstance(value, EnvRef):
            effective[pname] = secret_digest(ledger.state_dir, value.text)
        elif isinstance(value, ValueRef) and value.grid:  # which instances: the value's inputs say so
            effective[pname] = repr(replace(value, grid=()))
        else:
            effective[pname] = param.source if value is _DEFAULT else repr(value)
    inputs: dict[str, str | None] = {}
    folders: dict[str, dict[str, str]] = {}
    try:
        for ref in graph.inputs_of(name):
            hashed, files = ledger.describe(ref.path, graph.config.storage)
            inputs[ref.label] = hashed[0] if hashed else None
            if files is not None:
                folders[ref.label] = {rel: sha for rel, (sha, _) in files.items()}
    except PipelineError as e:
        raise PipelineError([replace(p, file=step.rel_path, step=name) for p in e.problems]) from None
    parts = {"cells": [list(c) for c in step.cell_hashes], "parameters": effective, "kernel": kernel or step.kernel,
             "inputs": inputs, "outputs": sorted(ref.label for ref in graph.outputs_of(name))}
    if folders:
        parts["folders"] = folders
    # in sys.path's order: PYTHONPATH (pythonpath:) first, later '' (the notebook's folder, where it runs)
    search = (*graph.python_path(), step.folder)  # the instances of a grid share their step's: found once
    modules = graph.remembered(("modules", step.imports, search),
                               lambda: project_modules(step.imports, search)) if step.imports else []
    if modules:  # the project's own code it imports: editing src/features.py makes its importers stale
        parts["modules"] = {relative_to(path, graph.root): (ledger.file_hash(path) or ("",))[0] for path in modules}
    if graph.config.fingerprint_packages:  # `fingerprint: {packages: true}`: an upgraded pandas reruns the step
        from .audit import installed_packages  # noqa: PLC0415

        parts["packages"] = installed_packages()
    env = graph.environment(name)
    if env:  # recorded only as keyed hashes: a variable may hold a credential
        parts["env"] = {var: secret_digest(ledger.state_dir, value) for var, value in env.items()}
    return parts


_DEFAULT = object()
_SECRET_PREFIX = "secret:hmac-sha256:"
_keys: dict[Path, bytes] = {}


def secret_digest(state_dir: Path, value: str) -> str:
    """A keyed hash standing for a secret's value in fingerprints: a changed secret reruns the step.

    The key is `_nbflow/fingerprint.key` (32 random bytes, mode 0600), made by
    the first run that needs it, so the ledger alone does not let anyone test
    guesses of a secret. Where it cannot be written, a key for this process
    only is used: the step then looks changed, never wrongly fresh.
    """
    path = StateLayout.from_state_dir(state_dir).fingerprint_key
    key = _keys.get(path)
    if key is None:
        try:
            key = path.read_bytes()
        except OSError:
            key = os.urandom(32)
            if path.parent.is_dir():
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                    with os.fdopen(fd, "wb") as f:
                        f.write(key)
                except FileExistsError:
                    key = path.read_bytes()
                except OSError:
                    pass
        _keys[path] = key
    return _SECRET_PREFIX + hmac.new(key, value.encode(), hashlib.sha256).hexdigest()


def fingerprint(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def recorded_steps(ledger: Ledger) -> dict[str, str]:
    """Every step the ledger has seen in a run, with the newest such run id."""
    return dict(ledger.conn.execute("SELECT step, MAX(run_id) FROM step_runs GROUP BY step").fetchall())


@dataclass(frozen=True)
class Freshness:
    name: str
    fresh: bool
    reasons: tuple[str, ...]
    parts: dict[str, Any]


def assess(graph: Graph, name: str, parameters: dict[str, Any], ledger: Ledger,
           rerunning_upstream: tuple[str, ...] = (), kernel: str | None = None) -> Freshness:
    """Is the step fresh, and if not, why (in words)."""
    parts = fingerprint_parts(graph, name, parameters, ledger, kernel)
    secrets = set(graph.config.secrets)
    reasons: list[str] = []
    last = ledger.last_success(name)
    if last is None:
        failed_run = ledger.failed_since(name, 0.0)  # never succeeded: say how it ended, if it ever started
        reasons.append(f"last run {failed_run[1]} ({failed_run[0]})" if failed_run else "never run")
    else:
        old = last["parts"]
        if old.get("kernel") != parts["kernel"]:
            reasons.append(f"kernel {old.get('kernel')} -> {parts['kernel']}")
        reasons += _cell_changes(old.get("cells", []), parts["cells"])
        old_params, new_params = old.get("parameters", {}), parts["parameters"]
        for p in sorted(set(old_params) | set(new_params)):
            if old_params.get(p) != new_params.get(p):
                if (is_secret_parameter(p, secrets) or str(old_params.get(p)).startswith(_SECRET_PREFIX)
                        or str(new_params.get(p)).startswith(_SECRET_PREFIX)):
                    reasons.append(f"parameter {p} changed")
                elif p not in old_params:
                    reasons.append(f"parameter {p} added ({new_params[p]})")
                elif p not in new_params:
                    reasons.append(f"parameter {p} removed")
                else:
                    reasons.append(f"parameter {p} {old_params[p]} -> {new_params[p]}")
        old_inputs = old.get("inputs", {})
        for label, digest in parts["inputs"].items():
            if digest is None:
                reasons.append(f"input {label} missing")
            elif label not in old_inputs:
                reasons.append(f"input {label} added")
            elif old_inputs[label] != digest:
                reasons.append(f"input {label} changed" + _folder_changes(old.get("folders", {}).get(label),
                                                                           parts.get("folders", {}).get(label)))
        for label in old_inputs:
            if label not in parts["inputs"]:
                reasons.append(f"input {label} removed")
        reasons += _mapping_changes("module", old.get("modules", {}), parts.get("modules", {}))
        reasons += _mapping_changes("env", old.get("env", {}), parts.get("env", {}))
        reasons += _version_changes(old.get("packages"), parts.get("packages"))
        if old.get("outputs") != parts["outputs"]:
            reasons.append("declared outputs changed")
        for rec in last["outputs"]:
            hashed = ledger.file_hash(rec.path if stores.is_url(rec.path) else ledger.root / rec.path,
                                      graph.config.storage)
            if hashed is None:
                reasons.append(f"output {rec.label} missing")
            elif hashed[0] != rec.sha256:
                reasons.append(f"output {rec.label} changed since it was made")
        failed_run = ledger.failed_since(name, last["finished_at"])
        if failed_run:
            reasons.append(f"last run {failed_run[1]} ({failed_run[0]})")
    for up in folded(rerunning_upstream):
        reasons.append(f"upstream {up} reruns")
    return Freshness(name, not reasons, tuple(reasons), parts)


def _version_changes(old: dict[str, str] | None, new: dict[str, str] | None) -> list[str]:
    """'package pandas 2.1.0 -> 2.2.0' (only when both runs recorded package versions)."""
    if old is None or new is None:
        return [] if old == new else ["package versions now " + ("recorded" if new is not None else "not recorded")]
    reasons = [f"package {n} {old[n]} -> {v}" for n, v in new.items() if n in old and old[n] != v]
    reasons += [f"package {n} {v} added" for n, v in new.items() if n not in old]
    return reasons + [f"package {n} removed" for n in old if n not in new]


def _mapping_changes(what: str, old: dict[str, str], new: dict[str, str]) -> list[str]:
    """'module src/features.py changed', 'env DB_URL added', ... (values are never shown)."""
    reasons = [f"{what} {key} added" for key in new if key not in old]
    reasons += [f"{what} {key} changed" for key in new if key in old and old[key] != new[key]]
    return reasons + [f"{what} {key} removed" for key in old if key not in new]


def _folder_changes(old: dict[str, str] | None, new: dict[str, str] | None) -> str:
    """': a.csv added, b.csv changed' for a folder input, naming at most three files."""
    if old is None or new is None:
        return ""
    changes = [f"{rel} added" for rel in new if rel not in old]
    changes += [f"{rel} changed" for rel in new if rel in old and old[rel] != new[rel]]
    changes += [f"{rel} removed" for rel in old if rel not in new]
    more = f" and {len(changes) - 3} more" if len(changes) > 3 else ""
    return (": " + ", ".join(changes[:3]) + more) if changes else ""


def _cell_changes(old: list, new: list) -> list[str]:
    old_h = [h for _, h in old]
    new_h = [h for _, h in new]
    reasons = []
    matcher = difflib.SequenceMatcher(a=old_h, b=new_h, autojunk=False)
    for op, a1, a2, b1, b2 in matcher.get_opcodes():
        if op == "replace":
            reasons += [f"cell {new[j][0]} changed" for j in range(b1, b2)]
            if a2 - a1 > b2 - b1:
                reasons.append(f"{(a2 - a1) - (b2 - b1)} cell(s) removed")
        elif op == "insert":
            reasons += [f"cell {new[j][0]} added" for j in range(b1, b2)]
        elif op == "delete":
            reasons.append(f"{a2 - a1} cell(s) removed" if a2 - a1 > 1 else f"cell {old[a1][0]} removed")
    return reasons


# -- the lock ---------------------------------------------------------------------

class RunLock:
    """`_nbflow/lock`: one run of a pipeline at a time. The OS frees it if nbflow dies."""

    def __init__(self, state_dir: Path):
        self.path = StateLayout.from_state_dir(state_dir).lock
        self.fd: int | None = None
        self.stale: dict[str, Any] | None = None  # the holder that died without releasing the lock

    def acquire(self, run_id: str) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise StateError(f"cannot create the run lock {self.path}: {e.strerror}; "
                             f"check that {self.path.parent} is writable") from None
        try:
            _flock_soon(fd)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            started = holder.get("started_at")
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "an unknown time"
            raise PipelineLocked(
                f"another nbflow run of this pipeline is in progress (run {holder.get('run_id', '?')}, "
                f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {when}); wait for it to "
                f"finish or stop it (kill {holder.get('pid', '<pid>')})") from None
        self.stale = _read_holder(fd) or None  # release() empties the file: content means nbflow died
        info = {"pid": os.getpid(), "host": socket.gethostname(), "run_id": run_id, "started_at": time.time()}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
        except OSError as e:
            os.close(fd)
            raise StateError(f"cannot write the run lock {self.path}: {e.strerror}; "
                             f"check that {self.path.parent} is writable and the disk is not full") from None
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            try:
                os.ftruncate(self.fd, 0)
            except OSError:
                pass
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


    def held(self) -> bool:
        """Whether a process holds the lock now (a run is going on). Only reads; never creates the file.

        Probes with a shared lock for an instant, which `acquire` waits out.
        When the file cannot be read, the answer is yes: then the ledger is believed.
        """
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        except OSError:
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:  # BlockingIOError: held; others: cannot tell
            return True
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        finally:
            os.close(fd)


def _flock_soon(fd: int) -> None:
    """Take the lock, or raise BlockingIOError when it stays held for a while (not only a probe's instant)."""
    for pause in (0.01, 0.02, 0.05, 0.1):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            time.sleep(pause)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def reap_orphans(root: Path, run_ids: list[str]) -> list[int]:
    """Kill what the kernels of runs whose nbflow died left running; returns the pids killed.

    A kernel and everything it starts inherit NBFLOW_RUN_ID and NBFLOW_PIPELINE
    from the run, so they are found by their environment (`nbflow.reaper`, as
    at the end of every step): no pid recorded earlier can have been reused by
    an unrelated process.
    """
    from .reaper import kill_processes  # noqa: PLC0415

    return kill_processes([{"NBFLOW_RUN_ID": run_id, "NBFLOW_PIPELINE": str(root)} for run_id in run_ids])


# -- the ledger as a listener -------------------------------------------------------

class LedgerRecorder:
    """Writes the Runner's events into the ledger, one transaction per event.

    Except skipped and not-run steps, which come in bursts (a fresh pipeline of 300 steps is 300 of them):
    they are written together, in one transaction, before the next other event. Each transaction costs an
    fsync; these rows decide no step's freshness, so a crash that loses them loses only their history lines.
    """

    def __init__(self, ledger: Ledger, secrets: tuple[str, ...] = ()):
        self.ledger = ledger
        self.secrets = set(secrets)
        self.run_id: str | None = None
        self.open_rows: dict[str, int] = {}
        self._unwritten: list[tuple[StepSkipped | StepNotRun, float]] = []

    def __call__(self, event: Event) -> None:
        if isinstance(event, (StepSkipped, StepNotRun)):
            self._unwritten.append((event, time.time()))
            return
        if self._unwritten:
            self._write_unwritten()
        handler = getattr(self, "_on_" + type(event).__name__, None)
        if handler is not None:
            handler(event)

    def _write_unwritten(self) -> None:
        unwritten, self._unwritten = self._unwritten, []
        with self.ledger.transaction() as c:
            for event, at in unwritten:
                if isinstance(event, StepSkipped):
                    self._insert(c, event.step, 0, "skipped", started_at=at, finished_at=at,
                                 reasons=json.dumps(list(event.reasons)))
                else:
                    reason = ("--fail-fast: another step failed" if event.because == "--fail-fast"
                              else f"upstream {event.because} did not succeed")
                    self._insert(c, event.step, 0, "not_run", reasons=json.dumps([reason]))

    def _on_RunStarted(self, e: RunStarted) -> None:
        self.run_id = e.run_id
        with self.ledger.transaction() as c:
            c.execute("INSERT INTO runs (run_id, started_at, status, pid, host, parameters, plan, nbflow_version, "
                      "audit) VALUES (?,?,?,?,?,?,?,?,?)",
                      (e.run_id, e.started_at, RunStatus.RUNNING.value, os.getpid(), socket.gethostname(),
                       json.dumps(redact(e.parameters, self.secrets), default=repr),
                       json.dumps([[p.name, p.action, list(p.reasons)] for p in e.plan]), __version__,
                       json.dumps(e.audit) if e.audit else None))

    def _insert(self, c: sqlite3.Connection, step: str, attempt: int, status: str, **cols: Any) -> int:
        cols = {"run_id": self.run_id, "step": step, "attempt": attempt, "status": status, **cols}
        cur = c.execute(f"INSERT INTO step_runs ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                        tuple(cols.values()))
        return int(cur.lastrowid or 0)

    def _on_StepStarted(self, e: StepStarted) -> None:
        with self.ledger.transaction() as c:
            self.open_rows[e.step] = self._insert(c, e.step, e.attempt, "running", started_at=e.started_at,
                                                  notebook=e.notebook, reasons=json.dumps(list(e.reasons)))

    def _finish(self, c: sqlite3.Connection, step: str, attempt: int, status: str, **cols: Any) -> int:
        row = self.open_rows.pop(step, None)
        cols["finished_at"] = time.time()
        if row is None:
            return self._insert(c, step, attempt, status, **cols)
        sets = ", ".join(f"{k}=?" for k in cols)
        c.execute(f"UPDATE step_runs SET status=?, {sets} WHERE id=?", (status, *cols.values(), row))
        return row

    def _on_StepSucceeded(self, e: StepSucceeded) -> None:
        with self.ledger.transaction() as c:
            row = self._finish(c, e.step, e.attempt, "succeeded", duration_s=e.duration_s, notebook=e.notebook,
                               fingerprint=e.fingerprint, fingerprint_parts=json.dumps(e.fingerprint_parts),
                               parameters=json.dumps(redact(e.parameters, self.secrets), default=repr),
                               worker=e.worker)
            for role, records in (("input", e.inputs), ("output", e.outputs)):
                c.executemany("INSERT INTO files VALUES (?,?,?,?,?,?)",
                              [(row, role, r.label, r.path, r.sha256, r.size) for r in records])

    def _on_StepFailed(self, e: StepFailed) -> None:
        with self.ledger.transaction() as c:
            self._finish(c, e.step, e.attempt, "failed", duration_s=e.duration_s, notebook=e.notebook,
                         parameters=json.dumps(redact(e.parameters, self.secrets), default=repr),
                         error_kind=e.error.kind, error_name=e.error.ename, error_value=e.error.evalue,
                         error_cell=e.error.cell, error_traceback=e.error.traceback,
                         error_execution=e.error.execution_count)

    def _on_StepCancelled(self, e: StepCancelled) -> None:
        with self.ledger.transaction() as c:
            self._finish(c, e.step, e.attempt, "cancelled", duration_s=e.duration_s, notebook=e.notebook)

    def _on_RunFinished(self, e: RunFinished) -> None:
        with self.ledger.transaction() as c:
            c.execute("UPDATE runs SET status=?, finished_at=? WHERE run_id=?",
                      (e.result.status.value, e.result.finished_at, e.result.run_id))


def set_ledger_aside(state_dir: Path) -> list[Path]:
    """Rename the ledger (and sqlite's -wal/-shm files beside it) to `history.sqlite.damaged-<time>`.

    The next run then starts a new ledger. The -wal file goes first: left
    behind, it would be replayed into the new ledger. Returns the new paths.
    """
    ledger = StateLayout.from_state_dir(state_dir).ledger
    stamp = time.strftime("%Y%m%dT%H%M%S")
    aside, n = ledger.with_name(f"{ledger.name}.damaged-{stamp}"), 1
    while any(Path(f"{aside}{suffix}").exists() for suffix in ("", "-wal", "-shm")):
        n += 1
        aside = ledger.with_name(f"{ledger.name}.damaged-{stamp}-{n}")
    moved = []
    for suffix in ("-wal", "-shm", ""):
        source, target = Path(f"{ledger}{suffix}"), Path(f"{aside}{suffix}")
        try:
            os.rename(source, target)
        except FileNotFoundError:
            continue
        except OSError as e:
            raise StateError(f"cannot move {source} aside: {e.strerror}; check that {state_dir} is writable, "
                             f"or move it yourself (mv {source} {target})") from None
        moved.append(target)
    return moved[::-1]
