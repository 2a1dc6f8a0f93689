"""Training checkpoints, written so that a crash at any instant leaves a usable run folder.

``<run>/checkpoint-<step>/`` holds:

- ``encoder.safetensors``: the encoder via :func:`dreamid_core.save_encoder` (a file the ComfyUI
  nodes load as is),
- ``training_state.pt``: optimizer, lr scheduler, sampler position, step (plain tensors and
  numbers; read back with ``torch.load(weights_only=True)``),
- ``rng_state_<rank>.pt``: python, numpy, torch (and CUDA) RNG states of each process,
- ``config.json``: the :class:`~training.train.config.ExperimentConfig`,
- ``complete.json``: written last, lists every file and its size, and when it was written.

A checkpoint is assembled in ``.tmp-checkpoint-<step>/`` and renamed into place (an atomic
``os.replace`` of the folder); only then is ``<run>/latest`` (one line: the folder's name)
replaced, again atomically. A folder without a valid ``complete.json`` is never used: resuming
takes the newest complete checkpoint, whatever happened to the others.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dreamid_core.fileio import atomic_write

logger = logging.getLogger(__name__)

PREFIX = "checkpoint-"
TEMP_PREFIX = ".tmp-" + PREFIX
TRASH_PREFIX = ".trash-"
LATEST = "latest"
COMPLETE = "complete.json"
ENCODER_FILE = "encoder.safetensors"
STATE_FILE = "training_state.pt"
CONFIG_FILE = "config.json"
_NAME = re.compile(rf"^{PREFIX}(\d+)$")


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int

    @property
    def encoder_path(self) -> Path:
        return self.path / ENCODER_FILE

    def training_state(self) -> dict[str, Any]:
        return torch.load(self.path / STATE_FILE, map_location="cpu", weights_only=True)

    def rng_state(self, rank: int) -> dict[str, Any] | None:
        path = self.path / f"rng_state_{rank}.pt"
        return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None

    def config_json(self) -> str:
        return (self.path / CONFIG_FILE).read_text()

    def written(self) -> str:
        """When the checkpoint was written (UTC, ISO 8601): ``complete.json``'s record, or for checkpoints
        older than that record the file's modification time."""
        path = self.path / COMPLETE
        try:
            when = json.loads(path.read_text()).get("written")
        except (OSError, ValueError, AttributeError):
            when = None
        if isinstance(when, str):
            return when
        stamp = dt.datetime.fromtimestamp(int(path.stat().st_mtime), dt.timezone.utc)
        return stamp.isoformat(timespec="seconds")


