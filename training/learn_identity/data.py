"""The photos of one person -> face-centred squares, VAE-encoded ONCE, and the per-step augmentation.

Each photo goes through the core face pipeline (the largest face; no face -> FaceNotFoundError
naming the photo). It is cut to the largest square that holds the face (centred on it where the
photo allows), resized to the training resolution with antialiasing, and encoded by the VAE once:
``vae.encode(x).latent_dist.mode() * scaling_factor`` (float32, :func:`training.common.latents.encode_latents`).
The face box and the five landmarks go through the same crop and resize, then onto the latent grid.

Every step, each sample gets the core's augmentation (:func:`dreamid_core.face_mask.random_crop`):
a window of 90..100 % of the latent, placed so the face stays inside, flipped half the time,
resampled back to the latent size — and its face mask is drawn from the box and landmarks mapped
through the same window (:func:`dreamid_core.face_mask.face_mask`). The same code makes the
ComfyUI node's views. Draws come from the step's seeded generator.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dreamid_core import FaceNotFoundError, FacePipeline, ImageInputError
from dreamid_core.face_mask import Crop, face_mask, random_crop, scale_crop
from dreamid_core.images import load_image

from ..common.latents import encode_latents

logger = logging.getLogger(__name__)

PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@dataclass
class PhotoLatents:
    """The encoded photos: ``latents [N, C, h, w]`` float32 CPU, face geometry in latent cells."""

    latents: torch.Tensor
    boxes: list[tuple[float, float, float, float]]
    landmarks: list[np.ndarray]  # [5, 2] each
    resolution: int

    def __len__(self) -> int:
        return self.latents.shape[0]

    def sample(self, generator: torch.Generator, batch: int, *, scale_jitter: float = 0.1, flip_p: float = 0.5,
               augment: bool = True, masks: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``batch`` augmented latents ``[B, C, h, w]`` and their face masks ``[B, h, w]`` (None when
        ``masks`` is False: plain textual inversion does not need them)."""
        n, _, h, w = self.latents.shape
        picks = torch.randint(0, n, (batch,), generator=generator).tolist()
        lats, out_masks = [], []
        for i in picks:
            crop = (random_crop(generator, w, h, scale_jitter=scale_jitter, flip_p=flip_p, keep_box=self.boxes[i])
                    if augment else Crop(0.0, 0.0, w, h, w, h))
            lats.append(crop.apply(self.latents[i]))  # [C, h, w]
            if masks:
                out_masks.append(face_mask(crop.map_box(self.boxes[i]), crop.map_points(self.landmarks[i]), h, w))
        return torch.stack(lats), torch.stack(out_masks) if masks else None


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


def face_square(w: int, h: int, box: Sequence[float]) -> tuple[int, int, int]:
    """``(x0, y0, side)``: the largest square of a ``w x h`` photo, centred on the face box where it can be."""
    side = min(w, h)
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    x0 = int(round(min(max(cx - side / 2, 0), w - side)))
    y0 = int(round(min(max(cy - side / 2, 0), h - side)))
    return x0, y0, side


def prepare_photo(photo: np.ndarray, face, resolution: int) -> tuple[torch.Tensor, Crop]:
    """The face-centred square of ``photo`` at ``resolution`` (pixels -1..1 ``[3, R, R]``) and its crop."""
    h, w = photo.shape[:2]
    x0, y0, side = face_square(w, h, face.detection.box)
    image = torch.from_numpy(np.ascontiguousarray(photo[y0:y0 + side, x0:x0 + side])).permute(2, 0, 1)[None]
    pixels = F.interpolate(image.float() / 127.5 - 1.0, size=(resolution, resolution), mode="bilinear",
                           antialias=side > resolution, align_corners=False)[0]
    return pixels, Crop(float(x0), float(y0), float(side), float(side), resolution, resolution)


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
                  device: torch.device | str = "cpu") -> PhotoLatents:
    """Each photo's face square, VAE-encoded once, with its face geometry on the latent grid."""
    if resolution < 8 or resolution % 8:
        raise ValueError(f"resolution must be a positive multiple of 8, got {resolution}")
    latents, boxes, marks = [], [], []
    for photo, face in zip(photos, faces, strict=True):
        pixels, crop = prepare_photo(photo, face, resolution)
        lat = encode_latents(vae, pixels[None].to(device))[0].cpu()  # batch of one: [C, h, w]
        to_latent = scale_crop(resolution, resolution, lat.shape[-1], lat.shape[-2])
        boxes.append(to_latent.map_box(crop.map_box(face.detection.box)))
        marks.append(to_latent.map_points(crop.map_points(face.detection.landmarks)))
        latents.append(lat)
    out = PhotoLatents(torch.stack(latents), boxes, marks, resolution)
    logger.info("%d photo(s) encoded once at %d px -> latents %s", len(out), resolution, tuple(out.latents.shape[1:]))
    return out
