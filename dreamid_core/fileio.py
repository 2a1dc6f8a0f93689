"""The pack's files: atomic writes (a reader, or a crash, never sees half a file under its real name), the
one check of a file's format version, and the fields of a config dataclass a file may not hold."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from .errors import WeightFormatError


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux: /proc); elsewhere it
    is set and restored at once."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _final_mode(path: Path) -> int:
    """The mode ``open(path, "w")`` would leave: an existing file keeps its mode, a new one gets
    0o666 minus the umask (mkstemp's temp files are 0o600, which would hide them from other users)."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return 0o666 & ~current_umask()


@contextmanager
def atomic_write(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path beside ``path``; write it, and on success it is renamed onto ``path``
    with the mode a plain write would give it (see :func:`_final_mode`).

    On any error (or interruption) the temp file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _final_mode(path))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def safetensors_target(path: str | os.PathLike[str], *, overwrite: bool, label: str | None = None) -> Path:
    """``path`` with ``.safetensors`` appended when it lacks it; an existing file is refused unless
    ``overwrite`` (the message names the file as ``label`` when given, e.g. relative to its models folder)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_name(path.name + ".safetensors")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{label or path} already exists. Choose another name, or set overwrite to true to "
                              "replace it.")
    return path


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> Path:
    """Write ``tensors`` (with ``metadata``) to ``path`` atomically, byte-reproducibly: the header's JSON is
    written with sorted keys (safetensors itself orders the metadata as a hash map does, so the same
    contents gave different files), the tensor data as safetensors lays it out."""
    blob = save(tensors, metadata=metadata)
    size = struct.unpack("<Q", blob[:8])[0]
    with atomic_write(path) as tmp:
        Path(tmp).write_bytes(canonical_header(json.loads(blob[8:8 + size])) + blob[8 + size:])
    return path


def canonical_header(header: dict[str, Any]) -> bytes:
    """A safetensors header as written canonically: length prefix + sorted compact JSON, padded with spaces to
    8 bytes as safetensors pads it. Equal tensors and metadata then give byte-identical files."""
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def check_format_version(found: object, path: object, kind: str, supported: int) -> int:
    """The one place a file's format version is checked; returns it as an int.

    ``found`` is the version the file states (an int from a JSON config, or the string safetensors
    metadata holds); ``path`` names the file in the message, ``kind`` what it is ("encoder",
    "identity"). A missing or non-integer version, or one newer than ``supported``, is refused.
    """
    if isinstance(found, str) and found.strip().isdigit():
        found = int(found)
    if not isinstance(found, int) or isinstance(found, bool) or found < 0:
        raise WeightFormatError(f"{path}: the {kind} format_version is missing or not an integer ({found!r}); "
                                "the file is damaged or was not written by DreamIdentity: export or save it again")
    if found > supported:
        raise WeightFormatError(
            f"{path}: written in {kind} format version {found}, this DreamIdentity reads up to {supported}. "
            "Update the pack (git pull, or Update in ComfyUI-Manager) to load it.")
    return found


def unknown_fields(kind: type, data: dict[str, Any]) -> list[str]:
    """Keys of ``data`` that are not fields of the dataclass ``kind`` (sorted)."""
    return sorted(set(data) - {f.name for f in dataclasses.fields(kind)})