def is_complete(folder: Path) -> bool:
    """True when ``complete.json`` is readable and every file it lists exists with its size."""
    try:
        manifest = json.loads((folder / COMPLETE).read_text())
        return all((folder / name).is_file() and (folder / name).stat().st_size == size
                   for name, size in manifest["files"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_text_atomic(path: Path, text: str) -> None:
    with atomic_write(path) as tmp, open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


class CheckpointManager:
    """Checkpoints of one run folder. Writing is split in steps so that several processes can
    each add their RNG state: :meth:`begin` (main) -> :meth:`write_rng` (every rank) ->
    :meth:`commit` (main)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)

    def temp_dir(self, step: int) -> Path:
        return self.run_dir / f"{TEMP_PREFIX}{step}"

    def final_dir(self, step: int) -> Path:
        return self.run_dir / f"{PREFIX}{step}"

    # -- reading ----------------------------------------------------------------------------------
    def complete(self) -> list[Checkpoint]:
        """Every complete checkpoint, oldest first."""
        if not self.run_dir.is_dir():
            return []
        found = []
        for child in self.run_dir.iterdir():
            m = _NAME.match(child.name)
            if m and child.is_dir():
                if is_complete(child):
                    found.append(Checkpoint(child, int(m.group(1))))
                else:
                    logger.warning("ignoring incomplete checkpoint %s (no valid %s)", child, COMPLETE)
        return sorted(found, key=lambda c: c.step)

    def latest(self) -> Checkpoint | None:
        """The newest complete checkpoint (the ``latest`` pointer is checked against it and logged)."""
        found = self.complete()
        if not found:
            return None
        newest = found[-1]
        pointer = self.run_dir / LATEST
        named = pointer.read_text().strip() if pointer.is_file() else None
        if named != newest.path.name:
            logger.warning("%s names %r but the newest complete checkpoint is %s; using %s",
                           pointer, named, newest.path.name, newest.path.name)
        return newest

    # -- writing ----------------------------------------------------------------------------------
    def cleanup(self) -> None:
        """Remove leftovers of interrupted writes (temp and trash folders)."""
        if not self.run_dir.is_dir():
            return
        for child in self.run_dir.iterdir():
            if child.is_dir() and child.name.startswith((TEMP_PREFIX, TRASH_PREFIX)):
                logger.info("removing %s, left by an interrupted checkpoint write", child)
                shutil.rmtree(child, ignore_errors=True)

    def begin(self, step: int) -> Path:
        tmp = self.temp_dir(step)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        return tmp

    def write_rng(self, step: int, rank: int) -> None:
        torch.save(capture_rng(), self.temp_dir(step) / f"rng_state_{rank}.pt")

    def commit(self, step: int, *, encoder, config, training_state: dict[str, Any],
               provenance: dict[str, Any], include_backbone: bool = True) -> Checkpoint:
        """Write the main files, mark complete, move into place, update ``latest``."""
        from dreamid_core import save_encoder

        tmp = self.temp_dir(step)
        save_encoder(encoder, tmp / ENCODER_FILE, include_backbone=include_backbone, provenance=provenance)
        torch.save(training_state, tmp / STATE_FILE)
        config.save(tmp / CONFIG_FILE)
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        for name in files:
            with open(tmp / name, "rb") as fh:
                os.fsync(fh.fileno())
        written = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")  # the weights' date in exports
        (tmp / COMPLETE).write_text(json.dumps({"step": step, "written": written, "files": files}, indent=1))
        _fsync_dir(tmp)
        final = self.final_dir(step)
        if final.exists():  # re-written after a resume from an older checkpoint
            trash = self.run_dir / f"{TRASH_PREFIX}{final.name}"
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(self.run_dir)
        _write_text_atomic(self.run_dir / LATEST, final.name + "\n")
        logger.info("checkpoint %s written", final)
        return Checkpoint(final, step)

    def prune(self, keep: int | None) -> None:
        """Delete all but the newest ``keep`` complete checkpoints (renamed away first)."""
        if keep is None:
            return
        for old in self.complete()[:-keep]:
            trash = self.run_dir / f"{TRASH_PREFIX}{old.path.name}"
            os.replace(old.path, trash)
            shutil.rmtree(trash, ignore_errors=True)
            logger.info("removed old checkpoint %s (keep_checkpoints=%d)", old.path.name, keep)


def resolve_checkpoint(path: str | Path) -> Checkpoint:
    """A checkpoint folder, or a run folder (its newest complete checkpoint)."""
    path = Path(path)
    m = _NAME.match(path.name)
    if m and path.is_dir():
        if not is_complete(path):
            raise FileNotFoundError(f"{path} is an incomplete checkpoint (interrupted while being written); "
                                    "use an earlier one or the run folder")
        return Checkpoint(path, int(m.group(1)))
    if path.is_dir():
        found = CheckpointManager(path).latest()
        if found is None:
            raise FileNotFoundError(f"{path} holds no complete checkpoint-<step> folder")
        return found
    raise FileNotFoundError(f"checkpoint not found: {path}; give runs/<name>/checkpoint-<step> or runs/<name>")


# -- RNG states ----------------------------------------------------------------------------------

def capture_rng() -> dict[str, Any]:
    """Python, numpy, torch and CUDA RNG states as plain tensors/tuples (safe for weights_only loads)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
