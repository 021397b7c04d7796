"""What nbflow leaves behind, found and removed: stray processes and private temp folders.

Owns
- finding the processes whose environment holds given variables, and killing
  them (:func:`kill_processes`): every kernel and what it starts inherit
  NBFLOW_RUN_ID, NBFLOW_STEP, NBFLOW_PIPELINE and NBFLOW_ATTEMPT, so the end of an attempt (and,
  after nbflow itself was killed, the next run) finds by them what a step left
  running, even a process that left the kernel's process group or session;
- private folders in the temp folder (:func:`private_folder`), each held by
  its creator through a lock on a file inside; a process that makes one
  removes the folders of the same prefix whose holder is gone (killed by
  SIGKILL: the lock went with it).

Never kills this process or its ancestors, never touches another user's
folder, never prints. Linux reads /proc directly (a scan of 1,000 processes
costs ~9 ms, psutil ~32 ms); elsewhere psutil does the reading.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping

__all__ = ["find_processes", "kill_processes", "private_folder", "release_folder", "remove_abandoned"]

# A process that ignores nothing still takes a moment to die after SIGKILL;
# one stuck in the kernel (uninterruptible sleep) is not waited for longer than this.
_EXIT_TIMEOUT = 5.0
_EXIT_POLL_INTERVAL = 0.001
# Killed processes may have forked just before: scan again, at most this often.
_MAX_ROUNDS = 10
_HOLDER = "holder.lock"

_PROC = "/proc"
_LINUX = sys.platform.startswith("linux")


def find_processes(wanted: Iterable[Mapping[str, str]]) -> list[int]:
    """Pids of the processes whose environment holds every variable of one of the ``wanted`` mappings.

    Other users' processes are not readable (unless we are root) and so never match.
    """
    wanted = list(wanted)
    if not all(wanted):
        raise ValueError("an empty set of variables would match every process")
    patterns = [[b"\0" + os.fsencode(f"{name}={value}") + b"\0" for name, value in env.items()]
                for env in wanted]
    if not patterns:
        return []
    if _LINUX:
        found = [pid for pid, environ in _proc_environs() if _matches(environ, patterns)]
    else:
        found = _psutil_find(patterns)
    if found:
        found = [pid for pid in found if pid not in _me_and_ancestors()]
    return found


def kill_processes(wanted: Iterable[Mapping[str, str]]) -> list[int]:
    """SIGKILL the processes :func:`find_processes` finds and wait until they are gone; return their pids.

    Scans again after each round, so a child forked by a process in its last
    moments is killed too.
    """
    wanted = list(wanted)
    killed: list[int] = []
    for _ in range(_MAX_ROUNDS):
        found = [pid for pid in find_processes(wanted) if _alive(pid)]
        if not found:
            break
        for pid in found:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                continue  # gone already, or not ours
            killed.append(pid)
        _wait_gone(found)
    return killed


def private_folder(prefix: str) -> tuple[str, int]:
    """A new folder ``<tempdir>/<prefix>XXXXXXXX`` (mode 0700) held by this process: ``(path, holder_fd)``.

    Keep ``holder_fd`` open as long as the folder is used, then :func:`release_folder`.
    First removes this user's folders of the same prefix whose holder is dead.
    """
    remove_abandoned(prefix)
    folder = tempfile.mkdtemp(prefix=prefix)
    # Locked before it gets its name: a folder whose holder file exists is held, or abandoned.
    staged = os.path.join(folder, _HOLDER + ".new")
    fd = os.open(staged, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.rename(staged, os.path.join(folder, _HOLDER))
    return folder, fd


def release_folder(folder: str, holder_fd: int) -> None:
    """Remove a folder made by :func:`private_folder`, then let go of it."""
    shutil.rmtree(folder, ignore_errors=True)
    try:
        os.close(holder_fd)
    except OSError:
        pass


def remove_abandoned(prefix: str) -> list[str]:
    """Remove this user's ``<tempdir>/<prefix>*`` folders whose holder is gone; return their paths.

    A folder without a holder file (being made this instant, or from an nbflow
    that predates holders) is left alone.
    """
    removed: list[str] = []
    uid = os.getuid()
    try:
        entries = list(os.scandir(tempfile.gettempdir()))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(prefix):
            continue
        try:
            if not entry.is_dir(follow_symlinks=False) or entry.stat(follow_symlinks=False).st_uid != uid:
                continue
            fd = os.open(os.path.join(entry.path, _HOLDER), os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # held: its owner is alive
        else:
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.path)
        finally:
            os.close(fd)
    return removed


# --------------------------------------------------------------------------


def _proc_environs() -> Iterable[tuple[int, bytes]]:
    for name in os.listdir(_PROC):
        if not name.isdigit():
            continue
        try:
            with open(os.path.join(_PROC, name, "environ"), "rb") as f:
                yield int(name), b"\0" + f.read()
        except OSError:
            continue  # gone, or another user's


def _matches(environ: bytes, patterns: list[list[bytes]]) -> bool:
    if not environ.endswith(b"\0"):
        environ += b"\0"
    return any(all(p in environ for p in pattern) for pattern in patterns)


def _psutil_find(patterns: list[list[bytes]]) -> list[int]:
    import psutil  # noqa: PLC0415 - only where there is no /proc

    found = []
    for proc in psutil.process_iter():
        try:
            environ = b"\0" + b"\0".join(os.fsencode(f"{k}={v}") for k, v in proc.environ().items()) + b"\0"
        except (psutil.Error, OSError):
            continue
        if _matches(environ, patterns):
            found.append(proc.pid)
    return found


def _me_and_ancestors() -> set[int]:
    import psutil  # noqa: PLC0415 - only when something matched

    me = psutil.Process()
    return {me.pid, *(p.pid for p in me.parents())}


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent does not count)."""
    if _LINUX:
        try:
            with open(os.path.join(_PROC, str(pid), "stat"), "rb") as f:
                return f.read().rpartition(b")")[2].split()[0] != b"Z"
        except (OSError, IndexError):
            return False
    import psutil  # noqa: PLC0415

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _wait_gone(pids: list[int]) -> None:
    deadline = time.monotonic() + _EXIT_TIMEOUT
    for pid in pids:
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(_EXIT_POLL_INTERVAL)
