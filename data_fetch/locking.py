"""A lock file for work that two processes must not do at once in one place (python -m mtlearn.course
writing one out folder, data_fetch filling one dataset folder): created exclusively, holding the
owner's process id and machine, taken over when that process is gone."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path


EMPTY_LOCK_SECONDS = 60  # an empty lock this old was never finished (its process was killed in between)


def take_lock(lock: Path) -> str | None:
    """Create `lock` holding this process's id; None when taken, else who holds it. A lock left by a
    process of this machine that is gone (a killed run) is taken over; on Windows, where a process
    cannot be asked whether it lives without risk, and for another machine's, it is kept."""
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)  # not executable (0o777 by default)
        except FileExistsError:
            try:
                text, since = lock.read_text(errors="replace").strip(), time.ctime(lock.stat().st_mtime)
            except FileNotFoundError:  # released in the meantime
                continue
            if not text and time.time() - lock.stat().st_mtime > EMPTY_LOCK_SECONDS:
                _remove_stale(lock, text)  # made, then killed before it wrote its id: nobody holds it
                continue
            pid, _, host = text.partition(" on ")
            # our own id: a lock of an earlier process that had it (a container restarted), never ours
            if pid.isdigit() and host == socket.gethostname() and os.name == "posix" and (
                    int(pid) == os.getpid() or not _alive(int(pid))):
                _remove_stale(lock, text)  # its process is gone
                continue
            return f"process {text or 'unknown'}, since {since}"
        try:
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()} on {socket.gethostname()}\n")
        except OSError:  # a full disk: an empty lock would turn the next run away for a minute, as held by "unknown"
            lock.unlink(missing_ok=True)
            raise
        return None
    return "another run, which took it at the same moment"


def make_and_lock(folder: Path, lock: Path) -> str | None:
    """Make `folder` (with the folders above it) and take_lock(`lock`) in it.

    Between the two, another run that made the same folder may fail and remove it, empty, again (so
    that an empty folder does not pass for a download or a run): the lock then cannot be created
    (FileNotFoundError), and the folder is made once more.
    """
    for _ in range(2):
        folder.mkdir(parents=True, exist_ok=True)
        try:
            return take_lock(lock)
        except FileNotFoundError:
            continue
    folder.mkdir(parents=True, exist_ok=True)  # a third time: removed again now is not a race but a fault
    return take_lock(lock)


def _remove_stale(lock: Path, text: str) -> None:
    """Delete `lock` if it still holds `text`, the id of a process that is gone.

    Two runs that found the same stale lock must not both take it over: the later one would delete
    the lock the first had just made (and then work over it). So the removal is guarded by a
    file of its own, made exclusively, and the lock is read again under it: a lock that changed
    (taken by another run meanwhile) is left alone.
    """
    guard = lock.with_name(f"{lock.name}.{text.partition(' ')[0]}.takeover")
    try:
        fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    except FileExistsError:  # another run is taking it over right now
        time.sleep(0.05)
        return
    try:
        try:
            unchanged = lock.read_text(errors="replace").strip() == text
        except FileNotFoundError:
            unchanged = False
        if unchanged:
            lock.unlink(missing_ok=True)
    finally:
        os.close(fd)
        guard.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    """Whether process `pid` of this (POSIX) machine exists; signal 0 asks without sending anything.
    Also mtlearn.utils' question about the writers of temporary files."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    except OverflowError:  # an id past any process's (a damaged lock or file name)
        return False
    return True
