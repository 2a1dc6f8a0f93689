"""The photos of one person for learning: face-centred squares, their latents, and the per-step batches.

API
- ``face_square(w, h, box) -> (x0, y0, side)``: the largest square of a ``w x h`` photo, centred on
  the face box as far as the borders allow.
- ``face_squares(photos, faces, resolution) -> (pixels [N, R, R, 3] float32 0..1, crops)``: each
  photo's face square resized to ``resolution`` (bilinear, antialiased when shrinking). ``photos`` are
  ``[H, W, 3]`` arrays or tensors (uint8 0..255 or float 0..1); ``faces`` are
  :class:`dreamid_core.faces.pipeline.FaceResult` (``image_index`` picks the photo). Both hosts feed these pixels
  to their VAE, so the node and the command line learn from the same pixels.
- ``PhotoSet.from_faces(latents, faces, crops, resolution)``: the latents ``[N, C, h, w]`` (the host's
  VAE, model latent space) with each face's box and five landmarks mapped onto the latent grid.
- ``PhotoSet.draw(generator, batch, ...) -> (latents [B, C, h, w], masks [B, h, w] or None)``: photos
  drawn with replacement, each through the core augmentation
  (:func:`dreamid_core.faces.face_mask.random_crop`: a window of 90..100 %, the face kept inside, flipped
  half the time) with its soft face mask drawn through the same window.
- ``PhotoSet.fixed(indices) -> (latents, masks)``: the photos as they are (the measurement).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..faces.face_mask import Crop, face_mask, random_crop, scale_crop


def face_square(w: int, h: int, box: Sequence[float]) -> tuple[int, int, int]:
    """``(x0, y0, side)``: the largest square of a ``w x h`` photo, centred on the face box where it can be."""
    side = min(w, h)
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    x0 = int(round(min(max(cx - side / 2, 0), w - side)))
    y0 = int(round(min(max(cy - side / 2, 0), h - side)))
    return x0, y0, side


def _float_photo(photo: np.ndarray | torch.Tensor) -> torch.Tensor:
    t = photo if isinstance(photo, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(photo))
    if t.dtype == torch.uint8:
        return t.float() / 255.0
    return t.float()


def face_squares(photos: Sequence, faces: Sequence, resolution: int) -> tuple[torch.Tensor, list[Crop]]:
    """Each face's square of its photo at ``resolution`` (see the module docstring)."""
    pixels, crops = [], []
    for face in faces:
        w, h = face.image_size
        x0, y0, side = face_square(w, h, face.detection.box)
        square = _float_photo(photos[face.image_index])[y0:y0 + side, x0:x0 + side, :3]  # [side, side, 3]
        px = F.interpolate(square.permute(2, 0, 1)[None], size=(resolution, resolution), mode="bilinear",
                           antialias=side > resolution, align_corners=False)[0].permute(1, 2, 0)  # [R, R, 3]
        pixels.append(px.clamp(0, 1))
        crops.append(Crop(float(x0), float(y0), float(side), float(side), resolution, resolution))
    return torch.stack(pixels), crops


@dataclass
class PhotoSet:
    """Latents ``[N, C, h, w]`` (float32, CPU) with the faces' geometry in latent cells."""

    latents: torch.Tensor
    boxes: list[tuple[float, float, float, float]]
    landmarks: list[np.ndarray]  # [5, 2] each
    resolution: int

    def __len__(self) -> int:
        return self.latents.shape[0]

    @classmethod
    def from_faces(cls, latents: torch.Tensor, faces: Sequence, crops: Sequence[Crop], resolution: int) -> PhotoSet:
        if latents.ndim != 4 or latents.shape[0] != len(faces):
            raise ValueError(f"latents {tuple(latents.shape)} do not hold one [C, h, w] per face ({len(faces)})")
        h, w = latents.shape[-2:]
        to_latent = scale_crop(resolution, resolution, w, h)
        boxes = [to_latent.map_box(c.map_box(f.detection.box)) for f, c in zip(faces, crops, strict=True)]
        marks = [to_latent.map_points(c.map_points(f.detection.landmarks)) for f, c in zip(faces, crops, strict=True)]
        return cls(latents.detach().to("cpu", torch.float32).contiguous(), boxes, marks, resolution)

    def _mask(self, i: int, crop: Crop) -> torch.Tensor:
        h, w = self.latents.shape[-2:]
        return face_mask(crop.map_box(self.boxes[i]), crop.map_points(self.landmarks[i]), h, w)

    def draw(self, generator: torch.Generator, batch: int, *, augment: bool = True, scale_jitter: float = 0.1,
             flip_p: float = 0.5, masks: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``batch`` augmented latents and their face masks (see the module docstring)."""
        n, _, h, w = self.latents.shape
        picks = torch.randint(0, n, (batch,), generator=generator).tolist()
        lats, out = [], []
        for i in picks:
            crop = (random_crop(generator, w, h, scale_jitter=scale_jitter, flip_p=flip_p, keep_box=self.boxes[i])
                    if augment else Crop(0.0, 0.0, w, h, w, h))
            lats.append(crop.apply(self.latents[i]))  # [C, h, w]
            if masks:
                out.append(self._mask(i, crop))
        return torch.stack(lats), torch.stack(out) if masks else None

    def fixed(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = self.latents.shape[-2:]
        whole = Crop(0.0, 0.0, w, h, w, h)
        return self.latents[list(indices)], torch.stack([self._mask(i, whole) for i in indices])
