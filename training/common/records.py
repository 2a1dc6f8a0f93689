"""A resumable, shardable JSONL record store: what lets a dataset step be killed and restarted.

One step (``sources``, ``edits``, ``scores``) keeps its results under ``<root>/<step>/parts/``.
Each process (shard ``i`` of ``n``) appends to its OWN part file,
``<step>.part-<i>-of-<n>.jsonl``: one JSON object per finished item, written only after the item's
files are on disk, then flushed and fsynced. On restart the step reads every part file of the step
(whatever shard layout wrote it), treats every key found as done, and skips it. So:

- a killed process loses at most the item it was working on (a half-written last line is cut
  off when its shard reopens the file, and ignored by readers meanwhile);
- the same shard run twice at once is refused (an exclusive lock on its part file, POSIX only);
- changing ``--num-shards`` between runs is safe: done keys are global, and the shard of an item
  is a stable hash of its key (:func:`shard_of`), so every item belongs to exactly one shard.
"""

from __future__ import annotations

import json
import logging
import os
import re
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from dreamid_core.errors import ConfigError, DreamIDError
from dreamid_core.fileio import atomic_write

from .locking import try_lock  # POSIX only; on Windows shards are not protected against being started twice

logger = logging.getLogger(__name__)

_PART = re.compile(r"^(?P<step>[a-z_-]+)\.part-(?P<i>\d+)-of-(?P<n>\d+)\.jsonl$")


class ShardBusyError(DreamIDError, RuntimeError):
    """A shard's part file is locked by another process running the same shard."""


def shard_of(key: str, num_shards: int) -> int:
    """The shard (0..num_shards-1) that owns ``key``: crc32 of the key, stable across runs and machines."""
    return zlib.crc32(key.encode("utf-8")) % num_shards


def check_shard(shard: int, num_shards: int) -> None:
    if num_shards < 1:
        raise ConfigError(f"--num-shards must be >= 1, got {num_shards}")
    if not 0 <= shard < num_shards:
        raise ConfigError(f"--shard {shard} is outside 0..{num_shards - 1} (for --num-shards {num_shards}); "
                         "shards are numbered from 0")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every complete record of a JSONL file. A final line without its newline (a process killed
    mid-write) is ignored; a broken line elsewhere is logged and skipped, never fatal."""
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    if not text.endswith("\n"):
        if lines[-1]:
            logger.warning("%s: ignoring an incomplete last line (the writer was interrupted)", path)
        lines = lines[:-1]
    out = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            logger.warning("%s line %d is not valid JSON (%s); skipped", path, number, exc)
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def write_jsonl_atomic(path: Path, records: Iterable[dict[str, Any]]) -> Path:
    """Write a whole JSONL file at once (temp file + rename): readers never see half a file."""
    with atomic_write(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record, sort_keys=True, ensure_ascii=False) + "\n")
    return path


class PartWriter:
    """Append-only writer of one shard's part file (use as a context manager)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh: IO[str] | None = None

    def __enter__(self) -> PartWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - closed in __exit__
        if not try_lock(fh):
            fh.close()
            raise ShardBusyError(f"{self.path} is locked: this shard is already running in another process. "
                                 "Wait for it, or give this process another --shard.")
        self._truncate_partial_line(fh)
        self._fh = fh
        return self

    def _truncate_partial_line(self, fh: IO[str]) -> None:
        size = os.path.getsize(self.path)
        if size:
            with open(self.path, "rb") as raw:
                raw.seek(size - 1)
                complete = raw.read(1) == b"\n"
                if not complete:  # rare (a killed writer): find the last newline
                    raw.seek(0)
                    keep = raw.read().rfind(b"\n") + 1
            if not complete:
                fh.truncate(keep)
                logger.warning("%s: cut off an incomplete last record left by an interrupted run", self.path)
        fh.seek(0, os.SEEK_END)

    def append(self, record: dict[str, Any]) -> None:
        if self._fh is None:
            raise RuntimeError("PartWriter.append called outside its `with` block")
        self._fh.write(json.dumps(record, sort_keys=True, ensure_ascii=False) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def __exit__(self, *exc: object) -> None:
        if self._fh is not None:
            self._fh.close()  # closing releases the lock
            self._fh = None


class StepStore:
    """The part files of one step under ``<root>/<step>/parts/``. Records carry a unique ``"key"``."""

    def __init__(self, root: Path, step: str) -> None:
        if not re.fullmatch(r"[a-z_-]+", step):
            raise ValueError(f"step name {step!r} must be lowercase letters, '-' or '_'")
        self.root = Path(root)
        self.step = step
        self.folder = self.root / step / "parts"

    def part_path(self, shard: int, num_shards: int) -> Path:
        check_shard(shard, num_shards)
        return self.folder / f"{self.step}.part-{shard:03d}-of-{num_shards:03d}.jsonl"

    def part_files(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.iterdir() if _PART.match(p.name) and _PART.match(p.name)["step"] == self.step)

    def iter_records(self) -> Iterator[dict[str, Any]]:
        for path in self.part_files():
            yield from read_jsonl(path)

    def records(self) -> dict[str, dict[str, Any]]:
        """key -> record over every part file. A key written twice (two shard layouts raced) keeps
        the first record met, in part-file name order, and is logged."""
        out: dict[str, dict[str, Any]] = {}
        duplicates = 0
        for record in self.iter_records():
            key = record.get("key")
            if not isinstance(key, str):
                continue
            if key in out:
                duplicates += 1
                continue
            out[key] = record
        if duplicates:
            logger.warning("%s: %d key(s) appear in more than one part file; the first record of each is used",
                           self.step, duplicates)
        return out

    def writer(self, shard: int, num_shards: int) -> PartWriter:
        return PartWriter(self.part_path(shard, num_shards))

    def shard_counts(self) -> dict[str, int]:
        """Part file name -> number of complete records (for ``status``)."""
        return {p.name: len(read_jsonl(p)) for p in self.part_files()}
