"""The face pipeline on real photos (from the insightface wheel) with the real MTCNN weights."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from boxes import iou

from dreamid_core import FaceNotFoundError, FacePipeline, FaceSelectionError, make_detector
from dreamid_core.faces.align import ARCFACE_TEMPLATE_112
from dreamid_core.faces.images import load_image

_spec = importlib.util.find_spec("insightface")
IMAGES = Path(_spec.origin).parent / "data" / "images" if _spec and _spec.origin else None
pytestmark = pytest.mark.skipif(IMAGES is None or importlib.util.find_spec("facenet_pytorch") is None,
                                reason="needs insightface (sample photos) and facenet-pytorch (MTCNN weights)")


@pytest.fixture(scope="module")
def pipeline() -> FacePipeline:
    return FacePipeline(make_detector("mtcnn"))


@pytest.fixture(scope="module")
def group() -> np.ndarray:
    return load_image(IMAGES / "t1.jpg")


def test_detects_all_faces_largest_first(pipeline, group):
    faces, attempt = pipeline.detect(group)
    assert len(faces) == 6 and attempt == "longest side 640 px"
    areas = [f.area for f in faces]
    assert areas == sorted(areas, reverse=True)
    result = pipeline.process_one(group)
    assert result.num_faces == 6 and result.detection.area == max(areas)


def test_alignment_puts_eyes_and_mouth_on_the_template(pipeline, group):
    t = ARCFACE_TEMPLATE_112
    # every face but the one in profile (index 2); smiles widen mouths, so the mouth CENTRE is checked
    for index in (0, 1, 3, 4, 5):
        result = pipeline.process_one(group, face_index=index)
        assert result.crop.shape == (3, 112, 112)
        # independent check: detect again in the aligned crop and compare with the template
        crop = (result.crop.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        lm = pipeline.detect(crop)[0][0].landmarks
        eyes = np.linalg.norm(lm[:2].mean(0) - t[:2].mean(0))
        mouth = np.linalg.norm(lm[3:].mean(0) - t[3:].mean(0))
        assert eyes < 4.5 and mouth < 6.5, f"face {index}: eyes off by {eyes:.1f} px, mouth by {mouth:.1f} px"
    largest = pipeline.process_one(group).aligned_landmarks
    assert np.linalg.norm(largest[[0, 1, 3, 4]] - t[[0, 1, 3, 4]], axis=1).max() < 3.0


def test_portraits_align_onto_the_template(pipeline):
    """The face_recognition sdist's portraits (Obama x5, two partly cut off, one RGBA; Biden): the whole
    face is the one chosen (a stray 33 px detection in one photo is not); the fit puts the eyes within
    3.5 px and the mouth's centre within 4.5 px of the ArcFace template (a wide smile's corners cannot
    all be met by a similarity), and detecting again in the crop agrees, as for t1.jpg (on whole faces:
    a face cut off by the photo's edge is detected less surely in its crop)."""
    from portrait_photos import portraits

    t = ARCFACE_TEMPLATE_112
    for name, photo in portraits().items():
        result = pipeline.process_one(photo)
        assert result.attempt == "longest side 640 px", name
        assert result.detection.short_side > 0.15 * min(photo.shape[:2]), (name, result.detection.box)
        fit = result.aligned_landmarks
        eyes = np.linalg.norm(fit[:2] - t[:2], axis=1).max()
        mouth = np.linalg.norm(fit[3:].mean(0) - t[3:].mean(0))
        assert eyes < 3.5 and mouth < 4.5, f"{name}: fit off by {eyes:.1f} px (eyes), {mouth:.1f} px (mouth)"
        if "partial" in name:
            continue
        crop = (result.crop.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        lm = pipeline.detect(crop)[0][0].landmarks
        eyes = np.linalg.norm(lm[:2].mean(0) - t[:2].mean(0))
        mouth = np.linalg.norm(lm[3:].mean(0) - t[3:].mean(0))
        assert eyes < 4.5 and mouth < 6.5, f"{name}: eyes off by {eyes:.1f} px, mouth by {mouth:.1f} px"


def test_face_index_and_order(pipeline, group):
    left = pipeline.process_one(group, face_index=0, order="left_to_right")
    right = pipeline.process_one(group, face_index=5, order="left_to_right")
    assert left.detection.box[0] < 200 < 1000 < right.detection.box[0]
    with pytest.raises(FaceSelectionError, match=r"face_index 6.*6 face\(s\).*0..5"):
        pipeline.process_one(group, face_index=6)


def test_tight_crop_is_found_on_retry(pipeline):
    tom = load_image(IMAGES / "Tom_Hanks_54745.png")  # 112x112, the face fills the frame
    result = pipeline.process_one(tom)
    assert result.num_faces == 1 and result.detection.score > 0.9


def test_no_face_says_what_was_tried(pipeline):
    with pytest.raises(FaceNotFoundError) as info:
        pipeline.process_one(load_image(IMAGES / "mask_white.jpg"), image_index=2)
    msg = str(info.value)
    assert "image 2 (680x366 px)" in msg and "mtcnn" in msg and "padding" in msg and "crop closer" in msg


def test_batch_of_different_sizes_greyscale_and_rgba(pipeline, group):
    grey = np.asarray(group.mean(axis=2), dtype=np.uint8)  # [H, W] greyscale
    rgba = np.concatenate([group[100:500, 400:700], np.full((400, 300, 1), 255, np.uint8)], axis=2)
    comfy_like = torch.from_numpy(group[:600, 350:1280]).float()[None] / 255.0  # [1, H, W, 3] float
    report = pipeline.process([group, grey, rgba, comfy_like[0]])
    assert len(report.faces) == 4 and not report.skipped
    assert report.faces[1].num_faces == 6  # greyscale: every face still found
    colour_boxes = np.array([f.box for f in pipeline.detect(group)[0]])
    grey_box = np.asarray(report.faces[1].detection.box)
    assert np.abs(colour_boxes - grey_box).max(axis=1).min() < 8  # the chosen face is one of the colour faces


def test_skip_photos_without_a_face(pipeline, group, caplog):
    mask = load_image(IMAGES / "mask_blue.jpg")
    report = pipeline.process([mask, group], on_missing="skip")
    assert [f.image_index for f in report.faces] == [1] and report.skipped[0][0] == 0
    assert "skipping image 0 of 2" in caplog.text
    with pytest.raises(FaceNotFoundError, match="No usable face in any of the 1 photo"):
        pipeline.process([mask], on_missing="skip")
    with pytest.raises(FaceNotFoundError):
        pipeline.process([mask, group], on_missing="error")


def test_8k_photo_is_found_at_the_same_place(pipeline, group):
    # its cost is measured in bench/large_photos.py (no wall-clock limits in tests)
    big = np.asarray(torch.nn.functional.interpolate(
        torch.from_numpy(group).permute(2, 0, 1)[None].float(), size=(4320, 6243), mode="bilinear")[0]
        .permute(1, 2, 0).round().to(torch.uint8))
    result = pipeline.process_one(big)
    assert result.num_faces == 6
    small = pipeline.process_one(group)
    np.testing.assert_allclose(np.asarray(result.detection.box) / (6243 / 1280), small.detection.box, atol=6)


def test_every_face_of_a_huge_photo_maps_back_onto_the_original(pipeline, group):
    """A 8000x6000 copy of t1.jpg (shrunk for detection by an antialiased uint8 resize) gives the faces of
    the 1280 px photo: one each, box IoU > 0.85, landmarks within 8% of the face (as test_mtcnn asks of a
    huge photo). Which is largest is not compared: three of the six faces lie within 7% in area, and this
    copy stretches 1280x886 to 4:3 (the old float resize picked another one there too)."""
    from PIL import Image

    big = np.asarray(Image.fromarray(group).resize((8000, 6000), Image.Resampling.BILINEAR))
    sx, sy = 8000 / group.shape[1], 6000 / group.shape[0]
    small, _ = pipeline.detect(group)
    found, _ = pipeline.detect(big)
    assert len(found) == len(small) == 6
    back = [(np.asarray(d.box) / [sx, sy, sx, sy], d.landmarks / [sx, sy]) for d in found]
    for i, ref in enumerate(small):
        j = max(range(len(back)), key=lambda k: iou(back[k][0], ref.box))
        side = ref.box[2] - ref.box[0]
        assert iou(back[j][0], ref.box) > 0.85, (i, back[j][0], ref.box)
        assert np.abs(back[j][1] - ref.landmarks).max() < 0.08 * side, (i, back[j][1], ref.landmarks)


@pytest.mark.parametrize("colour", [(255, 255, 255), (0, 0, 0), (90, 140, 200)])
def test_blank_image_is_called_blank(pipeline, group, colour):
    blank = np.empty((300, 400, 3), np.uint8)
    blank[:] = colour
    rng = np.random.default_rng(0)
    speckled = blank.copy()
    speckled[rng.integers(0, 300, 200), rng.integers(0, 400, 200)] = 128  # a few stray pixels: still blank
    for image in (blank, speckled):
        with pytest.raises(FaceNotFoundError, match=r"image 1 \(400x300 px\): the image is blank .*RGB "
                                                    + re.escape(str(colour))):
            pipeline.process_one(image, image_index=1)
    report = pipeline.process([blank, group[150:500, 350:700]], on_missing="skip")  # skipped like a faceless photo
    assert report.skipped[0][0] == 0 and "blank" in report.skipped[0][1] and len(report.faces) == 1
