"""The MTCNN cascade as it was before the batched rewrite (dreamid_core/faces/mtcnn.py at commit 3978ef3):
one P-Net call per pyramid level, crops supersampled from the full image, one photo at a time.

Kept only as a reference: tests check that the fast path finds the same faces with the same boxes
and landmarks, and bench/encode.py times both side by side in one run. Same networks and weights
(``MTCNNDetector``'s), so any difference comes from the cascade's bookkeeping and sampling.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dreamid_core.errors import ImageInputError
from dreamid_core.faces.detection import Detection
from dreamid_core.faces.mtcnn import _CELL, _STRIDE, MTCNNDetector, PNet, _normalise, _regress, _square

logger = logging.getLogger(__name__)
_CHUNK = 128  # crops per R-Net/O-Net forward


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


def _crops(image: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Resample ``boxes`` of ``image`` ``[1, 3, H, W]`` to ``[N, 3, size, size]``, zeros outside.

    Area-like: bilinear samples on a ``k``-times finer grid, averaged over ``k x k`` (``k`` up to 4,
    enough that a box several times larger than ``size`` is not aliased). All crops of a chunk are
    sampled in one ``grid_sample`` call, stacked along the grid's height.
    """
    h, w = image.shape[-2:]
    n = boxes.shape[0]
    k = int(min(4, max(1, math.ceil(float((boxes[:, 2:] - boxes[:, :2]).max()) / size))))
    s = size * k
    t = (torch.arange(s, device=image.device, dtype=image.dtype) + 0.5) / s  # [s] fractions of the box
    xs = boxes[:, 0:1] + t * (boxes[:, 2:3] - boxes[:, 0:1])  # [N, s] pixel x of each sample column
    ys = boxes[:, 1:2] + t * (boxes[:, 3:4] - boxes[:, 1:2])  # [N, s]
    gx = (2 * xs / w - 1)[:, None, :].expand(n, s, s)  # [N, s(rows), s(cols)], align_corners=False
    gy = (2 * ys / h - 1)[:, :, None].expand(n, s, s)
    grid = torch.stack([gx, gy], dim=-1).reshape(1, n * s, s, 2)  # crops stacked vertically
    out = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    out = out.reshape(3, n, s, s).transpose(0, 1)  # [1, 3, N*s, s] -> [N, 3, s, s]
    return F.avg_pool2d(out, k) if k > 1 else out


def _run_on_crops(net: nn.Module, image: torch.Tensor, boxes: torch.Tensor, size: int) -> tuple[torch.Tensor, ...]:
    """Run ``net`` on ``size``-px crops of every box, in chunks of similar box size (so each chunk's
    supersampling suits its boxes); outputs come back in the order of ``boxes``."""
    order = (boxes[:, 2] - boxes[:, 0]).argsort()
    chunks = [net(_normalise(_crops(image, boxes[idx], size))) for idx in order.split(_CHUNK)]
    inverse = order.argsort()
    return tuple(torch.cat(parts)[inverse] for parts in zip(*chunks, strict=True))


class _OldPNet(PNet):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return F.softmax(self.conv4_1(x), dim=1)[:, 1], self.conv4_2(x)


