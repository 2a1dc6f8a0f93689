"""What every face detector returns, and the interface the face pipeline calls.

A detector takes one RGB ``uint8`` image ``[H, W, 3]`` and returns every face it finds as a
:class:`Detection`. Landmarks are the five ArcFace points in image pixels, in the order of
:data:`dreamid_core.faces.align.ARCFACE_TEMPLATE_112`: the eye on the image's left, the eye on the
image's right, the nose tip, the mouth corner on the image's left, the one on the right.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch

_NMS_BLOCK = 512  # rows of the overlap matrix computed at once (bounds memory for many boxes)


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


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, mode: str = "union",
        groups: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy non-maximum suppression; returns kept indices, best score first.

    ``boxes`` ``[N, 4]`` as ``(x1, y1, x2, y2)``; ``mode`` "union" divides the overlap by the
    union of the two boxes, "min" by the smaller box (MTCNN's last stage uses "min"). ``groups``
    ``[N]`` (integers, e.g. the photo or pyramid level of each box): boxes only suppress boxes of
    their own group, as if each group had its own call. Runs on the CPU in numpy whatever the
    tensors' device (a greedy loop on a GPU would sync every step): the overlaps are computed a
    block of rows at a time, so the Python loop only checks a flag per box.
    """
    if mode not in ("union", "min"):
        raise ValueError(f"nms mode must be 'union' or 'min', got {mode!r}")
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    order = np.argsort(-scores.detach().to("cpu", torch.float64).numpy(), kind="stable")
    b = boxes.detach().to("cpu", torch.float64).numpy()[order]  # [N, 4], best first
    if groups is None:
        keep = _greedy(b, iou_threshold, mode)
    else:  # one greedy pass per group (no overlaps computed across groups), merged back in score order
        g = groups.detach().cpu().numpy().astype(np.int64)[order]
        members = [np.flatnonzero(g == v) for v in np.unique(g)]
        keep = np.sort(np.concatenate([m[_greedy(b[m], iou_threshold, mode)] for m in members]))
    return torch.as_tensor(order[keep], dtype=torch.long, device=boxes.device)


def _greedy(b: np.ndarray, iou_threshold: float, mode: str) -> np.ndarray:
    """Kept rows of ``b`` ``[N, 4]`` (sorted best first), greedy, a block of overlap rows at a time."""
    areas = np.maximum(b[:, 2] - b[:, 0], 0) * np.maximum(b[:, 3] - b[:, 1], 0)
    removed = np.zeros(len(b), bool)
    keep: list[int] = []
    for start in range(0, len(b), _NMS_BLOCK):
        rows, cols = slice(start, start + _NMS_BLOCK), slice(start, None)  # earlier columns are decided
        w = np.maximum(np.minimum(b[rows, None, 2], b[None, cols, 2]) - np.maximum(b[rows, None, 0], b[None, cols, 0]), 0)
        h = np.maximum(np.minimum(b[rows, None, 3], b[None, cols, 3]) - np.maximum(b[rows, None, 1], b[None, cols, 1]), 0)
        inter = w * h  # [block, N - start]
        if mode == "min":
            denom = np.minimum(areas[rows, None], areas[None, cols])
        else:
            denom = areas[rows, None] + areas[None, cols] - inter
        suppress = inter / np.maximum(denom, 1e-12) > iou_threshold
        for r, row in enumerate(suppress):
            if not removed[start + r]:
                keep.append(start + r)
                removed[start:] |= row
    return np.asarray(keep, dtype=np.int64)
