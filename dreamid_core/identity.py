"""One identity, ready to splice into a prompt: S* per text encoder plus where it came from.

:func:`encode_identity` is the whole photo -> S* path (face pipeline, then the encoder), shared by
the ComfyUI node and the command line so they cannot drift apart.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

import torch

from .encoder import IDEncoder
from .errors import IncompatibleEncoderError
from .faces import FacePipeline, PipelineReport

logger = logging.getLogger(__name__)


@dataclass
class IdentityEmbeds:
    """S* for each text encoder (``{"clip_h": [k, 1024]}``; SDXL ``{"clip_l", "clip_g"}``), float32 CPU."""

    parts: dict[str, torch.Tensor]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        """k, the vectors per occurrence of the trigger; 0 when the identity is switched off (strength 0)."""
        return next(iter(self.parts.values())).shape[0]

    def vectors_for(self, key: str, width: int, where: str = "text encoder") -> torch.Tensor:
        """S* for text encoder ``key`` (e.g. "clip_l"), checked against that encoder's ``width``."""
        if key not in self.parts:
            raise IncompatibleEncoderError(
                f"this identity was made for {sorted(self.parts)} (target {self.info.get('target', '?')}), but the "
                f"{where} has {key}. Use an encoder trained for this model family (SD1.x: clip_l, SD2.x: clip_h, "
                "SDXL: clip_l + clip_g).")
        vec = self.parts[key]
        if vec.shape[-1] != width:
            raise IncompatibleEncoderError(
                f"S* for {key} is {vec.shape[-1]} wide but the {where}'s word embeddings are {width} wide "
                f"(identity target {self.info.get('target', '?')}). Use an encoder trained for this checkpoint's "
                "text encoder (SD1.x 768, SD2.x 1024, SDXL 768 + 1280).")
        return vec


FAMILY_KEYS = "SD1.x: clip_l 768, SD2.x: clip_h 1024, SDXL: clip_l 768 + clip_g 1280"


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
            f"Use an identity made for this model family ({FAMILY_KEYS}).")
    out = {}
    for key, width in widths.items():
        t = parts[key]
        if t.ndim < 2 or t.shape[-1] != width:
            raise IncompatibleEncoderError(
                f"{what}: its {key} vectors have shape {tuple(t.shape)}, but {where}'s {key} word embeddings are "
                f"{width} wide. Use an identity made for this checkpoint's text encoder ({FAMILY_KEYS}).")
        out[key] = t
    return out


def _file_name(path: str | None) -> str | None:
    """Only the encoder's file name: the metadata of a shared embedding must not reveal server paths."""
    return PurePath(str(path).replace("\\", "/")).name if path else None


def parts_from_crops(encoder: IDEncoder, crops: torch.Tensor, *, scale: float = 1.0, combine: str = "average",
                     device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Aligned crops ``[N, 3, 112, 112]`` of ONE person -> S* per text encoder (float32, CPU).

    The one place S* is made from faces (the node, the command line and evaluation all come here).
    Strength (``scale``) 0 switches the identity off: ``[0, D]`` parts, so the trigger drops out."""
    param = next(encoder.parameters())
    crops = crops.to(device=device or param.device, dtype=param.dtype)
    with torch.inference_mode():
        s = encoder.encode(crops, scale=scale, combine=combine)  # [k, out_dim]
    parts = {k: v.detach().to("cpu", torch.float32).clone() for k, v in encoder.split(s).items()}
    if scale == 0:
        parts = {k: v[:0] for k, v in parts.items()}
    return parts


def encode_identity(encoder: IDEncoder, pipeline: FacePipeline, images: Any, *, scale: float = 1.0,
                    combine: str = "average", face_index: int = 0, order: str = "largest",
                    on_missing: str = "error", device: torch.device | str | None = None,
                    callback: Callable[[int, int], None] | None = None) -> tuple[IdentityEmbeds, PipelineReport]:
    """Photos of ONE person -> (S*, the face report). Detection runs on the CPU; the encoder where it is.

    ``callback(i, n)`` runs before each photo (progress bars, interruption points)."""
    report = pipeline.process(images, face_index=face_index, order=order, on_missing=on_missing, callback=callback)
    parts = parts_from_crops(encoder, pipeline.crops(report), scale=scale, combine=combine, device=device)
    info = {"target": encoder.config.target, "num_images": len(report.faces), "skipped": len(report.skipped),
            "scale": scale, "combine": combine, "source": _file_name(getattr(encoder, "source_path", None))}
    return IdentityEmbeds(parts=parts, info=info), report
