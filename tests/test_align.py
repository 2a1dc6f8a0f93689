"""Similarity transform and warp: landmarks land on the ArcFace template, big photos stay cheap."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dreamid_core.faces.align import (
    ARCFACE_TEMPLATE_112,
    align_face,
    apply_transform,
    similarity_transform,
    template,
)


def test_recovers_a_known_similarity():
    angle, scale, shift = 0.3, 2.5, np.array([40.0, -7.0])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    src = np.random.default_rng(0).uniform(0, 100, (5, 2))
    dst = scale * src @ rot.T + shift
    m = similarity_transform(src, dst)
    np.testing.assert_allclose(m[:, :2], scale * rot, atol=1e-9)
    np.testing.assert_allclose(apply_transform(m, src), dst, atol=1e-9)


def test_degenerate_points_are_refused():
    with pytest.raises(ValueError, match="coincide"):
        similarity_transform(np.ones((5, 2)), ARCFACE_TEMPLATE_112)
    with pytest.raises(ValueError, match=r"\[N>=2, 2\]"):
        similarity_transform(np.ones((5, 3)), ARCFACE_TEMPLATE_112)


def dots_image(h: int, w: int, points: np.ndarray, radius: float) -> torch.Tensor:
    """A black image with a white disc at each point, [3, H, W]."""
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    img = torch.zeros(h, w)
    for x, y in points:
        img[(xs - x) ** 2 + (ys - y) ** 2 <= radius ** 2] = 1.0
    return img.expand(3, h, w).clone()


def centroids(crop: torch.Tensor) -> np.ndarray:
    """Centroid of the bright pixels nearest each template point."""
    g = crop[0].numpy()
    ys, xs = np.nonzero(g > 0.5)
    pts = np.stack([xs, ys], 1).astype(float)
    owner = np.argmin(((pts[:, None] - ARCFACE_TEMPLATE_112[None]) ** 2).sum(-1), axis=1)
    return np.stack([pts[owner == i].mean(0) for i in range(5)])


@pytest.mark.parametrize("scale,angle", [(1.0, 0.0), (3.0, 0.4), (12.0, -0.2)])
def test_warp_puts_landmarks_on_the_template(scale, angle):
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    pts = scale * ARCFACE_TEMPLATE_112 @ rot.T + np.array([30.0, 50.0]) * scale
    h = w = int(pts.max() + 60 * scale)
    img = dots_image(h, w, pts, radius=3.0 * scale)
    crop, m = align_face(img, pts)
    assert crop.shape == (3, 112, 112)
    np.testing.assert_allclose(apply_transform(m, pts), ARCFACE_TEMPLATE_112, atol=1e-6)
    np.testing.assert_allclose(centroids(crop), ARCFACE_TEMPLATE_112, atol=0.6)


def test_huge_photo_face_lands_on_the_template():
    # an 8k photo with a face 2000 px wide: only the face region is read, then shrunk with antialiasing
    # (its cost is measured in bench/large_photos.py; no wall-clock limits in tests)
    pts = 18 * ARCFACE_TEMPLATE_112 + np.array([3000.0, 1000.0])
    img = torch.zeros(3, 4320, 7680)
    img[:, 900:3100, 2900:5100] = dots_image(2200, 2200, pts - [2900.0, 900.0], radius=3.0 * 18)
    crop, m = align_face(img, pts)
    assert crop.shape == (3, 112, 112)
    np.testing.assert_allclose(apply_transform(m, pts), ARCFACE_TEMPLATE_112, atol=1e-6)
    np.testing.assert_allclose(centroids(crop), ARCFACE_TEMPLATE_112, atol=0.6)


@pytest.mark.parametrize("scale", [1.0, 5.0, 12.0])
def test_uint8_photo_gives_the_crop_of_the_float_one(scale):
    """A uint8 photo (what the face pipeline passes) has a large face's whole blocks averaged on the bytes
    before the resize: its crop is the float photo's to under a grey level on average (the same bytes at
    1x), on the template."""
    pts = scale * ARCFACE_TEMPLATE_112 @ np.array([[0.98, -0.2], [0.2, 0.98]]).T + np.array([30.0, 50.0]) * scale
    side = int(pts.max() + 60 * scale)
    img = dots_image(side, side, pts, radius=3.0 * scale)
    planes = (img * 255).round().to(torch.uint8)
    as_bytes = torch.from_numpy(np.ascontiguousarray(planes.permute(1, 2, 0).numpy())).permute(2, 0, 1)  # [H, W, 3] bytes
    reference, _ = align_face(img, pts)
    crop, _ = align_face(as_bytes, pts)
    diff = (crop - reference).abs()
    if scale < 3:  # no blocks averaged: the same computation
        assert torch.equal(crop, reference)
    assert float(diff.mean()) < 1 / 255 and float(diff.max()) < 0.2
    np.testing.assert_allclose(centroids(crop), ARCFACE_TEMPLATE_112, atol=0.6)


def test_template_scales():
    np.testing.assert_allclose(template(224), ARCFACE_TEMPLATE_112 * 2)


def test_uint8_photo_gives_the_same_crop_as_its_float_copy():
    # the face pipeline passes the photo as a uint8 view: only the face's region is converted to float
    pts = 3.0 * ARCFACE_TEMPLATE_112 + np.array([40.0, 70.0])
    planes = (dots_image(500, 460, pts, radius=9.0) * 255).round().to(torch.uint8)  # [3, H, W]
    photo = torch.from_numpy(np.ascontiguousarray(planes.permute(1, 2, 0).numpy())).permute(2, 0, 1)  # as the pipeline
    crop_u8, m_u8 = align_face(photo, pts)
    crop_f, m_f = align_face(photo.float() / 255.0, pts)
    # the face is 3x the crop: the uint8 path averages its 2x2 blocks on the bytes before the resize, the
    # float path resizes it in one go, so the crops differ by the filter alone
    assert crop_u8.dtype == torch.float32 and np.array_equal(m_u8, m_f)
    diff = (crop_u8 - crop_f).abs()
    assert float(diff.mean()) < 1 / 255 and float(diff.max()) < 0.2
    np.testing.assert_allclose(centroids(crop_u8), centroids(crop_f), atol=0.1)
