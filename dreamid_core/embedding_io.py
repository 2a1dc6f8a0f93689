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

_WINDOWS_DEVICES = {"CON", "PRN", "AUX", "NUL",
                    *(f"{port}{n}" for port in ("COM", "LPT") for n in "123456789\u00b9\u00b2\u00b3")}


def _keep(char: str) -> bool:
    """Letters, digits and combining marks of any script, and ``._-``."""
    return char in "._-" or unicodedata.category(char)[0] in "LNM"


#: Longest name in UTF-8 bytes: with ".safetensors" and the temp-file affixes it stays under 255 bytes.
MAX_NAME_BYTES = 200


def sanitize_name(name: str) -> str:
    """A file name that is safe on every OS: Unicode letters and digits (NFC-normalised), ``._-``;
    anything else becomes ``_``. Raises ``ValueError`` for a path (``/``, ``\\``, ``..``), a Windows
    device name (``CON``, ``nul.txt``, ``COM1`` …), or a name with nothing usable in it.
    """
    text = unicodedata.normalize("NFC", name).strip()
    text = text[: -len(".safetensors")] if text.lower().endswith(".safetensors") else text
    if "/" in text or "\\" in text or text in (".", ".."):
        raise ValueError(f"embedding name {name!r} is a path; give a plain file name such as 'my_identity' "
                         "(it is saved in models/embeddings).")
    base = re.sub("\0+", "_", "".join(c if _keep(c) else "\0" for c in text)).strip("._-")
    if not base:
        raise ValueError(f"embedding name {name!r} has no usable characters; use letters, digits, '-' or '_'")
    if base.split(".")[0].upper() in _WINDOWS_DEVICES:
        raise ValueError(f"embedding name {name!r} is a Windows device name ({base.split('.')[0].upper()}); "
                         "Windows cannot open such a file. Choose another name, e.g. 'my_identity'.")
    while len(base.encode("utf-8")) > MAX_NAME_BYTES:
        base = base[:-1]
    return base.rstrip("._-")


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
