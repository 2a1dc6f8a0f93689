"""Photos of one person -> S* (an :class:`~dreamid_core.identities.embeds.IdentityEmbeds`).

:func:`encode_identity` is the whole photo -> S* path (face pipeline, then the encoder), shared by
the ComfyUI node and the command line so they cannot drift apart.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import PurePath
from typing import Any

import torch

from ..faces.pipeline import FacePipeline, PipelineReport
from ..identities.embeds import IdentityEmbeds
from .model import IDEncoder

logger = logging.getLogger(__name__)


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
