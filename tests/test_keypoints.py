"""Scene switch geometry and hint drawing."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from dreamid_core.faces.align import ARCFACE_TEMPLATE_112
from dreamid_core.faces.keypoints import (
    FACE_HEIGHT_PER_EYE_MOUTH,
    draw_hint,
    openpose_head,
    place_head,
    reference_landmarks,
)


def test_head_goes_where_asked_at_the_asked_size():
    p = place_head(reference_landmarks(None), (640, 480), x=0.25, y=0.6, size=0.3)
    lm = p.landmarks
    centre = (lm[:2].mean(0) + lm[3:].mean(0)) / 2
    np.testing.assert_allclose(centre, [160, 288], atol=1e-6)
    eye_mouth = np.linalg.norm(lm[3:].mean(0) - lm[:2].mean(0))
    assert abs(eye_mouth * FACE_HEIGHT_PER_EYE_MOUTH - 0.3 * 480) < 1e-6


def test_layout_keeps_the_reference_pose():
    tilted = ARCFACE_TEMPLATE_112 @ np.array([[np.cos(0.3), np.sin(0.3)], [-np.sin(0.3), np.cos(0.3)]])
    layout = {"image_size": [200, 100], "landmarks": (tilted / [200, 100]).tolist()}
    lm = place_head(reference_landmarks(layout), (512, 512), 0.5, 0.5, 0.4).landmarks
    eye_vec = lm[1] - lm[0]
    assert abs(np.arctan2(eye_vec[1], eye_vec[0]) - np.arctan2(*(tilted[1] - tilted[0])[::-1])) < 1e-6


def test_openpose_hint_has_openpose_colours_at_the_keypoints():
    p = place_head(reference_landmarks(None), (512, 512), 0.5, 0.4, 0.3)
    hint = draw_hint(p, "openpose")
    assert hint.shape == (512, 512, 3) and hint.dtype == np.uint8
    pts = openpose_head(p.landmarks)
    x, y = np.round(pts[0]).astype(int)
    assert tuple(hint[y, x]) == (255, 0, 0)  # nose: OpenPose keypoint 0 is red
    x, y = np.round(pts[1]).astype(int)
    assert tuple(hint[y, x]) == (255, 85, 0)  # neck
    assert hint[:40].max() == 0  # nothing drawn far from the head


def test_five_point_style():
    hint = draw_hint(place_head(reference_landmarks(None), (256, 256), 0.5, 0.5, 0.5), "keypoints_5")
    assert {tuple(c) for c in hint.reshape(-1, 3)} >= {(255, 0, 0), (0, 255, 0), (0, 0, 255)}


def test_partly_off_canvas_is_clipped_and_logged(caplog):
    caplog.set_level(logging.INFO)
    p = place_head(reference_landmarks(None), (512, 512), 0.02, 0.5, 0.3)
    hint = draw_hint(p)
    assert hint.any() and "fall outside the 512x512 canvas" in caplog.text


def test_entirely_off_canvas_is_refused_with_numbers():
    p = place_head(reference_landmarks(None), (512, 512), 1.0, 1.0, 0.05)
    p.landmarks += 200
    with pytest.raises(ValueError, match=r"entirely outside the 512x512 canvas.*x \d+\.\.\d+"):
        draw_hint(p)
    with pytest.raises(ValueError, match="head size must be > 0"):
        place_head(reference_landmarks(None), (512, 512), 0.5, 0.5, 0)
