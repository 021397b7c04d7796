"""What nbflow leaves behind, found and removed: private temp folders.

Owns private folders in the temp folder (:func:`private_folder`), each held by
its creator through a lock on a file inside; a process that makes one removes
the folders of the same prefix whose holder is gone (killed by SIGKILL: the
lock went with it). Never touches another user's folder, never prints.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile

__all__ = ["private_folder", "release_folder", "remove_abandoned"]

_HOLDER = "holder.lock"


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
