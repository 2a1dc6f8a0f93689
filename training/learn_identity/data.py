"""The photos of one person from files -> the learner's :class:`dreamid_core.learning.PhotoSet`.

Each photo goes through the core face pipeline (the largest face; no face -> FaceNotFoundError
naming the photo), then :func:`dreamid_core.learning.face_squares` (the same pixels the ComfyUI node
makes) and the base model's VAE, once per photo: ``vae.encode(x).latent_dist.mode() * scaling_factor``
(float32, :func:`training.common.latents.encode_latents`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from dreamid_core import FaceNotFoundError, FacePipeline, ImageInputError
from dreamid_core.faces.images import load_image
from dreamid_core.learning import PhotoSet, face_squares

from ..common.latents import encode_latents

logger = logging.getLogger(__name__)

PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def photo_paths(inputs: Sequence[str | Path]) -> list[Path]:
    """Files as given; folders expanded to their photos (sorted)."""
    out: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES)
            if not found:
                raise ImageInputError(f"{path} holds no photos ({', '.join(PHOTO_SUFFIXES)})")
            out.extend(found)
        elif path.is_file():
            out.append(path)
        else:
            raise FileNotFoundError(f"photo not found: {path}")
    if not out:
        raise ImageInputError("no photos given: pass one or more photos (or a folder) of the person")
    return out


def detect_faces(paths: Sequence[Path], pipeline: FacePipeline) -> tuple[list[np.ndarray], list]:
    """The photos and their largest face each (no face in a photo -> FaceNotFoundError naming it)."""
    photos, faces = [], []
    for i, path in enumerate(paths):
        photo = load_image(path)
        try:
            faces.append(pipeline.process_one(photo, image_index=i))
        except FaceNotFoundError as exc:
            raise FaceNotFoundError(f"{path}: {exc} Every photo given to learn an identity must show the person's "
                                    "face; remove this one or crop it closer.") from exc
        photos.append(photo)
    return photos, faces


def encode_photos(photos: Sequence[np.ndarray], faces: Sequence, vae: torch.nn.Module, *, resolution: int,
                  device: torch.device | str = "cpu") -> PhotoSet:
    """Each face's square, VAE-encoded once, with its geometry on the latent grid."""
    pixels, crops = face_squares(photos, faces, resolution)  # [N, R, R, 3] 0..1
    latents = torch.cat([encode_latents(vae, (px.permute(2, 0, 1)[None] * 2 - 1).to(device)).cpu() for px in pixels])
    out = PhotoSet.from_faces(latents, faces, crops, resolution)
    logger.info("%d photo(s) encoded once at %d px -> latents %s", len(out), resolution, tuple(out.latents.shape[1:]))
    return out
