"""Scene switch: place a reference face's keypoints on a canvas and draw a ControlNet hint.

The five detected landmarks (or the frontal ArcFace template) keep their shape (pose); they are
moved so the face centre sits at ``(x, y)`` (fractions of the canvas; values outside 0..1 put the
centre past an edge) and scaled so the face is ``size`` of the canvas height. Two hint styles:
OpenPose (COCO-18 head: nose, neck, eyes, ears, with OpenPose's colours) and InstantID-style
5-point keypoints.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from .align import ARCFACE_TEMPLATE_112

logger = logging.getLogger(__name__)

#: face height (forehead to chin) per eye-centre-to-mouth-centre distance, from the ArcFace template
FACE_HEIGHT_PER_EYE_MOUTH = 2.75
STYLES = ("openpose", "keypoints_5")

# OpenPose's 18 colours (RGB), indexed by COCO-18 keypoint / limb number
_OP_COLORS = [(255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
              (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
              (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85)]
# COCO-18 head: 0 nose, 1 neck, 14 right eye, 15 left eye, 16 right ear, 17 left ear
_OP_HEAD_LIMBS = [(12, 1, 0), (13, 0, 14), (14, 14, 16), (15, 0, 15), (16, 15, 17)]  # (colour, a, b)
_KPS_COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255)]


@dataclass
class Placement:
    landmarks: np.ndarray  # [5, 2] canvas pixels
    canvas: tuple[int, int]  # (width, height)


def reference_landmarks(layout: dict[str, Any] | None) -> np.ndarray:
    """``[5, 2]`` landmarks in the reference photo's pixels (the frontal template without a layout)."""
    if not layout:
        return ARCFACE_TEMPLATE_112.copy()
    w, h = layout["image_size"]
    lm = np.asarray(layout["landmarks"], dtype=np.float64)
    if lm.shape != (5, 2):
        raise ValueError(f"face layout landmarks must be [5, 2], got {lm.shape}")
    return lm * np.array([w, h], dtype=np.float64)


def place_head(ref: np.ndarray, canvas: tuple[int, int], x: float, y: float, size: float) -> Placement:
    """Move/scale ``ref`` landmarks so the face centre is at ``(x*W, y*H)`` and its height ``size*H``."""
    w, h = canvas
    if size <= 0:
        raise ValueError(f"head size must be > 0, got {size}")
    eye_c, mouth_c = ref[:2].mean(0), ref[3:].mean(0)
    d = float(np.linalg.norm(mouth_c - eye_c))
    if d < 1e-6:
        raise ValueError("reference landmarks are degenerate (eyes and mouth coincide)")
    centre = (eye_c + mouth_c) / 2
    scale = size * h / (FACE_HEIGHT_PER_EYE_MOUTH * d)
    placed = (ref - centre) * scale + np.array([x * w, y * h])
    return Placement(landmarks=placed, canvas=(w, h))


def openpose_head(lm: np.ndarray) -> dict[int, np.ndarray]:
    """COCO-18 head keypoints from the five landmarks (image-left eye is the person's right eye)."""
    eye_r, eye_l, nose = lm[0], lm[1], lm[2]
    eye_c, mouth_c = (eye_r + eye_l) / 2, (lm[3] + lm[4]) / 2
    across, down = eye_l - eye_r, mouth_c - eye_c
    return {0: nose, 1: mouth_c + 1.6 * down, 14: eye_r, 15: eye_l,
            16: eye_c - 1.05 * across + 0.15 * down, 17: eye_c + 1.05 * across + 0.15 * down}


def _inside(p: np.ndarray, w: int, h: int) -> bool:
    return 0 <= p[0] < w and 0 <= p[1] < h


