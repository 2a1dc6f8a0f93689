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
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ImageInputError, ModelFilesError, WeightFormatError
from .detection import Detection, nms
from .images import resize_rgb
from .mtcnn_sampling import CropSampler, shelf_pack

logger = logging.getLogger(__name__)

WEIGHT_FILES = ("pnet.pt", "rnet.pt", "onet.pt")
PACKAGE = "facenet-pytorch"
INSTALL_FIX = (
    "pip install --no-deps facenet-pytorch==2.6.0 (--no-deps because its metadata pins an old torch "
    "and torchvision that pip would otherwise try to install over yours; only its weight files are used)")
_CELL, _STRIDE = 12, 2  # P-Net's receptive field and output stride, in pixels of a pyramid level
_PACK_BELOW = 128 * 128  # pyramid levels under this many px share one P-Net call (see _propose)
#: crop pixels per R-Net/O-Net forward: 128 crops of 24 px, 32 of 48 px, so the first layer's activations
#: (~8 MB) stay in cache (``python bench/encode.py`` times detection)
_CHUNK_PIXELS = 128 * 24 * 24


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
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))  # [N, 32, h, w]
        # both 1x1 heads as one matmul over the channels (a 2- or 4-channel 1x1 conv takes a slow path)
        weight = torch.cat([self.conv4_1.weight, self.conv4_2.weight]).flatten(1)  # [6, 32]
        bias = torch.cat([self.conv4_1.bias, self.conv4_2.bias])  # [6]
        y = F.linear(x.permute(0, 2, 3, 1), weight, bias)  # [N, h, w, 6]
        face = torch.sigmoid(y[..., 1] - y[..., 0])  # = softmax over the two logits, [N, h, w]
        return face, y[..., 2:].permute(0, 3, 1, 2)


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
        # channels-last: the pools and small convolutions run faster on the CPU in that layout
        self.pnet, self.rnet, self.onet = (
            _load_net(net, self.weights_dir / file).to(self.device, memory_format=torch.channels_last)
            for net, file in zip((PNet(), RNet(), ONet()), WEIGHT_FILES, strict=True))
        logger.debug("MTCNN weights from %s on %s", self.weights_dir, self.device)

    def detect(self, image: np.ndarray) -> list[Detection]:
        """Faces in an RGB ``uint8`` image ``[H, W, 3]``, sorted by score (highest first)."""
        return self.detect_batch([image])[0]

    def detect_at_least(self, image: np.ndarray, min_face: float) -> list[Detection]:
        """Faces of ``min_face`` px of ``image`` and larger, as :meth:`detect` finds them: its pyramid
        levels from the one within two pyramid steps under ``min_face`` up, the finer ones skipped.

        The levels run are exactly :meth:`detect`'s, and the finest of them lies at least one step under
        ``min_face``: a face that large is found by its own level and the one under it, and the skipped
        levels' candidates are too small to win a non-maximum suppression against it. A face near the
        finest level run does not have that margin: its box can differ from :meth:`detect`'s by ~10% in
        area (measured on t1.jpg and the face_recognition portraits at 191 sizes: faces from ``min_face``
        up, the same boxes; under it, some differ). Smaller faces are found less surely, or not at all.
        """
        return self.detect_batch([image], min_face=min_face)[0]

    def detect_batch(self, images: Sequence[np.ndarray], *, min_face: float | None = None) -> list[list[Detection]]:
        """Faces in each of several photos of any sizes, found by one cascade for the whole batch
        (with ``min_face``: as :meth:`detect_at_least` finds them).

        The small pyramid levels of all photos share one P-Net call (large levels get one each), and
        the crops of all photos go through R-Net and O-Net together. The networks and crop sampling run on ``self.device``;
        box bookkeeping and NMS run on the host, with one device-to-host transfer per stage for the
        whole batch (three in all, however many photos and pyramid levels). Photos longer than
        ``max_side`` are detected on an antialiased copy and their boxes mapped back.
        """
        if min_face is not None and not min_face > 0:
            raise ValueError(f"min_face must be > 0 px, got {min_face}")
        work, back = [], []
        for i, image in enumerate(images):
            small, ratio = self._detection_copy(image, i)
            work.append(small)
            back.append(ratio)
        # the smallest window each photo's pyramid keeps (two steps under min_face), in px of the copy it sees
        windows = [0.0 if min_face is None else min_face * self.pyramid_factor ** 2 / r for r in back]
        found = self._cascade(work, windows)
        return [[d.transformed(r) for d in faces] if r != 1.0 else faces for faces, r in zip(found, back, strict=True)]

    def _detection_copy(self, image: np.ndarray, index: int) -> tuple[np.ndarray, float]:
        """``image`` (checked), or an antialiased copy with ``max_side`` px, and the factor back."""
        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            what = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
            raise ImageInputError(f"MTCNN needs an RGB uint8 array [H, W, 3]; got {what} (image {index})")
        h, w = image.shape[:2]
        if max(h, w) <= self.max_side:
            return image, 1.0
        ratio = self.max_side / max(h, w)
        small_w, small_h = max(1, round(w * ratio)), max(1, round(h * ratio))
        small = resize_rgb(image, (small_h, small_w))  # on the photo's uint8 bytes: no float copy of it
        logger.debug("MTCNN: %dx%d image detected at %dx%d", w, h, small_w, small_h)
        return small, (w / small_w + h / small_h) / 2

    def _cascade(self, images: list[np.ndarray], windows: list[float]) -> list[list[Detection]]:
        results: list[list[Detection]] = [[] for _ in images]
        live = [i for i, im in enumerate(images) if min(im.shape[:2]) >= _CELL]
        if not live:
            return results
        with torch.inference_mode():
            # a copy (the caller's array may be read-only): [H, W, 3] -> [1, 3, H, W] float 0..255
            photos = {i: torch.tensor(images[i], device=self.device).permute(2, 0, 1).unsqueeze(0).float().contiguous()
                      for i in live}  # contiguous: the area resize and grid_sample are 2x slower on [H, W, C] strides
            boxes, owner = self._propose(photos, {i: windows[i] for i in live})
            logger.debug("MTCNN P-Net: %d candidates in %d photo(s)", len(boxes), len(live))
            samplers = {i: CropSampler(x) for i, x in photos.items()}
            if len(boxes):
                boxes, owner = self._refine(samplers, boxes, owner)
                logger.debug("MTCNN R-Net: %d candidates", len(boxes))
            if not len(boxes):
                return results
            boxes, scores, landmarks, owner = self._output(samplers, boxes, owner)
            logger.debug("MTCNN O-Net: %d faces", len(boxes))
        for b, s, lm, o in zip(boxes.tolist(), scores.tolist(), landmarks.numpy().astype(np.float32),
                               owner.tolist(), strict=True):
            results[o].append(Detection(box=tuple(float(v) for v in b), score=float(s), landmarks=lm))
        return [sorted(found, key=lambda d: -d.score) for found in results]

    def _scales(self, h: int, w: int) -> list[float]:
        """Pyramid scales: the first maps ``min_face_size`` to P-Net's 12 px window."""
        scale, shortest, scales = _CELL / self.min_face_size, min(h, w) * _CELL / self.min_face_size, []
        while shortest >= _CELL:
            scales.append(scale)
            scale *= self.pyramid_factor
            shortest *= self.pyramid_factor
        return scales

    def _propose(self, photos: dict[int, torch.Tensor], windows: dict[int, float]) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage 1: P-Net over every level of every photo whose 12 px window covers more than ``windows[i]``
        px of photo ``i`` -> squared candidate boxes ``[N, 4]`` and the photo each belongs to ``[N]``
        (host tensors).

        Levels of ``_PACK_BELOW`` px or more get a P-Net call each; all smaller levels of all photos
        share one packed canvas (measured on the CPU: one canvas for everything is slower than a
        call per large level, as its activations fall out of cache; many tiny calls cost overhead).
        """
        levels = []  # (photo, level h, level w, photo h, photo w)
        for i, x in photos.items():
            h, w = x.shape[-2:]
            levels += [(i, int(h * s + 1), int(w * s + 1), h, w) for s in self._scales(h, w)
                       if _CELL / s > windows[i]]
        if not levels:
            return torch.zeros((0, 4)), torch.zeros(0, dtype=torch.long)
        small = [n for n, (_, lh, lw, _, _) in enumerate(levels) if lh * lw < _PACK_BELOW]
        sheets = [[n] for n in range(len(levels)) if n not in small] + ([small] if small else [])
        origin = [(0, 0)] * len(levels)  # (y, x) of each level in its sheet
        flat = []  # per sheet: score [n], offsets [4, n], level [n], cell y [n], cell x [n] (flattened cells)
        for sheet in sheets:
            where, (ch, cw) = shelf_pack([levels[n][1:3] for n in sheet])
            canvas = torch.zeros((1, 3, ch, cw), device=self.device)  # filled plane by plane, then channels-last
            cells = torch.full((_cells(ch), _cells(cw)), -1, dtype=torch.long)  # [GH, GW] level of each cell
            for n, (y, x) in zip(sheet, where, strict=True):
                i, lh, lw, _, _ = levels[n]
                origin[n] = (y, x)
                canvas[:, :, y:y + lh, x:x + lw] = _normalise(F.interpolate(photos[i], size=(lh, lw), mode="area"))
                cells[y // _STRIDE:y // _STRIDE + _cells(lh), x // _STRIDE:x // _STRIDE + _cells(lw)] = n
            prob, reg = self.pnet(canvas.contiguous(memory_format=torch.channels_last))  # [1, GH, GW], [1, 4, GH, GW]
            gy, gx = torch.meshgrid(torch.arange(cells.shape[0]), torch.arange(cells.shape[1]), indexing="ij")
            flat.append((prob.flatten(), reg[0].flatten(1),
                         *(t.flatten().to(self.device) for t in (cells, gy, gx))))
        score, offsets, level, gy, gx = (torch.cat(parts, dim=-1) for parts in zip(*flat, strict=True))
        # cells whose 12 px window straddles two packed levels (level -1) are not P-Net's output
        hit = torch.nonzero((score >= self.thresholds[0]) & (level >= 0)).flatten()
        found = torch.cat([score[None], offsets, level[None], gy[None], gx[None]])[:, hit].cpu()  # the one transfer
        scores, offsets = found[0], found[1:5].T  # [n], [n, 4]
        level, gy, gx = found[5:].long()  # [n] each
        table = torch.tensor([[i, y // _STRIDE, x // _STRIDE, lw / w, lh / h]
                              for (i, lh, lw, h, w), (y, x) in zip(levels, origin, strict=True)], dtype=torch.float64)
        photo, oy, ox, sx, sy = table[level].T  # [n] each
        x1 = ((gx - ox) * _STRIDE / sx).float()
        y1 = ((gy - oy) * _STRIDE / sy).float()
        boxes = torch.stack([x1, y1, x1 + (_CELL / sx).float(), y1 + (_CELL / sy).float()], dim=1)  # [n, 4]
        photo = photo.long()
        keep = nms(boxes, scores, 0.5, groups=level)  # within each level
        boxes, scores, offsets, photo = boxes[keep], scores[keep], offsets[keep], photo[keep]
        keep = nms(boxes, scores, 0.7, groups=photo)  # across the levels of each photo
        boxes = _square(_regress(boxes[keep], offsets[keep]))
        ok = _valid(boxes)
        return boxes[ok], photo[keep][ok]

    def _run_on_crops(self, net: nn.Module, samplers: dict[int, CropSampler], boxes: torch.Tensor,
                      owner: torch.Tensor, size: int) -> list[torch.Tensor]:
        """``net`` on ``size`` px crops of every box (each from its own photo) -> its outputs on the host,
        in the order of ``boxes``. Photo by photo and ``_CHUNK_PIXELS`` at a time: measured on the CPU, one
        forward over the crops of eight photos was 1.3x slower than this (its activations leave the cache)."""
        rows, parts = [], []
        for i in torch.unique(owner).tolist():
            idx = torch.nonzero(owner == i).flatten()
            crops = _normalise(samplers[i].crops(boxes[idx], size)).contiguous(memory_format=torch.channels_last)
            for chunk in crops.split(max(1, _CHUNK_PIXELS // size ** 2)):
                outs = [out.reshape(len(chunk), -1) for out in net(chunk)]  # [n, 1], [n, 4] (, [n, 10])
                widths = [out.shape[1] for out in outs]
                parts.append(torch.cat(outs, dim=1))
            rows.append(idx)
        host = torch.cat(parts).cpu()  # the stage's one device -> host transfer; rows grouped by photo
        host = host[torch.cat(rows).argsort()]  # back to the order of boxes
        return list(host.split(widths, dim=1))

    def _refine(self, samplers: dict[int, CropSampler], boxes: torch.Tensor,
                owner: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage 2: R-Net on 24x24 crops -> fewer, better squared boxes."""
        scores, offsets = self._run_on_crops(self.rnet, samplers, boxes, owner, 24)  # [N, 1], [N, 4]
        ok = scores[:, 0] > self.thresholds[1]
        boxes, scores, offsets, owner = boxes[ok], scores[ok, 0], offsets[ok], owner[ok]
        keep = nms(boxes, scores, 0.7, groups=owner)
        boxes = _square(_regress(boxes[keep], offsets[keep]))
        ok = _valid(boxes)
        return boxes[ok], owner[keep][ok]

    def _output(self, samplers: dict[int, CropSampler], boxes: torch.Tensor,
                owner: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Stage 3: O-Net on 48x48 crops -> boxes ``[M, 4]``, scores ``[M]``, landmarks ``[M, 5, 2]``, photo ``[M]``."""
        scores, offsets, points = self._run_on_crops(self.onet, samplers, boxes, owner, 48)  # [N, 1], [N, 4], [N, 10]
        ok = scores[:, 0] > self.thresholds[2]
        boxes, scores, offsets, points, owner = boxes[ok], scores[ok, 0], offsets[ok], points[ok], owner[ok]
        size = boxes[:, 2:] - boxes[:, :2]  # [M, 2] (w, h) of the box O-Net saw
        landmarks = boxes[:, None, :2] + points.reshape(-1, 2, 5).transpose(1, 2) * size[:, None, :]  # [M, 5, 2]
        boxes = _regress(boxes, offsets)
        keep = nms(boxes, scores, 0.7, mode="min", groups=owner)
        return boxes[keep], scores[keep], landmarks[keep], owner[keep]


def _cells(side: int) -> int:
    """P-Net output cells along a side of ``side`` px (3x3 conv, ceil-mode 2x2 pool, two 3x3 convs)."""
    return max(0, math.ceil((side - 2) / 2) - 4)


def _valid(boxes: torch.Tensor) -> torch.Tensor:
    """Mask of the boxes regression did not collapse (side of at least 1 px, finite)."""
    return torch.isfinite(boxes).all(dim=1) & (boxes[:, 2] - boxes[:, 0] >= 1)
