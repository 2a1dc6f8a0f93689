"""MTCNN face detector (P-Net -> R-Net -> O-Net cascade, five landmarks) in plain PyTorch.

The networks are written here; their weights are the pretrained ones that ship inside the
facenet-pytorch wheel (``facenet_pytorch/data/{pnet,rnet,onet}.pt``, plain state dicts converted
from the TensorFlow MTCNN of davidsandberg/facenet). Nothing of facenet-pytorch is imported.

Conventions of those converted weights, kept here:

- inputs are RGB, normalised ``(x - 127.5) * 0.0078125``; the convolutions run on ordinary
  ``[N, C, H, W]`` images (the converter already undid the TF port's transposed-image trick);
- the dense layers of R-Net/O-Net expect the conv features flattened as ``[N, W, H, C]``
  (``permute(0, 3, 2, 1)``), the order of the transposed TF tensors;
- max-pools use ``ceil_mode=True``; face probability is ``softmax(dim=1)[:, 1]``;
- box regressions are ``(dx1, dy1, dx2, dy2)`` in units of the box's width/height; O-Net's
  landmarks are five x then five y, as fractions of the box it was shown.

Boxes here are continuous pixel coordinates: pixel ``i`` covers ``[i, i + 1)``.
"""

from __future__ import annotations

import importlib.metadata
import logging
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .detection import Detection, nms
from .errors import ImageInputError, ModelFilesError, WeightFormatError

logger = logging.getLogger(__name__)

WEIGHT_FILES = ("pnet.pt", "rnet.pt", "onet.pt")
PACKAGE = "facenet-pytorch"
INSTALL_FIX = (
    "pip install --no-deps facenet-pytorch==2.6.0 (--no-deps because its metadata pins an old torch "
    "and torchvision that pip would otherwise try to install over yours; only its weight files are used)")
_CELL, _STRIDE = 12, 2  # P-Net's receptive field and output stride, in pixels of a pyramid level
_CHUNK = 128  # crops per R-Net/O-Net forward


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return (x - 127.5) * 0.0078125


def _flatten_tf(x: torch.Tensor) -> torch.Tensor:
    """``[N, C, H, W]`` -> ``[N, W*H*C]`` in the TF port's order (what dense4/dense5 expect)."""
    return x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)


class PNet(nn.Module):
    """Proposal net: fully convolutional, one 12x12 window per output cell (stride 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 10, 3), nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(10, 16, 3), nn.PReLU(16)
        self.conv3, self.prelu3 = nn.Conv2d(16, 32, 3), nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, 1)  # face / not face
        self.conv4_2 = nn.Conv2d(32, 4, 1)  # box regression

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[N, 3, H, W]`` normalised -> (probability ``[N, h, w]``, regression ``[N, 4, h, w]``)."""
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return F.softmax(self.conv4_1(x), dim=1)[:, 1], self.conv4_2(x)


class RNet(nn.Module):
    """Refine net on 24x24 crops."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
        self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[N, 3, 24, 24]`` -> (probability ``[N]``, regression ``[N, 4]``)."""
        x = self.pool1(self.prelu1(self.conv1(x)))  # [N, 28, 11, 11]
        x = self.pool2(self.prelu2(self.conv2(x)))  # [N, 48, 4, 4]
        x = self.prelu3(self.conv3(x))  # [N, 64, 3, 3]
        x = self.prelu4(self.dense4(_flatten_tf(x)))  # [N, 576] -> [N, 128]
        return F.softmax(self.dense5_1(x), dim=1)[:, 1], self.dense5_2(x)


class ONet(nn.Module):
    """Output net on 48x48 crops: probability, box regression, five landmarks."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[N, 3, 48, 48]`` -> (probability ``[N]``, regression ``[N, 4]``, landmarks ``[N, 10]``)."""
        x = self.pool1(self.prelu1(self.conv1(x)))  # [N, 32, 23, 23]
        x = self.pool2(self.prelu2(self.conv2(x)))  # [N, 64, 10, 10]
        x = self.pool3(self.prelu3(self.conv3(x)))  # [N, 64, 4, 4]
        x = self.prelu4(self.conv4(x))  # [N, 128, 3, 3]
        x = self.prelu5(self.dense5(_flatten_tf(x)))  # [N, 1152] -> [N, 256]
        return F.softmax(self.dense6_1(x), dim=1)[:, 1], self.dense6_2(x), self.dense6_3(x)


