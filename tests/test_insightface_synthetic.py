"""The insightface detector end to end on a tiny synthetic SCRFD model (``tests/synthetic_scrfd.py``).

The real antelopev2/buffalo_l weights cannot be downloaded in tests, so these tests write an ONNX
file that insightface's model router takes for ``scrfd_10g_bnkps.onnx`` and that "detects" a bright
(red-channel) square: one face whose box and five landmarks are known exactly. That exercises our
wrapper (RGB -> BGR, pack folders, providers, errors) and insightface's own resize to ``det_size``,
decoding, NMS and ``det_scale`` mapping back to the photo's pixels.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

pytest.importorskip("onnx", reason="the synthetic SCRFD model is written with onnx.helper")
pytest.importorskip("insightface", reason="these tests drive insightface's SCRFD detector")
pytest.importorskip("onnxruntime", reason="insightface runs its models with onnxruntime")

from synthetic_scrfd import expected_face, write_scrfd_bnkps  # noqa: E402

from dreamid_core import FaceNotFoundError, FacePipeline, ModelFilesError  # noqa: E402
from dreamid_core.faces.align import ARCFACE_TEMPLATE_112, similarity_transform  # noqa: E402
from dreamid_core.faces.insightface_detector import InsightFaceDetector  # noqa: E402

PACK = "antelopev2"
DETECTOR_FILE = "scrfd_10g_bnkps.onnx"

#: (photo width, height, square x0, y0, side, colour, det_scale, anchor centre in det input pixels)
#: 800x600 is shrunk to 640x480 (det_scale 0.8); 240x320 (portrait) is enlarged to 480x640 (2.0).
#: Each square's centre lands on a stride-8 anchor centre of the 640x640 detector input.
CASES = {
    "landscape-shrunk": (800, 600, 390, 290, 20, (255, 255, 255), 0.8, (320, 240)),
    "portrait-enlarged": (240, 320, 96, 156, 8, (255, 0, 0), 2.0, (200, 320)),
}


def photo(width, height, square=None, colour=(255, 255, 255)):
    """A black RGB uint8 photo with an optional filled square ``(x0, y0, side)``."""
    image = np.zeros((height, width, 3), np.uint8)
    if square is not None:
        x0, y0, side = square
        image[y0:y0 + side, x0:x0 + side] = colour
    return image


def case_photo(name):
    """The case's photo, with dim blue noise along its bottom edge (far from the face; red stays 0 there,
    so the model scores it 0): the face pipeline refuses a nearly uniform photo as blank."""
    w, h, x0, y0, side, colour, det_scale, anchor = CASES[name]
    box, landmarks = expected_face(anchor)
    image = photo(w, h, (x0, y0, side), colour)
    band = h // 20
    image[-band:, :, 2] = np.random.default_rng(0).integers(0, 60, (band, w), dtype=np.uint8)
    return image, box / det_scale, landmarks / det_scale


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """``<root>/models/antelopev2/scrfd_10g_bnkps.onnx`` (ComfyUI's models/insightface layout)."""
    base = tmp_path_factory.mktemp("insightface")
    write_scrfd_bnkps(base / "models" / PACK / DETECTOR_FILE)
    return base


@pytest.fixture(scope="module")
def detector(root):
    return InsightFaceDetector(root, PACK, provider="cpu")


@pytest.mark.parametrize("case", sorted(CASES))
def test_finds_the_square_in_photo_pixels(detector, case):
    image, box, landmarks = case_photo(case)
    found = detector.detect(image)
    assert len(found) == 1, found
    face = found[0]
    np.testing.assert_allclose(face.box, box, atol=1e-3)
    np.testing.assert_allclose(face.landmarks, landmarks, atol=1e-3)
    assert face.landmarks.shape == (5, 2) and face.landmarks.dtype == np.float32
    assert 0.5 < face.score <= 1.0
    lm = face.landmarks
    assert lm[0, 0] < lm[1, 0] and lm[3, 0] < lm[4, 0]  # image-left eye / mouth corner first
    assert max(lm[0, 1], lm[1, 1]) < lm[2, 1] < min(lm[3, 1], lm[4, 1])  # eyes, then nose, then mouth


def test_channel_order_reaches_the_model_as_rgb(detector):
    """The model only sees red: a red square is found, a blue one not, so the wrapper's RGB -> BGR
    (undone by insightface's swapRB) is what makes the model see the photo's real colours."""
    assert len(detector.detect(photo(800, 600, (390, 290, 20), (255, 0, 0)))) == 1
    assert detector.detect(photo(800, 600, (390, 290, 20), (0, 0, 255))) == []


def test_photo_without_a_face_says_what_was_tried(detector):
    assert detector.detect(photo(800, 600)) == []
    with pytest.raises(FaceNotFoundError, match="800x600 px\\): the image is blank"):
        FacePipeline(detector).process_one(photo(800, 600))  # all black: called blank, no retries
    dim = np.random.default_rng(0).integers(0, 60, (600, 800, 3), dtype=np.uint8)  # no bright square
    assert detector.detect(dim) == []
    with pytest.raises(FaceNotFoundError) as info:
        FacePipeline(detector).process_one(dim)
    msg = str(info.value)
    assert "insightface/antelopev2" in msg and "800x600" in msg and "blank" not in msg
    for tried in ("longest side 640 px", "longest side 320 px", "longest side 640 px with 40% padding"):
        assert tried in msg


def test_pipeline_aligns_the_synthetic_face(detector):
    image, box, landmarks = case_photo("landscape-shrunk")
    result = FacePipeline(detector).process_one(image)
    assert result.crop.shape == (3, 112, 112) and result.num_faces == 1
    assert result.attempt == "longest side 640 px"  # the pipeline shrank it to 640x480 itself
    np.testing.assert_allclose(result.detection.box, box, atol=1e-2)
    np.testing.assert_allclose(result.detection.landmarks, landmarks, atol=1e-2)
    np.testing.assert_allclose(result.matrix, similarity_transform(result.detection.landmarks, ARCFACE_TEMPLATE_112),
                               atol=1e-9)
    # the synthetic landmarks are the template itself, scaled: the similarity fits them exactly
    np.testing.assert_allclose(result.aligned_landmarks, ARCFACE_TEMPLATE_112, atol=1e-2)
    # the square (centred on the anchor, which maps to template point (56, 66)) fills the crop's middle
    crop = result.crop.numpy()
    assert crop[:, 60:72, 50:62].min() > 0.9 and crop[:, :20, :20].max() < 0.05


def test_nested_pack_folder(tmp_path):
    write_scrfd_bnkps(tmp_path / "models" / PACK / PACK / DETECTOR_FILE)
    nested = InsightFaceDetector(tmp_path, PACK, provider="cpu")
    assert nested.pack_dir == tmp_path / "models" / PACK / PACK
    image, box, _ = case_photo("landscape-shrunk")
    (face,) = nested.detect(image)
    np.testing.assert_allclose(face.box, box, atol=1e-3)


def test_cuda_on_cpu_onnxruntime_falls_back_with_a_reason(root, caplog):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA: no fallback to observe")
    with caplog.at_level(logging.WARNING, logger="dreamid_core.faces.insightface_detector"):
        cpu = InsightFaceDetector(root, PACK, provider="cuda")
    assert cpu.providers == ["CPUExecutionProvider"]
    assert cpu._model.session.get_providers() == ["CPUExecutionProvider"]
    warnings = [r.getMessage() for r in caplog.records
                if r.name == "dreamid_core.faces.insightface_detector" and r.levelno == logging.WARNING]
    assert any("cuda was asked for but onnxruntime offers only" in m and "runs on the CPU" in m
               and "onnxruntime-gpu" in m for m in warnings), warnings
    image, box, _ = case_photo("portrait-enlarged")
    (face,) = cpu.detect(image)
    np.testing.assert_allclose(face.box, box, atol=1e-3)


@pytest.mark.parametrize("content, why", [
    (b"<html>404 Not Found</html>", "does not parse as ONNX"),
    (b"", "empty"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 16923827\n", "Git LFS pointer"),
    (None, "does not parse as ONNX"),  # the synthetic model cut in half: an interrupted download
])
def test_corrupt_detector_file_says_download_again(tmp_path, root, content, why):
    target = tmp_path / "models" / PACK / DETECTOR_FILE
    target.parent.mkdir(parents=True)
    if content is None:
        good = (root / "models" / PACK / DETECTOR_FILE).read_bytes()
        content = good[: len(good) // 2]
    target.write_bytes(content)
    with pytest.raises(ModelFilesError) as info:
        InsightFaceDetector(tmp_path, PACK, provider="cpu")
    msg = str(info.value)
    assert str(target) in msg and why in msg and "download the antelopev2 pack again" in msg
