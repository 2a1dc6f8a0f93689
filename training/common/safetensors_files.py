"""safetensors files as bytes: a canonical layout, so that equal contents make equal files, and a digest of
the contents, so that equal contents are recognised whatever their provenance says.

The safetensors writer keeps the metadata in a hash map whose order changes from one save to the next, so
one checkpoint exported three times gave three files (three sha256 values) with the same contents.
:func:`canonicalize` rewrites a file's header as sorted, compact JSON (data untouched; safetensors readers
do not depend on the header's order). :func:`content_digest` hashes the tensors (name, dtype, shape, bytes)
and the metadata except provenance (when and from where a file was made), which the evaluation records as
the identity it evaluates.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

from dreamid_core import WeightFormatError
from dreamid_core.fileio import atomic_write, canonical_header

#: metadata keys that say how a file was made, not what it holds (dreamid_core.encoder.weights.META_PROVENANCE)
PROVENANCE_KEYS = ("dreamid_provenance",)
_MAX_HEADER = 100 << 20  # safetensors' own limit on the header size
_BLOCK = 1 << 20


def read_header(fh: IO[bytes], name: str = "file") -> tuple[dict[str, Any], int]:
    """The parsed header of an open safetensors file, and where its data starts."""
    head = fh.read(8)
    size = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
    if not 0 < size <= _MAX_HEADER:
        raise WeightFormatError(f"{name} is not a safetensors file (header size {size}); export or download it again")
    try:
        header = json.loads(fh.read(size))
    except (UnicodeDecodeError, ValueError) as exc:
        raise WeightFormatError(f"{name}: unreadable safetensors header ({exc}); export or download it again") from exc
    if not isinstance(header, dict):
        raise WeightFormatError(f"{name}: the safetensors header is not a JSON object; export or download it again")
    return header, 8 + size


def canonicalize(path: str | Path) -> Path:
    """Rewrite ``path`` (atomically) with its header in canonical order; the tensors' bytes are copied as
    they are. Equal tensors and metadata then give byte-identical files."""
    path = Path(path)
    with open(path, "rb") as src:
        header, _ = read_header(src, path.name)
        with atomic_write(path) as tmp, open(tmp, "wb") as dst:
            dst.write(canonical_header(header))
            shutil.copyfileobj(src, dst, _BLOCK)
    return path


def _chunks(fh: IO[bytes], start: int, length: int) -> Iterable[bytes]:
    fh.seek(start)
    while length > 0:
        block = fh.read(min(length, _BLOCK))
        if not block:
            raise WeightFormatError(f"{getattr(fh, 'name', 'file')} is truncated; export or download it again")
        length -= len(block)
        yield block


def content_digest(path: str | Path, *, ignore: tuple[str, ...] = PROVENANCE_KEYS) -> str:
    """sha256 (first 16 hex digits) of what a safetensors file holds: every tensor's name, dtype, shape and
    bytes, and the metadata but the keys in ``ignore``. A re-export of the same checkpoint has the same
    digest; another checkpoint, another config or other weights have another."""
    path = Path(path)
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        header, data = read_header(fh, path.name)
        meta = {k: v for k, v in (header.pop("__metadata__", None) or {}).items() if k not in ignore}
        layout = {name: [entry.get("dtype"), entry.get("shape")] for name, entry in header.items()}
        digest.update(json.dumps({"metadata": meta, "tensors": layout}, sort_keys=True).encode())
        for name in sorted(header):
            begin, end = header[name]["data_offsets"]
            for block in _chunks(fh, data + begin, end - begin):
                digest.update(block)
    return digest.hexdigest()[:16]


def file_digest(path: str | Path) -> str:
    """sha256 (first 16 hex digits) of a file's bytes (for files that are not safetensors)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def identity_digest(path: str | Path) -> str:
    """What the evaluation records as the identity it evaluates: :func:`content_digest` for
    ``.safetensors``, the file's own digest for other formats (``.pt``/``.bin`` embeddings)."""
    path = Path(path)
    return content_digest(path) if path.suffix == ".safetensors" else file_digest(path)
