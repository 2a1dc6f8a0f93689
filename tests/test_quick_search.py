"""The quick search for the largest face (FacePipeline.quick_min_face, MTCNNDetector.detect_at_least)
picks the face the full search picks, on real photos, and falls back to the full search whenever it
cannot be sure; and which face is largest does not depend on the photo's size."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from boxes import iou
from PIL import Image

from dreamid_core import FacePipeline, make_detector
from dreamid_core.faces.images import load_image

_spec = importlib.util.find_spec("insightface")
IMAGES = Path(_spec.origin).parent / "data" / "images" if _spec and _spec.origin else None
pytestmark = pytest.mark.skipif(IMAGES is None or importlib.util.find_spec("facenet_pytorch") is None,
                                reason="needs insightface (sample photos) and facenet-pytorch (MTCNN weights)")


@pytest.fixture(scope="module")
def detector():
    from dreamid_core.faces.mtcnn import MTCNNDetector

    return MTCNNDetector()


@pytest.fixture(scope="module")
def t1() -> np.ndarray:
    return load_image(IMAGES / "t1.jpg")  # 1280x886, six people; faces 95-140 px


def _sized(image: np.ndarray, width: int) -> np.ndarray:
    h, w = image.shape[:2]
    return np.asarray(Image.fromarray(image).resize((width, round(width * h / w)), Image.Resampling.BILINEAR))


class Spy:
    """The detector, counting which search the pipeline ran."""

    name = "mtcnn"

    def __init__(self, inner) -> None:
        self.inner, self.calls = inner, []

    def detect(self, image):
        self.calls.append("full")
        return self.inner.detect(image)

    def detect_at_least(self, image, min_face):
        self.calls.append(f"quick {min_face:g}")
        return self.inner.detect_at_least(image, min_face)


def _photo_set(t1: np.ndarray) -> dict[str, np.ndarray]:
    photos = {f"t1 at {w} px": _sized(t1, w) for w in (640, 960, 1280, 2600, 4000)}
    for x0, y0, x1, y1 in ((330, 120, 730, 520), (0, 0, 640, 443), (200, 50, 1000, 600), (600, 200, 1280, 886),
                           (0, 200, 1280, 886), (400, 0, 1280, 500)):  # one to four people, near-equal faces
        photos[f"t1[{y0}:{y1}, {x0}:{x1}]"] = np.ascontiguousarray(t1[y0:y1, x0:x1])
    photos["Tom Hanks 112 px"] = load_image(IMAGES / "Tom_Hanks_54745.png")
    try:
        from portrait_photos import portraits

        photos.update(portraits())
    except pytest.skip.Exception:  # the sdist is optional here; tests/test_faces.py says so when it is missing
        pass
    return photos


def test_quick_search_picks_the_full_searchs_face(detector, t1):
    """On t1.jpg at five sizes, six crops of it with one to four people (faces within 7% of each other in
    area), a tight 112 px face and the face_recognition portraits: the same face, box and landmarks as the
    full search (to 1% of the face: the two searches pack P-Net's levels differently)."""
    quick, full = FacePipeline(Spy(detector)), FacePipeline(Spy(detector), quick_min_face=None)
    for name, photo in _photo_set(t1).items():
        quick.detector.calls.clear()
        a, b = full.process_one(photo), quick.process_one(photo)
        side = a.detection.short_side
        assert iou(a.detection.box, b.detection.box) > 0.99, (name, a.detection.box, b.detection.box)
        assert np.abs(a.detection.landmarks - b.detection.landmarks).max() < 0.01 * side, name
        assert a.attempt == b.attempt, name
        assert quick.detector.calls[0] == "quick 40" and "quick" not in " ".join(full.detector.calls), name
    assert quick.detector.calls == ["quick 40"]  # the last photo settled by the quick search alone
    assert b.counted_from == pytest.approx(40.0 * max(photo.shape[:2]) / min(640, max(photo.shape[:2])))


@pytest.mark.parametrize("width", [403, 442, 454, 466, 487, 520, 601])
def test_faces_near_the_quick_size_pick_the_full_searchs_face(detector, t1, width):
    """t1.jpg at widths where its faces are 37-55 px of the detection copy, near quick_min_face: the sizes
    where an earlier quick search (finest level skipped less safely, largest face judged by its short
    side) picked another person or a box 13% off. Whichever search settles it, the face is the full
    search's; when the quick one did, counted_from says from what size faces were counted."""
    photo = _sized(t1, width)
    full = FacePipeline(detector, quick_min_face=None).process_one(photo)
    got = FacePipeline(detector).process_one(photo)
    assert iou(got.detection.box, full.detection.box) > 0.99, (width, got.detection.box, full.detection.box)
    assert np.abs(got.detection.landmarks - full.detection.landmarks).max() < 0.01 * full.detection.short_side
    assert full.counted_from == 0.0
    if got.counted_from:
        assert got.counted_from == pytest.approx(40.0) and got.num_faces <= full.num_faces
    else:
        assert got.num_faces == full.num_faces


def test_small_faces_fall_back_to_the_full_search(detector, t1):
    """t1.jpg at 400 px: its faces are 30-40 px, under quick_min_face, so the full search runs and gives
    exactly its own result (all six faces); a photo of faces under 40 px is never answered by the quick
    search alone."""
    small = _sized(t1, 400)
    spy = Spy(detector)
    got = FacePipeline(spy).process_one(small)
    full = FacePipeline(detector, quick_min_face=None).process_one(small)
    assert spy.calls == ["quick 40", "full"]
    assert got.num_faces == full.num_faces == 6 and got.counted_from == 0.0
    np.testing.assert_array_equal(got.detection.landmarks, full.detection.landmarks)
    assert got.detection.box == full.detection.box


def test_other_choices_search_every_face(detector, t1):
    """A face other than the largest (face_index > 0, or counted left to right) needs every face: the
    full search, as does a pipeline built with quick_min_face=None or a detector without detect_at_least."""
    spy = Spy(detector)
    pipeline = FacePipeline(spy)
    for kwargs in ({"face_index": 1}, {"face_index": 0, "order": "left_to_right"}):
        spy.calls.clear()
        assert pipeline.process_one(t1, **kwargs).num_faces == 6
        assert spy.calls == ["full"], kwargs
    spy.calls.clear()
    FacePipeline(spy, quick_min_face=None).process_one(t1)
    assert spy.calls == ["full"]

    class FullOnly:
        name = "mtcnn"
        detect = staticmethod(detector.detect)

    assert FacePipeline(FullOnly()).process_one(t1).num_faces == 6
    with pytest.raises(ValueError, match="quick_min_face must be > 0 px or None, got 0"):
        FacePipeline(detector, quick_min_face=0)


def test_detect_at_least_skips_only_smaller_faces(detector, t1):
    """The MTCNN's own contract: faces at or over min_face come out as detect() finds them; a min_face
    far over every face (whose levels' windows are over 3x the faces) finds none; min_face is checked."""
    full = detector.detect(t1)
    at_least = detector.detect_at_least(t1, 60)  # t1's faces are 95-140 px
    assert len(full) == len(at_least) == 6
    for d in full:
        match = max(at_least, key=lambda e: iou(e.box, d.box))
        assert iou(match.box, d.box) > 0.99 and np.abs(match.landmarks - d.landmarks).max() < 0.01 * d.short_side
    assert detector.detect_at_least(t1, 1000) == []
    with pytest.raises(ValueError, match="min_face must be > 0 px, got -1"):
        detector.detect_at_least(t1, -1)


def test_the_largest_face_does_not_depend_on_the_photos_size(t1):
    """t1.jpg's six faces lie within 7% of each other in area, so which is "largest" hangs on a few px
    of box; the detection copy is one antialiased resize of the photo whatever its size, so the choice
    is the same face from 700 to 8000 px wide, enlarged with bilinear or Lanczos."""
    pipeline = FacePipeline(make_detector("mtcnn"))
    ref = pipeline.process_one(t1).detection.box
    for width in (700, 960, 1800, 3000, 5000, 8000):
        for resample in (Image.Resampling.BILINEAR, Image.Resampling.LANCZOS):
            photo = np.asarray(Image.fromarray(t1).resize((width, round(width * 886 / 1280)), resample))
            box = np.asarray(pipeline.process_one(photo).detection.box) * (1280 / width)
            assert iou(box, ref) > 0.9, (width, resample, box, ref)