class ReferenceMTCNN(MTCNNDetector):
    """``MTCNNDetector`` with the old per-level, per-photo cascade (``detect`` still downscales huge photos)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        pnet = _OldPNet().to(self.device)
        pnet.load_state_dict(self.pnet.state_dict())
        self.pnet = pnet.eval().requires_grad_(False)
        for net in (self.pnet, self.rnet, self.onet):
            net.to(memory_format=torch.contiguous_format)  # the old layout

    def detect(self, image: np.ndarray) -> list[Detection]:
        """Faces in an RGB ``uint8`` image ``[H, W, 3]``, sorted by score (highest first)."""
        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            what = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
            raise ImageInputError(f"MTCNN needs an RGB uint8 array [H, W, 3]; got {what}")
        h, w = image.shape[:2]
        if max(h, w) <= self.max_side:
            return self._detect(image)
        from PIL import Image  # box filter = area average, straight on uint8: no float copy of a huge image

        ratio = self.max_side / max(h, w)
        small_w, small_h = max(1, round(w * ratio)), max(1, round(h * ratio))
        small = np.asarray(Image.fromarray(image).resize((small_w, small_h), Image.Resampling.BOX))
        logger.debug("MTCNN: %dx%d image detected at %dx%d", w, h, small_w, small_h)
        back = (w / small_w + h / small_h) / 2
        return [d.transformed(back) for d in self._detect(small)]

    def _detect(self, image: np.ndarray) -> list[Detection]:
        h, w = image.shape[:2]
        if min(h, w) < _CELL:
            return []
        with torch.inference_mode():
            x = torch.tensor(image, device=self.device)  # a copy: the caller's array may be read-only
            x = x.permute(2, 0, 1).unsqueeze(0).float()  # [H, W, 3] -> [1, 3, H, W]
            boxes = self._propose(x)
            logger.debug("MTCNN P-Net: %d candidates", len(boxes))
            if len(boxes):
                boxes = self._refine(x, boxes)
                logger.debug("MTCNN R-Net: %d candidates", len(boxes))
            if not len(boxes):
                return []
            boxes, scores, landmarks = self._output(x, boxes)
            logger.debug("MTCNN O-Net: %d faces", len(boxes))
        found = [Detection(box=tuple(float(v) for v in b), score=float(s), landmarks=lm)
                 for b, s, lm in zip(boxes.cpu().tolist(), scores.cpu().tolist(),
                                     landmarks.cpu().numpy().astype(np.float32), strict=True)]
        return sorted(found, key=lambda d: -d.score)

    def _scales(self, h: int, w: int) -> list[float]:
        """Pyramid scales: the first maps ``min_face_size`` to P-Net's 12 px window."""
        scale, shortest, scales = _CELL / self.min_face_size, min(h, w) * _CELL / self.min_face_size, []
        while shortest >= _CELL:
            scales.append(scale)
            scale *= self.pyramid_factor
            shortest *= self.pyramid_factor
        return scales

    def _propose(self, x: torch.Tensor) -> torch.Tensor:
        """Stage 1: P-Net over the pyramid -> squared candidate boxes ``[N, 4]``."""
        h, w = x.shape[-2:]
        found: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for scale in self._scales(h, w):
            lh, lw = int(h * scale + 1), int(w * scale + 1)
            level = F.interpolate(x, size=(lh, lw), mode="area")  # [1, 3, lh, lw]
            prob, reg = self.pnet(_normalise(level))  # [1, gh, gw], [1, 4, gh, gw]
            gy, gx = torch.nonzero(prob[0] >= self.thresholds[0], as_tuple=True)
            if not len(gy):
                continue
            sx, sy = lw / w, lh / h  # actual level scale per axis
            x1, y1 = gx * _STRIDE / sx, gy * _STRIDE / sy
            boxes = torch.stack([x1, y1, x1 + _CELL / sx, y1 + _CELL / sy], dim=1).to(x.dtype)  # [n, 4]
            scores, offsets = prob[0, gy, gx], reg[0, :, gy, gx].T  # [n], [4, n] -> [n, 4]
            keep = nms(boxes, scores, 0.5)
            found.append((boxes[keep], scores[keep], offsets[keep]))
        if not found:
            return x.new_zeros((0, 4))
        boxes, scores, offsets = (torch.cat(parts) for parts in zip(*found, strict=True))
        keep = nms(boxes, scores, 0.7)
        return self._valid(_square(_regress(boxes[keep], offsets[keep])))

    def _refine(self, x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Stage 2: R-Net on 24x24 crops -> fewer, better squared boxes."""
        scores, offsets = _run_on_crops(self.rnet, x, boxes, 24)  # [N], [N, 4]
        ok = scores > self.thresholds[1]
        boxes, scores, offsets = boxes[ok], scores[ok], offsets[ok]
        keep = nms(boxes, scores, 0.7)
        return self._valid(_square(_regress(boxes[keep], offsets[keep])))

    def _output(self, x: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Stage 3: O-Net on 48x48 crops -> boxes ``[M, 4]``, scores ``[M]``, landmarks ``[M, 5, 2]``."""
        scores, offsets, points = _run_on_crops(self.onet, x, boxes, 48)  # [N], [N, 4], [N, 10]
        ok = scores > self.thresholds[2]
        boxes, scores, offsets, points = boxes[ok], scores[ok], offsets[ok], points[ok]
        size = boxes[:, 2:] - boxes[:, :2]  # [M, 2] (w, h) of the box O-Net saw
        landmarks = boxes[:, None, :2] + points.reshape(-1, 2, 5).transpose(1, 2) * size[:, None, :]  # [M, 5, 2]
        boxes = _regress(boxes, offsets)
        keep = nms(boxes, scores, 0.7, mode="min")
        return boxes[keep], scores[keep], landmarks[keep]

    @staticmethod
    def _valid(boxes: torch.Tensor) -> torch.Tensor:
        """Drop boxes that regression collapsed (side under 1 px or not finite)."""
        side = boxes[:, 2] - boxes[:, 0]
        return boxes[torch.isfinite(boxes).all(dim=1) & (side >= 1)]
