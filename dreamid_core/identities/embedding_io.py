"""S* as a standard textual-inversion file, readable by ComfyUI's ``embedding:NAME`` and A1111: written
here, and read here (this pack's, diffusers' and A1111's files alike).

SD1.x / SD2.x: ``{"emb_params": [k, D]}``; SDXL: ``{"clip_l": [k, 768], "clip_g": [k, 1280]}``.
The metadata records that DreamIdentity made it, and from which encoder.
"""

from __future__ import annotations

import logging
import os
import re
import unicodedata
from pathlib import Path
from typing import Any

import torch

from ..errors import WeightFormatError
from .families import PART_WIDTHS, WORD_PARTS

logger = logging.getLogger(__name__)

_WIDTH_KEYS = {w: k for k, w in PART_WIDTHS.items()}  # 768 clip_l, 1024 clip_h, 1280 clip_g, 4096 t5xxl

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
    device name (``CON``, ``nul.txt``, ``COM1`` …), a name with nothing usable in it, or one longer than
    ``MAX_NAME_BYTES`` in UTF-8 (never cut silently).
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
    size = len(base.encode("utf-8"))
    if size > MAX_NAME_BYTES:
        raise ValueError(f"embedding name {name[:40]!r}... is {size} bytes long as a file name; at most {MAX_NAME_BYTES} "
                         "fit every OS's paths (Windows: 260 characters for the whole path). Choose a shorter name.")
    return base


def embedding_tensors(parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-text-encoder S* (``{"clip_h": [k, D]}`` or ``{"clip_l", "clip_g"}``) -> file tensors."""
    parts = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in parts.items()}
    for key, t in parts.items():
        if t.ndim != 2:
            raise ValueError(f"embedding {key} must be [k, D], got {tuple(t.shape)}")
    if len(parts) == 1:
        return {"emb_params": next(iter(parts.values()))}
    return dict(parts)


# -- reading (this pack's files, diffusers learned_embeds, A1111 .pt) ---------------------------------

def _key_for(t: torch.Tensor, single_key: str | None, source: str) -> str:
    if single_key:
        return single_key
    width = int(t.shape[-1])
    if width in _WIDTH_KEYS:
        return _WIDTH_KEYS[width]
    raise WeightFormatError(f"{source}: one embedding {width} wide; cannot tell which text encoder it is for. "
                            "Connect the CLIP it was made for (or pass single_key='clip_l'/'clip_h').")


def embedding_parts(raw: dict[str, Any], *, single_key: str | None = None,
                    source: str = "embedding") -> dict[str, torch.Tensor]:
    """A textual-inversion file's tensors -> ``{text encoder key: [k, D]}`` float32 on the CPU.

    Named keys (``clip_l``/``clip_g``/``clip_h``, this pack's SDXL files) are kept; one unnamed embedding
    (``emb_params``, A1111's ``string_to_param``, diffusers' ``{"<token>": t}``) goes to ``single_key``,
    or, without one, to the text encoder of its width (768 clip_l, 1024 clip_h, 1280 clip_g)."""
    if "string_to_param" in raw and isinstance(raw["string_to_param"], dict):  # A1111 .pt
        raw = {"string_to_param." + k: v for k, v in raw["string_to_param"].items()}
    tensors = {k: v for k, v in raw.items() if torch.is_tensor(v)}
    named = {k: tensors[k] for k in sorted(WORD_PARTS) if k in tensors}
    if named:
        parts = named
    elif "emb_params" in tensors:
        parts = {_key_for(tensors["emb_params"], single_key, source): tensors["emb_params"]}
    elif len(tensors) == 1:  # string_to_param.* or diffusers {"<tok>": t}
        (t,) = tensors.values()
        parts = {_key_for(t, single_key, source): t}
    else:
        raise WeightFormatError(f"{source}: not a textual-inversion file (keys {sorted(raw)[:8]}); expected "
                                "emb_params, clip_l/clip_g, clip_h, string_to_param or one learned embedding")
    out = {}
    for k, t in parts.items():
        t = t.detach().to("cpu", torch.float32)
        if t.numel() == 0:
            raise WeightFormatError(f"{source}: its {k} embedding is empty (shape {tuple(t.shape)}); the file is "
                                    "damaged or was saved without vectors. Save the identity again.")
        if t.ndim == 3 and t.shape[0] == 1:  # [1, k, D]: one batch of vectors
            t = t[0]
        if t.ndim == 1:
            t = t[None]
        if t.ndim != 2:
            raise WeightFormatError(f"{source}: its {k} embedding has shape {tuple(t.shape)}; a textual-inversion "
                                    "embedding is [k, width] (k vectors). Is this a per-stage identity? Load it from "
                                    "models/dreamidentity/identities.")
        out[k] = t
    ks = {t.shape[0] for t in out.values()}
    if len(ks) != 1:
        raise WeightFormatError(f"{source}: the text encoders' embeddings have different token counts {sorted(ks)}")
    return out


def _looks_pickled(path: Path) -> str | None:
    """"a pickle" / "a torch.save zip (pickle inside)" when the file starts like one, else None."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError:
        return None
    if head.startswith(b"PK\x03\x04"):
        return "a torch.save zip file (a pickle inside)"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a pickle"
    return None


def read_embedding_file(path: str | os.PathLike[str], *, label: str | None = None
                        ) -> tuple[dict[str, Any], dict[str, str]]:
    """The raw tensors and metadata of a ``.safetensors`` file, or of a ``.pt``/``.bin``/``.pth`` read with
    ``torch.load(weights_only=True)`` only (a pickle that needs more may run code: refused). Messages name the
    file as ``label`` (e.g. relative to its models folder) when given."""
    path = Path(path)
    name = label or str(path)
    if not path.is_file():
        raise FileNotFoundError(f"embedding file {name} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except Exception as exc:  # safetensors raises its own error types
            kind = _looks_pickled(path)
            if kind:
                raise WeightFormatError(f"{name}: refused: it is {kind} renamed .safetensors, and loading a pickle "
                                        "may run code. Get the real .safetensors file, or convert it with a tool you "
                                        "trust.") from exc
            raise WeightFormatError(f"{name}: not a readable .safetensors file ({exc})") from exc
    if path.suffix in (".pt", ".bin", ".pth"):
        try:
            raw = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # UnpicklingError and friends: refuse, never unpickle code
            raise WeightFormatError(
                f"{name}: refused. It cannot be read with torch.load(weights_only=True) ({type(exc).__name__}), so "
                "it may run code when loaded. Convert it to .safetensors with a tool you trust.") from exc
        if not isinstance(raw, dict):
            raise WeightFormatError(f"{name}: holds a {type(raw).__name__}, expected a dict of tensors")
        return raw, {}
    raise WeightFormatError(f"{name}: unsupported extension {path.suffix!r}; use .safetensors (or .pt / .bin)")


def read_embedding(path: str | os.PathLike[str], *, single_key: str | None = None) -> dict[str, torch.Tensor]:
    """A textual-inversion file -> ``{text encoder key: [k, D]}`` (:func:`embedding_parts` of its tensors)."""
    raw, _ = read_embedding_file(path)
    return embedding_parts(raw, single_key=single_key, source=str(path))
