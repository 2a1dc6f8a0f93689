"""Exclusive, advisory file locks (POSIX ``flock``) with the holder written into the lock file.

A lock belongs to an open file: it is released when the holder closes the file or dies (also by
SIGKILL), so a crashed run never leaves a stale lock behind. Used by the dataset builder's shard
part files (:mod:`training.common.records`) and by the trainer's run folder (:class:`RunLock`). On Windows
(no ``fcntl``) nothing is locked.
"""

from __future__ import annotations

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


def try_lock(fh: IO[Any]) -> bool:
    """Take an exclusive lock on the open file ``fh`` without waiting; False when another holds it."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def holder_info() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": " ".join(sys.argv)[:300]}


class RunFolderBusyError(DreamIDError, RuntimeError):
    """Another trainer holds the run folder's lock."""


class RunLock:
    """``with RunLock(run_dir):`` one trainer per run folder; a second one is refused, naming the first."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / RUN_LOCK
        self._fh: IO[str] | None = None

    def holder(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - closed in __exit__
        if not try_lock(fh):
            fh.close()
            who = self.holder() or {}
            raise RunFolderBusyError(
                f"{self.path.parent} is in use by another trainer (pid {who.get('pid', '?')} on host "
                f"{who.get('host', '?')}, since {who.get('since', '?')}: {who.get('command', '?')}). Two trainers "
                "on one folder would interleave checkpoints and metrics.jsonl: stop that process (a worker that "
                "outlived its launcher?) or wait for it, or use another --output-dir.")
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps(holder_info()) + "\n")
        fh.flush()
        self._fh = fh
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fh is not None:
            self._fh.close()  # releases the lock
            self._fh = None
