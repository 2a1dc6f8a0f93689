"""The face pipeline: photo -> detected faces (with retries) -> chosen face -> aligned 112x112 crop.

Any :class:`~dreamid_core.faces.detection.FaceDetector` plugs in (the built-in MTCNN, insightface).
When a photo yields no face, the pipeline retries at another detection size and with padding
(tight crops hide the face's outline from detectors) before raising :class:`FaceNotFoundError`,
whose message says which image, what was tried and what to do.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import FaceNotFoundError, FaceSelectionError
from .align import align_face, apply_transform
from .detection import Detection, FaceDetector
from .images import resize_rgb, to_rgb_list, uint8_chw

logger = logging.getLogger(__name__)

ORDERS = ("largest", "left_to_right")
ON_MISSING = ("error", "skip")


@dataclass
class FaceResult:
    """One aligned face and where it came from (coordinates in the original photo's pixels)."""

    image_index: int
    crop: torch.Tensor  # [3, S, S] float 0..1, aligned to the ArcFace template
    detection: Detection
    matrix: np.ndarray  # [2, 3] photo pixels -> crop pixels
    image_size: tuple[int, int]  # (width, height) of the photo
    num_faces: int  # faces the search found
    attempt: str
    #: px of the photo under which faces were not searched for (the quick search settled the largest
    #: face, see FacePipeline.quick_min_face, so num_faces may miss smaller ones); 0: every face was
    counted_from: float = 0.0

    @property
    def aligned_landmarks(self) -> np.ndarray:
        return apply_transform(self.matrix, self.detection.landmarks)

    def layout(self) -> dict[str, Any]:
        """Box and landmarks as fractions of the photo (what the scene node needs)."""
        w, h = self.image_size
        x1, y1, x2, y2 = self.detection.box
        return {
            "image_size": [w, h],
            "box": [x1 / w, y1 / h, x2 / w, y2 / h],
            "landmarks": [[float(x) / w, float(y) / h] for x, y in self.detection.landmarks],
            "score": float(self.detection.score),
        }


@dataclass
class PipelineReport:
    """What a batch run produced: the faces, and the photos skipped (with why)."""

    faces: list[FaceResult]
    skipped: list[tuple[int, str]] = field(default_factory=list)


def _resize(image: np.ndarray, scale: float) -> np.ndarray:
    if abs(scale - 1.0) < 1e-6:
        return image
    h, w = image.shape[:2]
    return resize_rgb(image, (max(1, round(h * scale)), max(1, round(w * scale))))


def _settles_largest(faces: Sequence[Detection], min_face: float) -> bool:
    """Whether the quick search's ``faces`` name the full search's largest face: the largest (by area,
    as :meth:`FacePipeline.select` ranks) is at least ``min_face`` on its short side, so its box is the
    full search's, and has 1.2x the area of each face under ``min_face``, whose boxes may come out
    ~10% larger in the full search (faces it did not find at all are smaller still)."""
    largest = max(faces, key=lambda d: d.area)
    if largest.short_side < min_face:
        return False
    return all(largest.area >= 1.2 * d.area for d in faces if d.short_side < min_face)


def _pad(image: np.ndarray, fraction: float) -> tuple[np.ndarray, int]:
    h, w = image.shape[:2]
    p = max(1, int(round(max(h, w) * fraction)))
    return np.pad(image, ((p, p), (p, p), (0, 0)), mode="constant", constant_values=127), p


#: Faces the quick search for the largest face looks for first: px of the detection copy (6% of 640 px).
#: A face this small becomes a 112 px crop enlarged almost 3x; identity photos show far larger ones.
QUICK_MIN_FACE = 40.0

#: A photo is blank when this share of its pixels lie within BLANK_SPREAD levels (0..255) of one colour.
BLANK_SHARE = 0.99
BLANK_SPREAD = 2


def _refuse_blank(image: np.ndarray, where: str) -> None:
    """A (nearly) uniform image cannot hold a face: say so, instead of "no face found" after every retry."""
    h, w = image.shape[:2]
    step = max(1, int((h * w / 65536) ** 0.5))  # a 256x256 grid of pixels is enough to judge (a few ms)
    sample = image[::step, ::step].reshape(-1, image.shape[-1]).astype(np.int16)  # [P, 3]
    colour = np.median(sample, axis=0).round().astype(np.int16)  # [3]
    share = float((np.abs(sample - colour).max(axis=1) <= BLANK_SPREAD).mean())
    if share >= BLANK_SHARE:
        raise FaceNotFoundError(
            f"No face found in {where} ({w}x{h} px): the image is blank ({share:.1%} of its pixels are RGB "
            f"{tuple(int(v) for v in colour)}). Preview what reaches the node: a 16-bit or greyscale PNG, for "
            "instance, can arrive all white from LoadImage; save the photo as an 8-bit RGB JPEG or PNG and load "
            "it again.")


class FacePipeline:
    """Detect, select and align faces.

    ``det_size``: the longest side the detector sees on the first attempt (larger photos are
    shrunk for detection; alignment always samples the full-resolution photo).
    ``min_score``: detections below it are ignored. ``crop_size``: aligned crop side (112 for ArcFace).

    ``quick_min_face``: when only the largest face is wanted (order "largest", face_index 0: what an
    identity photo asks) and the detector can skip small faces (``detect_at_least``, the built-in MTCNN),
    each attempt first searches only for faces of this many px of the detection copy and up (6% of its
    640 px; MTCNN then skips its finest pyramid level and the small candidates it proposes: detection
    1.1-1.5x faster in bench/encode.py). The result is taken
    when its largest face is at least that big and clearly larger (1.2x the area) than every smaller
    face it found, whose boxes the full search may draw ~10% larger: then it is the full search's
    largest face, with the same box. Otherwise the full search runs, so no face is lost.
    :attr:`FaceResult.counted_from` says when smaller faces went uncounted. ``None`` always runs the full
    search (the dataset builder does, as it records how many faces each photo shows).
    """

    def __init__(self, detector: FaceDetector, *, det_size: int = 640, min_score: float = 0.5,
                 crop_size: int = 112, retry: bool = True, quick_min_face: float | None = QUICK_MIN_FACE) -> None:
        if quick_min_face is not None and not quick_min_face > 0:
            raise ValueError(f"quick_min_face must be > 0 px or None, got {quick_min_face}")
        self.detector = detector
        self.det_size = det_size
        self.min_score = min_score
        self.crop_size = crop_size
        self.retry = retry
        self.quick_min_face = quick_min_face

    def _attempts(self, h: int, w: int) -> list[tuple[str, float, float]]:
        """(label, scale, pad fraction) tried in order: the detection size, half of it, the photo
        enlarged (small photos), and the photo padded by 40% (tight crops)."""
        longest = max(h, w)
        base = min(1.0, self.det_size / longest)
        plans = [(base, 0.0)]
        if self.retry:
            if longest * base > 320:
                plans.append((base / 2, 0.0))
            if longest * base < self.det_size:
                plans.append((min(4.0, self.det_size / longest), 0.0))
            plans.append((base if longest * base >= 320 else min(4.0, 320 / longest), 0.4))
        return [(f"longest side {round(longest * s)} px" + (f" with {round(p * 100)}% padding" if p else ""), s, p)
                for s, p in plans]

    def detect(self, image: np.ndarray, where: str = "image", *,
               largest_only: bool = False) -> tuple[list[Detection], str]:
        """All faces in an RGB uint8 photo (largest first) and which attempt found them.

        ``largest_only``: the caller needs only the largest face, which allows the quick search (see
        ``quick_min_face``); the first face returned is then the full search's largest."""
        faces, label, _ = self._detect(image, where, largest_only)
        return faces, label

    def _detect(self, image: np.ndarray, where: str, largest_only: bool) -> tuple[list[Detection], str, float]:
        """:meth:`detect`, and the px of the photo under which faces were not searched (0: all were)."""
        h, w = image.shape[:2]
        _refuse_blank(image, where)
        tried = []
        for label, scale, pad in self._attempts(h, w):
            work = _resize(image, scale)
            offset = 0
            if pad:
                work, offset = _pad(work, pad)
            found, quick = self._find(work, largest_only)
            tried.append(label)
            if found:
                back = [d.transformed(1.0 / scale, (-offset / scale, -offset / scale)) for d in found]
                if len(tried) > 1:
                    logger.info("%s: face found on retry (%s)", where, label)
                counted_from = self.quick_min_face / scale if quick else 0.0
                return sorted(back, key=lambda d: d.area, reverse=True), label, counted_from
        raise FaceNotFoundError(
            f"No face found in {where} ({w}x{h} px) by the {self.detector.name} detector. Tried: "
            f"{'; '.join(tried)}. Use a photo where one face is clearly visible (frontal or three-quarter, "
            "not covered, at least ~64 px wide), crop closer around the head, or try the other detector. "
            "In a batch you can also choose to skip photos without a face.")

    def _find(self, work: np.ndarray, largest_only: bool) -> tuple[list[Detection], bool]:
        """The detector's faces in ``work`` above ``min_score``, and whether they are the quick search's
        (taken when they settle which face is largest) rather than the full search's."""
        at_least = getattr(self.detector, "detect_at_least", None)
        if largest_only and self.quick_min_face is not None and at_least is not None:
            found = [d for d in at_least(work, self.quick_min_face) if d.score >= self.min_score]
            if found and _settles_largest(found, self.quick_min_face):
                return found, True
        return [d for d in self.detector.detect(work) if d.score >= self.min_score], False

    @staticmethod
    def select(faces: Sequence[Detection], index: int = 0, order: str = "largest",
               where: str = "image") -> Detection:
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
        ranked = sorted(faces, key=lambda d: d.area, reverse=True) if order == "largest" else \
            sorted(faces, key=lambda d: d.box[0])
        if not 0 <= index < len(ranked):
            raise FaceSelectionError(
                f"face_index {index} asked for in {where}, but {len(ranked)} face(s) were found "
                f"(indices 0..{len(ranked) - 1}, ordered {order.replace('_', ' ')}). Lower face_index.")
        return ranked[index]

    def align(self, image: np.ndarray, detection: Detection) -> tuple[torch.Tensor, np.ndarray]:
        # uint8 view: warp_affine converts only the face's region to float, not an 8k photo
        return align_face(uint8_chw(image), detection.landmarks, self.crop_size)

    def process_one(self, image: np.ndarray, *, image_index: int = 0, face_index: int = 0,
                    order: str = "largest") -> FaceResult:
        where = f"image {image_index}"
        faces, attempt, counted_from = self._detect(image, where, order == "largest" and face_index == 0)
        if len(faces) > 1:
            logger.info("%s: %d faces found%s; using index %d (%s)", where, len(faces),
                        f" from {counted_from:.0f} px" if counted_from else "", face_index, order)
        chosen = self.select(faces, face_index, order, where)
        crop, matrix = self.align(image, chosen)
        h, w = image.shape[:2]
        return FaceResult(image_index=image_index, crop=crop, detection=chosen, matrix=matrix,
                          image_size=(w, h), num_faces=len(faces), attempt=attempt, counted_from=counted_from)

    def process(self, images: Any, *, face_index: int = 0, order: str = "largest",
                on_missing: str = "error", callback: Callable[[int, int], None] | None = None) -> PipelineReport:
        """A batch of photos of one person -> aligned faces. ``on_missing``: "error" or "skip".

        Skipped photos are logged as warnings and listed in the report; if every photo is
        skipped, :class:`FaceNotFoundError` is raised anyway (never an empty result).
        ``callback(i, n)`` runs before photo ``i`` of ``n`` (progress bars, interruption).
        """
        if on_missing not in ON_MISSING:
            raise ValueError(f"on_missing must be one of {ON_MISSING}, got {on_missing!r}")
        photos = to_rgb_list(images)
        report = PipelineReport(faces=[])
        for i, photo in enumerate(photos):
            if callback is not None:
                callback(i, len(photos))
            try:
                report.faces.append(self.process_one(photo, image_index=i, face_index=face_index, order=order))
            except (FaceNotFoundError, FaceSelectionError) as exc:
                if on_missing == "error":
                    raise
                logger.warning("skipping image %d of %d: %s", i, len(photos), exc)
                report.skipped.append((i, str(exc)))
        if not report.faces:
            reasons = " | ".join(msg for _, msg in report.skipped)
            raise FaceNotFoundError(f"No usable face in any of the {len(photos)} photo(s): {reasons}")
        return report

    def crops(self, report: PipelineReport) -> torch.Tensor:
        """The report's aligned faces stacked ``[N, 3, S, S]``."""
        return torch.stack([f.crop for f in report.faces])
