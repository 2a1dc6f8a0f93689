"""An identity ready to splice into a prompt (S* per text encoder), and the one rule for which identity fits
which text encoder.

API
- ``IdentityEmbeds(parts, info)``: S* for each text encoder, keyed by ComfyUI's ``embedding_key``
  (``{"clip_h": [k, 1024]}``; SDXL ``{"clip_l", "clip_g"}``; FLUX.1 ``{"clip_l", "t5xxl"}``), float32 CPU,
  and where it came from (``info``). k = 0 switches the identity off.
- ``fit_parts(parts, widths, what, where)``: the parts a text-encoder set reads (see its docstring).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import IncompatibleEncoderError
from .families import FAMILY_WIDTHS


@dataclass
class IdentityEmbeds:
    """S* for each text encoder (``{"clip_h": [k, 1024]}``; SDXL ``{"clip_l", "clip_g"}``), float32 CPU."""

    parts: dict[str, torch.Tensor]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        """k, the vectors per occurrence of the trigger; 0 when the identity is switched off (strength 0)."""
        return next(iter(self.parts.values())).shape[0]




def fit_parts(parts: dict[str, torch.Tensor], widths: dict[str, int], what: str = "this identity",
              where: str = "this CLIP") -> dict[str, torch.Tensor]:
    """The parts of an identity that a text-encoder set reads: one ``[k, D]`` (or ``[..., k, D]``) per key of
    ``widths`` (``{"clip_l": 768, ...}``), with the width that key takes. This is THE rule of the pack for
    "does this identity fit this text encoder", as ComfyUI's ``embedding:NAME`` applies it: a part for every
    encoder is required, parts for other encoders are ignored (an SDXL identity works on SD1.x through its
    ``clip_l`` half). Raises :class:`IncompatibleEncoderError` naming the keys and widths otherwise."""
    missing = [k for k in widths if k not in parts]
    if missing:
        raise IncompatibleEncoderError(
            f"{what} holds vectors for {sorted(parts)}, but {where} needs {sorted(widths)} (no {', '.join(missing)}). "
            f"Use an identity made for this model family ({FAMILY_WIDTHS}).")
    out = {}
    for key, width in widths.items():
        t = parts[key]
        if t.ndim < 2 or t.shape[-1] != width:
            raise IncompatibleEncoderError(
                f"{what}: its {key} vectors have shape {tuple(t.shape)}, but {where}'s {key} word embeddings are "
                f"{width} wide. Use an identity made for this checkpoint's text encoder ({FAMILY_WIDTHS}).")
        out[key] = t
    return out