def visible_points(placement: Placement, style: str = "openpose") -> dict[int, np.ndarray]:
    """The keypoints the hint draws, without those off the canvas (logged); none visible -> ValueError."""
    w, h = placement.canvas
    points = openpose_head(placement.landmarks) if style == "openpose" else dict(enumerate(placement.landmarks))
    visible = {k: p for k, p in points.items() if _inside(p, w, h)}
    if not visible:
        xs = [p[0] for p in points.values()]
        ys = [p[1] for p in points.values()]
        raise ValueError(f"the head lies entirely outside the {w}x{h} canvas: its keypoints span x "
                         f"{min(xs):.0f}..{max(xs):.0f}, y {min(ys):.0f}..{max(ys):.0f}. Keep x and y within 0..1 "
                         "(the face centre) or make the head smaller.")
    if len(visible) < len(points):
        logger.info("%d of %d head keypoints fall outside the %dx%d canvas and are clipped",
                    len(points) - len(visible), len(points), w, h)
    return visible


def face_height(placement: Placement) -> float:
    """Forehead-to-chin height of a placed face, in canvas pixels."""
    lm = placement.landmarks
    return FACE_HEIGHT_PER_EYE_MOUTH * float(np.linalg.norm(lm[3:].mean(0) - lm[:2].mean(0)))


def head_mask(placement: Placement, margin: float = 1.0) -> np.ndarray:
    """Soft region of the placed head (face, hair, ears), float32 ``[H, W]`` in 0..1: an ellipse around the
    face, ``margin`` times the usual head proportions, with a soft rim — for identity regions."""
    w, h = placement.canvas
    lm = placement.landmarks
    fh = face_height(placement)
    eye_c, mouth_c = lm[:2].mean(0), lm[3:].mean(0)
    up = eye_c - mouth_c
    up = up / max(float(np.linalg.norm(up)), 1e-6)
    centre = (eye_c + mouth_c) / 2 + up * 0.12 * fh  # the head's centre sits above the face's
    ry, rx = 0.8 * fh * margin, 0.62 * fh * margin
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    rel = np.stack([xs - centre[0], ys - centre[1]], -1)
    along = rel @ up  # towards the forehead
    across = rel @ np.array([-up[1], up[0]])
    r = np.sqrt((along / ry) ** 2 + (across / rx) ** 2)
    return np.clip((1.15 - r) / 0.3, 0.0, 1.0).astype(np.float32)  # 1 inside r < 0.85, 0 past r = 1.15


def draw_hint(placement: Placement | list[Placement], style: str = "openpose") -> np.ndarray:
    """The ControlNet hint, RGB uint8 ``[H, W, 3]`` on black; a list of placements draws every head."""
    if isinstance(placement, list):
        if not placement:
            raise ValueError("no head to draw")
        if len({p.canvas for p in placement}) != 1:
            raise ValueError(f"heads placed on different canvases: {[p.canvas for p in placement]}")
        return np.maximum.reduce([draw_hint(p, style) for p in placement])
    from PIL import Image, ImageDraw

    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    w, h = placement.canvas
    pts = visible_points(placement, style)
    base = Image.new("RGB", (w, h), (0, 0, 0))
    limbs = Image.new("RGB", (w, h), (0, 0, 0))
    draw_l = ImageDraw.Draw(limbs)
    unit = max(w, h) / 512.0
    if style == "openpose":
        pairs = [(_OP_COLORS[c], a, b) for c, a, b in _OP_HEAD_LIMBS]
        colours = {k: _OP_COLORS[k] for k in pts}
        stick, radius = max(1, round(4 * unit)), max(1, round(4 * unit))
    else:
        pairs = [(_KPS_COLORS[i], i, 2) for i in (0, 1, 3, 4)]
        colours = {k: _KPS_COLORS[k] for k in pts}
        stick, radius = max(1, round(6 * unit)), max(2, round(8 * unit))
    for colour, a, b in pairs:
        if a in pts and b in pts:
            draw_l.line([tuple(pts[a]), tuple(pts[b])], fill=colour, width=stick)
    out = Image.blend(base, limbs, 0.6)  # limbs at 60 % like OpenPose's renderer
    draw_p = ImageDraw.Draw(out)
    for k, p in pts.items():
        draw_p.ellipse([p[0] - radius, p[1] - radius, p[0] + radius, p[1] + radius], fill=colours[k])
    return np.array(out)  # a writable copy