def locate_weights(weights_dir: str | os.PathLike[str] | None = None) -> Path:
    """The folder holding pnet.pt/rnet.pt/onet.pt: ``weights_dir``, else the facenet-pytorch wheel's."""
    if weights_dir is None:
        try:
            dist = importlib.metadata.distribution(PACKAGE)
        except importlib.metadata.PackageNotFoundError:
            raise ModelFilesError(
                f"the built-in MTCNN face detector needs the weights shipped in the {PACKAGE} package, which "
                f"is not installed. Install it with: {INSTALL_FIX}. Or pass weights_dir= a folder holding "
                f"{', '.join(WEIGHT_FILES)}.") from None
        folder = Path(str(dist.locate_file("facenet_pytorch/data")))
        where = f"the {PACKAGE} package ({folder})"
    else:
        folder = Path(weights_dir)
        where = f"weights_dir {folder}"
    missing = [f for f in WEIGHT_FILES if not (folder / f).is_file()]
    if missing:
        problem = "does not exist" if not folder.is_dir() else f"lacks {', '.join(missing)}"
        raise ModelFilesError(
            f"MTCNN weights not found: {where} {problem}. The files {', '.join(WEIGHT_FILES)} ship in "
            f"facenet_pytorch/data of the {PACKAGE} wheel; (re)install it with: {INSTALL_FIX}, or point "
            "weights_dir at a folder holding all three.")
    return folder


def _load_net(net: nn.Module, path: Path) -> nn.Module:
    """Fill ``net`` from the state dict at ``path`` (no unpickling of code; exact keys and shapes)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt zip, truncated file, pickle with code: all the same to the user
        raise WeightFormatError(
            f"MTCNN weight file {path} cannot be read as a PyTorch state dict ({type(exc).__name__}: {exc}). "
            f"Reinstall it with: {INSTALL_FIX}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightFormatError(f"MTCNN weight file {path} holds a {type(state).__name__}, not a state dict "
                                f"of tensors. Reinstall it with: {INSTALL_FIX}")
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightFormatError(f"MTCNN weight file {path} does not fit {type(net).__name__}: {exc}") from exc
    return net.eval().requires_grad_(False)


def _regress(boxes: torch.Tensor, reg: torch.Tensor) -> torch.Tensor:
    """Apply ``(dx1, dy1, dx2, dy2)`` offsets, in units of each box's width/height."""
    wh = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)  # [N, 4] = (w, h, w, h)
    return boxes + reg * wh


def _square(boxes: torch.Tensor) -> torch.Tensor:
    """Grow each box to a square of its longer side, same centre."""
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]).amax(dim=1, keepdim=True) / 2  # [N, 1]
    return torch.cat([centre - half, centre + half], dim=1)


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


class MTCNNDetector:
    """MTCNN on the facenet-pytorch weights. ``detect(rgb_uint8_hw3)`` -> detections, best first."""

    name = "mtcnn"

    def __init__(self, weights_dir: str | os.PathLike[str] | None = None, device: str | torch.device = "cpu",
                 min_face_size: int = 20, thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7),
                 pyramid_factor: float = 0.709, max_side: int = 1600) -> None:
        if min_face_size < 1:
            raise ValueError(f"min_face_size must be >= 1 px, got {min_face_size}")
        if not 0.0 < pyramid_factor < 1.0:
            raise ValueError(f"pyramid_factor must be in (0, 1), got {pyramid_factor}")
        if len(thresholds) != 3 or not all(0.0 <= t <= 1.0 for t in thresholds):
            raise ValueError(f"thresholds must be three probabilities (P-Net, R-Net, O-Net), got {thresholds}")
        if max_side < _CELL:
            raise ValueError(f"max_side must be >= {_CELL} px, got {max_side}")
        self.min_face_size = int(min_face_size)
        self.thresholds = tuple(float(t) for t in thresholds)
        self.pyramid_factor = float(pyramid_factor)
        self.max_side = int(max_side)
        self.device = torch.device(device)
        self.weights_dir = locate_weights(weights_dir)
        self.pnet = _load_net(PNet(), self.weights_dir / "pnet.pt").to(self.device)
        self.rnet = _load_net(RNet(), self.weights_dir / "rnet.pt").to(self.device)
        self.onet = _load_net(ONet(), self.weights_dir / "onet.pt").to(self.device)
        logger.debug("MTCNN weights from %s on %s", self.weights_dir, self.device)

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
