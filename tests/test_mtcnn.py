"""The built-in MTCNN detector on real photos (the sample images shipped in the insightface wheel)
with the real weights (shipped in the facenet-pytorch wheel). CPU, a few seconds in all.

Tests that need either package skip with a printed reason when it is missing; the error-path
tests need neither.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from boxes import iou

from dreamid_core.errors import ImageInputError, ModelFilesError, WeightFormatError
from dreamid_core.faces.detection import Detection
from dreamid_core.faces.mtcnn import INSTALL_FIX, WEIGHT_FILES, MTCNNDetector, locate_weights

FIX = "pip install --no-deps facenet-pytorch==2.6.0"


def _skip(reason: str) -> None:
    print(f"\nSKIP: {reason}", file=sys.stderr)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def images() -> Path:
    spec = importlib.util.find_spec("insightface")  # not imported: that takes seconds
    if spec is None or spec.origin is None:
        _skip("insightface is not installed; its wheel carries the sample photos these tests use")
    folder = Path(spec.origin).parent / "data" / "images"
    if not (folder / "t1.jpg").is_file():
        _skip(f"insightface's sample photos are not at {folder}")
    return folder


@pytest.fixture(scope="module")
def detector() -> MTCNNDetector:
    try:
        importlib.metadata.distribution("facenet-pytorch")
    except importlib.metadata.PackageNotFoundError:
        _skip(f"facenet-pytorch is not installed (it carries the MTCNN weights): {FIX}")
    return MTCNNDetector()


def _load(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.array(im.convert("RGB"))


@pytest.fixture(scope="module")
def t1_faces(detector: MTCNNDetector, images: Path) -> list[Detection]:
    return detector.detect(_load(images / "t1.jpg"))


def test_t1_finds_the_six_players(t1_faces: list[Detection]) -> None:
    confident = [d for d in t1_faces if d.score > 0.9]
    assert len(confident) == 6, [(round(d.score, 3), d.box) for d in t1_faces]
    scores = [d.score for d in t1_faces]
    assert scores == sorted(scores, reverse=True)
    for d in confident:
        x1, y1, x2, y2 = d.box
        lm = d.landmarks
        assert lm.shape == (5, 2) and lm.dtype == np.float32
        assert 40 < x2 - x1 < 200 and 40 < y2 - y1 < 200  # the faces in t1 are ~100 px
        assert ((lm[:, 0] > x1) & (lm[:, 0] < x2) & (lm[:, 1] > y1) & (lm[:, 1] < y2)).all(), (d.box, lm)
        left_eye, right_eye, nose, mouth_left, mouth_right = lm
        assert left_eye[0] < right_eye[0] and mouth_left[0] < mouth_right[0]
        assert max(left_eye[1], right_eye[1]) < nose[1] < min(mouth_left[1], mouth_right[1]), lm
        inter_ocular = float(np.linalg.norm(right_eye - left_eye))
        assert 0.2 < inter_ocular / (x2 - x1) < 0.7, (inter_ocular, d.box)


def test_tight_face_crop(detector: MTCNNDetector, images: Path) -> None:
    faces = [d for d in detector.detect(_load(images / "Tom_Hanks_54745.png")) if d.score > 0.9]
    assert len(faces) == 1


@pytest.mark.parametrize("name", ["mask_white.jpg", "mask_blue.jpg"])
def test_face_masks_are_not_faces(detector: MTCNNDetector, images: Path, name: str) -> None:
    assert [d for d in detector.detect(_load(images / name)) if d.score > 0.9] == []


def test_weights_match_the_published_keys(detector: MTCNNDetector) -> None:
    folder = locate_weights()
    for net, file in zip((detector.pnet, detector.rnet, detector.onet), WEIGHT_FILES, strict=True):
        published = torch.load(folder / file, map_location="cpu", weights_only=True)
        ours = net.state_dict()
        assert list(ours) == list(published), file
        assert all(ours[k].shape == published[k].shape and torch.equal(ours[k], published[k]) for k in ours)


def test_detect_is_deterministic(detector: MTCNNDetector, images: Path,
                                 t1_faces: list[Detection]) -> None:
    again = detector.detect(_load(images / "t1.jpg"))
    assert [(d.box, d.score) for d in again] == [(d.box, d.score) for d in t1_faces]
    assert all(np.array_equal(a.landmarks, b.landmarks) for a, b in zip(again, t1_faces, strict=True))


def test_huge_image_is_detected_downscaled(detector: MTCNNDetector, images: Path,
                                           t1_faces: list[Detection]) -> None:
    from PIL import Image

    with Image.open(images / "t1.jpg") as im:
        width, height = im.size
        scale = 6000 / width
        big = np.array(im.convert("RGB").resize((6000, round(height * scale)), Image.Resampling.BILINEAR))
    faces = [d for d in detector.detect(big) if d.score > 0.9]  # its cost is measured in bench/encode.py
    assert len(faces) == 6
    for ref in [d for d in t1_faces if d.score > 0.9]:
        best = max(faces, key=lambda d: iou(tuple(v / scale for v in d.box), ref.box))
        back = tuple(v / scale for v in best.box)
        assert iou(back, ref.box) > 0.85, (back, ref.box)
        size = ref.box[2] - ref.box[0]
        assert np.abs(np.asarray(back) - np.asarray(ref.box)).max() < 0.08 * size
        assert np.abs(best.landmarks / scale - ref.landmarks).max() < 0.08 * size


def test_degenerate_and_invalid_input(detector: MTCNNDetector) -> None:
    assert detector.detect(np.zeros((11, 500, 3), np.uint8)) == []
    assert detector.detect(np.zeros((20, 9000, 3), np.uint8)) == []  # under 12 px once downscaled
    assert detector.detect(np.full((64, 64, 3), 128, np.uint8)) == []
    with pytest.raises(ImageInputError):
        detector.detect(np.zeros((64, 64, 3), np.float32))
    with pytest.raises(ImageInputError):
        detector.detect(np.zeros((64, 64), np.uint8))


def test_missing_weights_dir(tmp_path: Path) -> None:
    with pytest.raises(ModelFilesError) as info:
        MTCNNDetector(weights_dir=tmp_path / "nowhere")
    assert FIX in str(info.value) and "nowhere" in str(info.value)
    (tmp_path / "pnet.pt").write_bytes(b"")
    with pytest.raises(ModelFilesError, match="rnet.pt, onet.pt"):
        MTCNNDetector(weights_dir=tmp_path)


def test_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    def absent(name: str):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", absent)
    with pytest.raises(ModelFilesError) as info:
        MTCNNDetector()
    message = str(info.value)
    assert "facenet-pytorch" in message and FIX in message and "--no-deps because" in message
    assert INSTALL_FIX in message


def test_corrupt_or_foreign_weight_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for name in WEIGHT_FILES:
        (tmp_path / name).write_bytes(rng.bytes(4096))
    with pytest.raises(WeightFormatError, match="pnet.pt"):
        MTCNNDetector(weights_dir=tmp_path)
    torch.save([torch.zeros(3)], tmp_path / "pnet.pt")  # loads with weights_only, but is no state dict
    with pytest.raises(WeightFormatError, match="pnet.pt"):
        MTCNNDetector(weights_dir=tmp_path)
    torch.save({"conv1.weight": torch.zeros(10, 3, 3, 3)}, tmp_path / "pnet.pt")  # keys missing
    with pytest.raises(WeightFormatError, match="pnet.pt"):
        MTCNNDetector(weights_dir=tmp_path)


# -- the fast cascade against the old one (tests/mtcnn_reference.py), on real photos -----------------

@pytest.fixture(scope="module")
def reference(detector: MTCNNDetector):
    from mtcnn_reference import ReferenceMTCNN

    return ReferenceMTCNN()


def _photos(images: Path) -> dict[str, np.ndarray]:
    from PIL import Image

    t1 = _load(images / "t1.jpg")  # 1280x886, six people
    small = np.asarray(Image.fromarray(t1).resize((640, 443), Image.Resampling.BILINEAR))  # the pipeline's 640 px
    return {"group": t1, "group-640": small, "portrait": np.ascontiguousarray(t1[120:520, 330:730]),
            "tight": _load(images / "Tom_Hanks_54745.png"), "masks": _load(images / "mask_white.jpg")}


def _assert_same_faces(old: list[Detection], new: list[Detection], what: str, *, min_iou: float = 0.9,
                       landmarks: float = 0.05) -> None:
    """One-to-one: every old face has a new one with box IoU > ``min_iou``, landmarks within ``landmarks`` of
    the box side and the same confidence to 0.01; nothing extra; the largest face is the same one."""
    assert len(new) == len(old), (what, [d.box for d in old], [d.box for d in new])
    pairs = [max(range(len(new)), key=lambda j, d=d: iou(d.box, new[j].box)) for d in old]
    assert sorted(pairs) == list(range(len(new))), (what, pairs)
    for d, j in zip(old, pairs, strict=True):
        side = d.box[2] - d.box[0]
        assert iou(d.box, new[j].box) > min_iou, (what, d.box, new[j].box)
        assert np.abs(new[j].landmarks - d.landmarks).max() < landmarks * side, (what, d.landmarks, new[j].landmarks)
        assert abs(new[j].score - d.score) < 0.01, (what, d.score, new[j].score)
    if old:
        largest = max(range(len(old)), key=lambda i: old[i].area)
        assert pairs[largest] == max(range(len(new)), key=lambda j: new[j].area), what


def test_fast_cascade_finds_the_faces_the_old_one_found(detector: MTCNNDetector, reference, images: Path) -> None:
    photos = _photos(images)
    counts = {}
    for name, photo in photos.items():
        old, new = reference.detect(photo), detector.detect(photo)
        _assert_same_faces(old, new, name)
        counts[name] = len([d for d in new if d.score > 0.9])
    assert counts == {"group": 6, "group-640": 6, "portrait": 1, "tight": 1, "masks": 0}


def test_portraits_give_the_faces_the_old_cascade_found(detector: MTCNNDetector, reference) -> None:
    """The face_recognition sdist's portraits (sizes 491x1137 to 1434x2333, one RGBA): on the pipeline's
    640 px copy (what the identity path detects on) the faces of the old cascade, to the same tolerance
    as t1.jpg; on the full photo, where the faces are 210-300 px and the two cascades sample their crops
    differently, to the tolerance asked of a huge photo (IoU > 0.85, landmarks within 8%)."""
    from portrait_photos import PORTRAITS, portraits

    from dreamid_core.faces.pipeline import _resize

    for name, photo in portraits().items():
        small = _resize(photo, 640 / max(photo.shape[:2]))
        new = detector.detect(small)
        _assert_same_faces(reference.detect(small), new, f"{name} at 640 px")
        assert len([d for d in new if d.score > 0.9]) == PORTRAITS[name], name
        _assert_same_faces(reference.detect(photo), detector.detect(photo), name, min_iou=0.85, landmarks=0.08)


def test_a_batch_finds_what_each_photo_finds_alone(detector: MTCNNDetector, images: Path) -> None:
    photos = list(_photos(images).values())
    photos.insert(2, np.zeros((10, 300, 3), np.uint8))  # under P-Net's 12 px: no face, and no error
    batch = detector.detect_batch(photos)
    assert len(batch) == len(photos) and batch[2] == []
    for photo, found in zip(photos, batch, strict=True):
        alone = detector.detect(photo)
        assert len(found) == len(alone)
        for a, b in zip(alone, found, strict=True):
            np.testing.assert_allclose(a.box, b.box, atol=1e-3)
            np.testing.assert_allclose(a.landmarks, b.landmarks, atol=1e-3)
    with pytest.raises(ImageInputError, match="image 1"):
        detector.detect_batch([photos[0], np.zeros((64, 64, 3), np.float32)])
