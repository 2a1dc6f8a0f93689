"""Exclusive, advisory file locks with the holder written into the lock file.

Two kinds, for two owners:

- :func:`try_lock` (``flock``): the lock belongs to the open file, so a process that forks shares
  it with its children. Used by the dataset builder's shard part files
  (:mod:`training.common.records`), whose processes never fork.
- :class:`RunLock` (POSIX record lock, ``fcntl(F_SETLK)`` via :func:`try_lock_process`): the lock
  belongs to the process and is NOT inherited at fork. The trainer forks DataLoader workers; after
  a ``kill -9`` of the trainer they live on for seconds, and with ``flock`` they would keep the run
  folder locked, so a requeued ``--resume`` would be refused naming the dead trainer. A record lock
  is dropped by the kernel the moment its process dies. Its one trap: closing ANY descriptor of the
  file drops the process's lock, so the holding process never opens the lock file again (a second
  :class:`RunLock` of the same folder in one process is refused from memory, see ``_HELD``).

Either lock is released when its holder closes the file or dies (also by SIGKILL), so a crashed run
never leaves a stale lock behind. Only EWOULDBLOCK/EAGAIN (and EACCES, which POSIX allows for a
record lock) mean "another process holds it"; any other error means the file system keeps no locks
(NFS mounted ``nolock`` on some servers, Lustre without ``-o flock``): that is logged as a warning
naming the fix, and the work goes on unprotected. On Windows (no ``fcntl``) nothing is locked.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import IO, Any

from dreamid_core import DreamIDError

try:
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

RUN_LOCK = ".train.lock"
#: errno values that mean "held by another process" (flock: EWOULDBLOCK; fcntl record locks: EAGAIN or EACCES)
BUSY_FLOCK = frozenset({errno.EWOULDBLOCK, errno.EAGAIN})
BUSY_RECORD = BUSY_FLOCK | {errno.EACCES}


def _no_locks_warning(fh: IO[Any], exc: OSError) -> None:
    name = getattr(fh, "name", "?")
    logger.warning(
        "%s: this file system keeps no file locks (%s: %s), so nothing stops a second process from using the "
        "same folder at once. NFS mounted with `nolock` and Lustre mounted without `-o flock` do this: mount it "
        "with locking (`-o flock`, or `-o localflock` on one node), or keep run folders on a file system that "
        "locks. Continuing unprotected.", name, errno.errorcode.get(exc.errno or 0, exc.errno), exc.strerror)


def _attempt(lock: Any, fh: IO[Any], busy: frozenset[int]) -> bool:
    try:
        lock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in busy:
            return False
        _no_locks_warning(fh, exc)
    return True


def try_lock(fh: IO[Any]) -> bool:
    """Take an exclusive ``flock`` on the open file ``fh`` without waiting; False when another holds it.
    Forked children share it (see the module docstring)."""
    if fcntl is None:
        return True
    return _attempt(fcntl.flock, fh, BUSY_FLOCK)


def try_lock_process(fh: IO[Any]) -> bool:
    """Take an exclusive POSIX record lock on the whole of ``fh`` (open for writing) without waiting;
    False when another process holds it. It belongs to this process: forked children do not hold it,
    and closing any descriptor of the file in this process releases it."""
    if fcntl is None:
        return True
    return _attempt(fcntl.lockf, fh, BUSY_RECORD)


def holder_info() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": " ".join(sys.argv)[:300]}


class RunFolderBusyError(DreamIDError, RuntimeError):
    """Another trainer holds the run folder's lock."""


#: run locks this process holds: (st_dev, st_ino) of the lock file -> its holder info. A record lock does
#: not conflict with its own process, and reading the file to name the holder would release it.
_HELD: dict[tuple[int, int], dict[str, Any]] = {}


class RunLock:
    """``with RunLock(run_dir):`` one trainer per run folder; a second one is refused, naming the first."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / RUN_LOCK
        self._fh: IO[str] | None = None
        self._key: tuple[int, int] | None = None

    def holder(self) -> dict[str, Any] | None:
        """What the lock file says about its holder (never call it in the holding process)."""
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def _busy(self, who: dict[str, Any]) -> RunFolderBusyError:
        return RunFolderBusyError(
            f"{self.path.parent} is in use by another trainer (pid {who.get('pid', '?')} on host "
            f"{who.get('host', '?')}, since {who.get('since', '?')}: {who.get('command', '?')}). Two trainers "
            "on one folder would interleave checkpoints and metrics.jsonl: stop that process or wait for it, "
            "or use another --output-dir.")

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:  # held by this very process? (decided by stat: opening and closing the file would drop that lock)
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) in _HELD:
                raise self._busy(_HELD[(st.st_dev, st.st_ino)])
        except FileNotFoundError:
            pass
        fh = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - closed in __exit__
        st = os.fstat(fh.fileno())
        key = (st.st_dev, st.st_ino)
        if not try_lock_process(fh):
            fh.close()
            raise self._busy(self.holder() or {})
        info = holder_info()
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps(info) + "\n")
        fh.flush()
        self._fh, self._key = fh, key
        _HELD[key] = info
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fh is not None:
            _HELD.pop(self._key, None)  # type: ignore[arg-type]
            self._fh.close()  # releases the lock
            self._fh = None
