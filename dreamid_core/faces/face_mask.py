"""Soft face masks at latent resolution, and the light augmentation (crop/scale jitter, flip) that the
masks and the photo latents go through together.

API
- ``Crop(x0, y0, w, h, out_w, out_h, flip=False)``: the region ``(x0, y0, w, h)`` of a source grid
  (pixels or latent cells; continuous coordinates, cell ``i`` spans ``[i, i+1)``) resampled to
  ``out_w x out_h`` and optionally mirrored left-right. ``map_points([N, 2] xy)`` maps points into
  the output grid; ``map_box((x1, y1, x2, y2))`` maps a box; ``apply(t[..., H, W])`` resamples a
  tensor (bilinear, ``grid_sample(align_corners=False)``; an exact slice when no resampling is
  needed), e.g. a latent ``[B, C, h, w]``.
- ``square_crop(width, height, size) -> Crop``: the centred square of a photo, resized to ``size``.
- ``scale_crop(src_w, src_h, out_w, out_h) -> Crop``: whole grid rescaled (pixels -> latent cells: /8).
- ``random_crop(generator, src_w, src_h, *, out_w=None, out_h=None, scale_jitter=0.1, flip_p=0.5,
  keep_box=None) -> Crop``: a window of ``f`` times the source side, ``f ~ U(1 - scale_jitter, 1)``,
  at a random position that keeps ``keep_box`` (the face) inside when it fits, flipped with
  probability ``flip_p``; resampled to the output size (default: the source size). Seeded through
  ``generator`` (a CPU ``torch.Generator``).
- ``map_through(points, crops)``: apply several crops in order.
- ``face_mask(box, landmarks, height, width, *, grow=1.15, softness=0.15) -> [height, width]``
  float32 in 0..1: an ellipse with the face box's centre and half-sizes times ``grow``, rotated to the
  eye line when 5 landmarks are given, softened as ``sigmoid((1 - r) / softness)`` where ``r`` is the
  normalised elliptical radius (0.5 on the ellipse, ~1 at its centre). Coordinates are in the mask's
  own grid (map them through the crops first).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Crop:
    """A window of a source grid, resampled to ``out_w x out_h``, optionally mirrored (see module doc)."""

    x0: float
    y0: float
    w: float
    h: float
    out_w: int
    out_h: int
    flip: bool = False

    def __post_init__(self) -> None:
        if not (self.w > 0 and self.h > 0 and self.out_w > 0 and self.out_h > 0):
            raise ValueError(f"crop sizes must be > 0, got {self}")

    def map_points(self, points: np.ndarray | torch.Tensor) -> np.ndarray:
        """``[N, 2]`` (x, y) in the source grid -> the output grid."""
        p = np.asarray(points, dtype=np.float64).reshape(-1, 2).copy()
        p[:, 0] = (p[:, 0] - self.x0) * self.out_w / self.w
        p[:, 1] = (p[:, 1] - self.y0) * self.out_h / self.h
        if self.flip:
            p[:, 0] = self.out_w - p[:, 0]
        return p

    def map_box(self, box: Sequence[float]) -> tuple[float, float, float, float]:
        x1, y1, x2, y2 = box
        (a, b), (c, d) = self.map_points([[x1, y1], [x2, y2]])
        return min(a, c), min(b, d), max(a, c), max(b, d)

    def apply(self, t: torch.Tensor) -> torch.Tensor:
        """Resample ``t[..., H, W]`` (the source grid) to ``[..., out_h, out_w]``."""
        *lead, src_h, src_w = t.shape
        exact = (self.w == self.out_w and self.h == self.out_h and float(self.x0).is_integer()
                 and float(self.y0).is_integer() and 0 <= self.x0 and self.x0 + self.w <= src_w
                 and 0 <= self.y0 and self.y0 + self.h <= src_h)
        if exact:
            x0, y0 = int(self.x0), int(self.y0)
            out = t[..., y0:y0 + self.out_h, x0:x0 + self.out_w]
            return out.flip(-1) if self.flip else out
        x = self.x0 + (torch.arange(self.out_w, dtype=torch.float64) + 0.5) * self.w / self.out_w  # [out_w]
        if self.flip:
            x = x.flip(0)
        y = self.y0 + (torch.arange(self.out_h, dtype=torch.float64) + 0.5) * self.h / self.out_h  # [out_h]
        gx, gy = 2 * x / src_w - 1, 2 * y / src_h - 1
        grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1)  # [out_h, out_w, 2] as (x, y)
        flat = t.reshape(-1, 1, src_h, src_w) if not lead else t.reshape(1, -1, src_h, src_w)
        grid = grid[None].to(device=t.device, dtype=t.dtype if t.is_floating_point() else torch.float32)
        out = F.grid_sample(flat, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return out.reshape(*lead, self.out_h, self.out_w)


def square_crop(width: int, height: int, size: int) -> Crop:
    """The centred square of a ``width x height`` photo, resized to ``size x size``."""
    side = min(width, height)
    return Crop((width - side) / 2, (height - side) / 2, side, side, size, size)


def scale_crop(src_w: int, src_h: int, out_w: int, out_h: int) -> Crop:
    """The whole grid, rescaled (e.g. photo pixels -> latent cells)."""
    return Crop(0.0, 0.0, src_w, src_h, out_w, out_h)


def _uniform(generator: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=generator))


def random_crop(generator: torch.Generator, src_w: int, src_h: int, *, out_w: int | None = None,
                out_h: int | None = None, scale_jitter: float = 0.1, flip_p: float = 0.5,
                keep_box: Sequence[float] | None = None) -> Crop:
    """A seeded augmentation window (see the module docstring)."""
    if not 0 <= scale_jitter < 1:
        raise ValueError(f"scale_jitter must be in [0, 1), got {scale_jitter!r}")
    f = _uniform(generator, 1.0 - scale_jitter, 1.0)
    cw, ch = src_w * f, src_h * f
    lo_x, hi_x, lo_y, hi_y = 0.0, src_w - cw, 0.0, src_h - ch
    if keep_box is not None:
        x1, y1, x2, y2 = keep_box
        if x2 - x1 <= cw:
            lo_x, hi_x = max(lo_x, x2 - cw), min(hi_x, x1)
        if y2 - y1 <= ch:
            lo_y, hi_y = max(lo_y, y2 - ch), min(hi_y, y1)
        if lo_x > hi_x:
            lo_x = hi_x = (src_w - cw) / 2
        if lo_y > hi_y:
            lo_y = hi_y = (src_h - ch) / 2
    x0, y0 = _uniform(generator, lo_x, hi_x), _uniform(generator, lo_y, hi_y)
    flip = float(torch.rand((), generator=generator)) < flip_p
    return Crop(x0, y0, cw, ch, out_w or src_w, out_h or src_h, flip)


def map_through(points: np.ndarray | torch.Tensor, crops: Sequence[Crop]) -> np.ndarray:
    p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    for c in crops:
        p = c.map_points(p)
    return p


def face_mask(box: Sequence[float], landmarks: np.ndarray | None, height: int, width: int, *,
              grow: float = 1.15, softness: float = 0.15) -> torch.Tensor:
    """A soft elliptical face mask ``[height, width]`` (see the module docstring)."""
    if softness <= 0:
        raise ValueError(f"softness must be > 0, got {softness!r}")
    x1, y1, x2, y2 = (float(v) for v in box)
    if not (x2 > x1 and y2 > y1):
        raise ValueError(f"face box must have positive size, got {tuple(box)}")
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    a, b = (x2 - x1) / 2 * grow, (y2 - y1) / 2 * grow
    angle = 0.0
    if landmarks is not None:
        lm = np.asarray(landmarks, dtype=np.float64).reshape(-1, 2)
        if len(lm) >= 2:
            dx, dy = lm[1] - lm[0]  # eye line; mirrored photos swap the eyes, so fold into (-90, 90] deg
            if dx < 0:
                dx, dy = -dx, -dy
            angle = math.atan2(dy, dx) if dx or dy else 0.0
    ys = torch.arange(height, dtype=torch.float64) + 0.5
    xs = torch.arange(width, dtype=torch.float64) + 0.5
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")  # [height, width]
    u = (gx - cx) * math.cos(angle) + (gy - cy) * math.sin(angle)
    v = -(gx - cx) * math.sin(angle) + (gy - cy) * math.cos(angle)
    r = torch.sqrt((u / a) ** 2 + (v / b) ** 2)
    return torch.sigmoid((1.0 - r) / softness).to(torch.float32)
