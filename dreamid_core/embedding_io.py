"""S* as a standard textual-inversion file, readable by ComfyUI's ``embedding:NAME`` and A1111.

SD1.x / SD2.x: ``{"emb_params": [k, D]}``; SDXL: ``{"clip_l": [k, 768], "clip_g": [k, 1280]}``.
The metadata records that DreamIdentity made it, and from which encoder.
"""

from __future__ import annotations

import json
import logging
import os
import re
import unicodedata
from pathlib import Path
from typing import Any

import torch

from .fileio import atomic_save_safetensors

logger = logging.getLogger(__name__)

_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def sanitize_name(name: str) -> str:
    """A file name that is safe everywhere: ASCII letters, digits, ``._-``; no path parts.

    Raises ``ValueError`` if nothing usable is left (e.g. ``"../"``).
    """
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    base = ascii_name.replace("\\", "/").split("/")[-1]
    base = base.removesuffix(".safetensors")
    base = _SAFE_NAME.sub("_", base).strip("._-")
    if not base:
        raise ValueError(f"embedding name {name!r} has no usable characters; use letters, digits, '-' or '_'")
    return base[:100]


def embedding_tensors(parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-text-encoder S* (``{"clip_h": [k, D]}`` or ``{"clip_l", "clip_g"}``) -> file tensors."""
    parts = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in parts.items()}
    for key, t in parts.items():
        if t.ndim != 2:
            raise ValueError(f"embedding {key} must be [k, D], got {tuple(t.shape)}")
    if len(parts) == 1:
        return {"emb_params": next(iter(parts.values()))}
    return dict(parts)


def write_embedding(path: str | os.PathLike[str], parts: dict[str, torch.Tensor], *, overwrite: bool = False,
                    metadata: dict[str, Any] | None = None) -> Path:
    """Write a textual-inversion ``.safetensors``; refuses to replace an existing file unless asked."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_name(path.name + ".safetensors")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists. Choose another name, or set overwrite to true to replace it.")
    tensors = embedding_tensors(parts)
    meta = {"format": "pt", "dreamid": json.dumps(metadata or {}, sort_keys=True, default=str)}
    atomic_save_safetensors(tensors, path, meta)
    logger.info("wrote textual-inversion embedding %s (%s)", path,
                ", ".join(f"{k} {tuple(v.shape)}" for k, v in tensors.items()))
    return path
