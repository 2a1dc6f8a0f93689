"""What every face detector returns, and the interface the face pipeline calls.

A detector takes one RGB ``uint8`` image ``[H, W, 3]`` and returns every face it finds as a
:class:`Detection`. Landmarks are the five ArcFace points in image pixels, in the order of
:data:`dreamid_core.align.ARCFACE_TEMPLATE_112`: the eye on the image's left, the eye on the
image's right, the nose tip, the mouth corner on the image's left, the one on the right.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch


@dataclass(frozen=True)
class Detection:
    """One face: box ``(x1, y1, x2, y2)``, confidence, and ``[5, 2]`` landmarks ``(x, y)``."""

    box: tuple[float, float, float, float]
    score: float
    landmarks: np.ndarray  # [5, 2] float32, pixels of the image the detector was given

    @property
    def area(self) -> float:
        x1, y1, x2, y2 = self.box
        return max(0.0, x2 - x1) * max(0.0, y2 - y1)

    @property
    def short_side(self) -> float:
        x1, y1, x2, y2 = self.box
        return min(x2 - x1, y2 - y1)

    def transformed(self, scale: float, offset: tuple[float, float] = (0.0, 0.0)) -> Detection:
        """Map from the detector's image to the original: ``p_orig = p * scale + offset``."""
        ox, oy = offset
        x1, y1, x2, y2 = self.box
        box = (x1 * scale + ox, y1 * scale + oy, x2 * scale + ox, y2 * scale + oy)
        lm = self.landmarks * scale + np.asarray([ox, oy], dtype=np.float32)
        return Detection(box=box, score=self.score, landmarks=lm.astype(np.float32))


@runtime_checkable
class FaceDetector(Protocol):
    """Anything with a ``name`` and ``detect(rgb_uint8_hw3) -> list[Detection]``."""

    name: str

    def detect(self, image: np.ndarray) -> list[Detection]: ...


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, mode: str = "union") -> torch.Tensor:
    """Greedy non-maximum suppression; returns kept indices, best score first.

    ``boxes`` ``[N, 4]`` as ``(x1, y1, x2, y2)``; ``mode`` "union" divides the overlap by the
    union of the two boxes, "min" by the smaller box (MTCNN's last stage uses "min"). Runs on the
    CPU in numpy whatever the tensors' device (a greedy loop on a GPU would sync every step).
    """
    if mode not in ("union", "min"):
        raise ValueError(f"nms mode must be 'union' or 'min', got {mode!r}")
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    b = boxes.detach().to("cpu", torch.float64).numpy()
    x1, y1, x2, y2 = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    areas = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    order = np.argsort(-scores.detach().to("cpu", torch.float64).numpy(), kind="stable")
    keep: list[int] = []
    while order.size:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        w = np.clip(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), 0, None)
        h = np.clip(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), 0, None)
        inter = w * h
        denom = np.minimum(areas[i], areas[rest]) if mode == "min" else areas[i] + areas[rest] - inter
        order = rest[inter / np.maximum(denom, 1e-12) <= iou_threshold]
    return torch.as_tensor(keep, dtype=torch.long, device=boxes.device)
