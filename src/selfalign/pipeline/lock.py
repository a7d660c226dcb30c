"""One `selfalign run` per run folder: `<out>/.lock` is held while stages run, so that a retried cluster job or a
second terminal cannot append to the same stage files.

The operating system's lock (flock) decides who holds the folder, so two processes racing cannot both win, and it
is let go when its holder dies, even by kill -9. The file's contents (pid, host, start time, command) are for the
message a second run prints, and for the staleness check where flock is not available.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from selfalign.errors import SelfAlignError

try:
    import fcntl
except ImportError:  # Windows: only the pid check below
    fcntl = None

logger = logging.getLogger(__name__)

LOCK_NAME = ".lock"
WAIT_POLL_SECONDS = 1.0


class RunFolderLocked(SelfAlignError):
    """Another live run holds the run folder."""


@contextmanager
def hold_run_folder(out: Path, wait: bool = False) -> Iterator[Path]:
    """Hold `<out>/.lock` for the block: released when it ends, also on an exception or Ctrl-C. Raises
    RunFolderLocked (one line naming the holder) when another run holds it, or waits for it with `wait`."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_NAME
    handle = _acquire(path, wait)
    try:
        yield path
    finally:
        _release(path, handle)


def _acquire(path: Path, wait: bool) -> int:
    """Open and lock the lock file, write this process's record into it, and return its descriptor."""
    announced = False
    while True:
        handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        locked = _lock(handle)
        holder = _read(handle)
        if locked is False or (locked is None and holder is not None and _may_be_alive(holder)):
            os.close(handle)
            if not wait:
                raise RunFolderLocked(f"{path.parent} is in use by another selfalign run: {_describe(holder)}; "
                                      "wait for it to finish, or pass --wait")  # fmt: skip
            if not announced:
                logger.warning("%s is in use by %s; waiting for it to finish", path.parent, _describe(holder))
                announced = True
            time.sleep(WAIT_POLL_SECONDS)
            continue
        if not _is_current_file(path, handle):
            # the holder removed the file as it let go, after this process opened it: lock the new one instead
            os.close(handle)
            continue
        if holder is not None:
            logger.warning("%s: taking over the stale lock of %s, which is no longer running", path, _describe(holder))
        try:
            _write(handle, _own_record())
        except BaseException:
            _release(path, handle)
            raise
        return handle


def _release(path: Path, handle: int) -> None:
    """Remove the file while still holding it, then let go: a waiting process that opened the old file sees it
    was replaced (_is_current_file) and tries again."""
    try:
        path.unlink(missing_ok=True)
    finally:
        os.close(handle)  # closing the descriptor releases flock


def _lock(handle: int) -> bool | None:
    """True: this process holds the lock; False: another process does; None: the file system cannot lock."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:  # e.g. ENOLCK on a network file system without a lock daemon
        return None
    return True


def _is_current_file(path: Path, handle: int) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(handle).st_ino
    except FileNotFoundError:
        return False


def _own_record() -> dict:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "",
    }


def _read(handle: int) -> dict | None:
    """The record in the file, or None for an empty one (a new file) or one that is not a record."""
    os.lseek(handle, 0, os.SEEK_SET)
    text = os.read(handle, 1 << 16).decode("utf-8", errors="replace")
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def _write(handle: int, record: dict) -> None:
    os.ftruncate(handle, 0)
    os.lseek(handle, 0, os.SEEK_SET)
    os.write(handle, (json.dumps(record) + "\n").encode())
    os.fsync(handle)


def _may_be_alive(holder: dict) -> bool:
    """Without flock, a record is stale only when its pid is known dead on this host; a process on another host
    cannot be checked from here, so it counts as alive."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return True
    if holder["pid"] == os.getpid():
        return False
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows
        return True
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, and another user's
        return True
    return True


def _describe(holder: dict | None) -> str:
    if holder is None:
        return "a process that has not written its record yet"
    return (f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')} "
            f"({holder.get('command')})")  # fmt: skip
