"""dreamid_core.faces.face_mask: soft face masks and the augmentation masks and latents share."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dreamid_core.faces.face_mask import Crop, face_mask, map_through, random_crop, scale_crop, square_crop

BOX = (10.0, 8.0, 22.0, 24.0)  # x1, y1, x2, y2 in a 32 x 32 grid
LANDMARKS = np.array([[13, 13], [19, 13], [16, 17], [14, 20], [18, 20]], dtype=np.float32)


def test_mask_is_high_on_the_face_and_low_far_from_it():
    m = face_mask(BOX, LANDMARKS, 32, 32)
    assert m.shape == (32, 32) and m.dtype == torch.float32
    assert m[16, 16] > 0.95 and m[0, 0] < 0.01 and m[31, 31] < 0.01
    assert 0.0 <= float(m.min()) and float(m.max()) <= 1.0
    assert torch.allclose(m, m.flip(-1), atol=1e-6)  # box symmetric about x = 16


def test_mask_follows_the_eye_line():
    tall = (12.0, 4.0, 20.0, 28.0)  # 8 wide, 24 tall
    upright = face_mask(tall, None, 32, 32)
    rolled = face_mask(tall, np.array([[16, 10], [16, 20]]), 32, 32)  # eyes one above the other: 90 deg roll
    assert upright[16, 4] < 0.05 and upright[4, 16] > 0.5
    assert rolled[16, 4] > 0.5 and rolled[4, 16] < 0.05


def test_crop_maps_points_where_apply_moves_pixels():
    img = torch.zeros(1, 40, 48)
    img[0, 30, 7] = 1.0  # pixel x=7, y=30
    for crop in [Crop(4, 10, 40, 30, 20, 15), Crop(4, 10, 40, 30, 40, 30, flip=True), Crop(0, 0, 48, 40, 48, 40)]:
        out = crop.apply(img)
        assert out.shape == (1, crop.out_h, crop.out_w)
        y, x = np.unravel_index(int(out[0].argmax()), out.shape[1:])
        px, py = crop.map_points([[7.5, 30.5]])[0]
        assert abs(px - (x + 0.5)) <= 1.0 and abs(py - (y + 0.5)) <= 1.0, (crop, (x, y), (px, py))


def test_integer_crops_are_exact_slices():
    lat = torch.randn(2, 4, 12, 12, generator=torch.Generator().manual_seed(0))
    crop = Crop(2, 1, 8, 8, 8, 8, flip=True)
    assert torch.equal(crop.apply(lat), lat[..., 1:9, 2:10].flip(-1))
    resampled = Crop(2.0, 1.0, 8.0, 8.0, 8, 8, flip=True)  # same window through grid_sample
    assert torch.allclose(Crop.apply(resampled, lat.double()).float(), crop.apply(lat), atol=1e-5)


def test_mask_drawn_after_augmentation_matches_the_augmented_mask():
    src = face_mask(BOX, LANDMARKS, 32, 32)
    gen = torch.Generator().manual_seed(4)
    for _ in range(5):
        crop = random_crop(gen, 32, 32, scale_jitter=0.2, flip_p=0.5, keep_box=BOX)
        drawn = face_mask(crop.map_box(BOX), crop.map_points(LANDMARKS), 32, 32)
        moved = crop.apply(src)
        assert (drawn - moved).abs().max() < 0.08


def test_random_crop_is_seeded_and_keeps_the_face():
    a = [random_crop(torch.Generator().manual_seed(9), 64, 64, keep_box=BOX) for _ in range(2)]
    assert a[0] == a[1]
    gen = torch.Generator().manual_seed(1)
    crops = [random_crop(gen, 32, 32, scale_jitter=0.3, keep_box=BOX) for _ in range(50)]
    assert any(c.flip for c in crops) and not all(c.flip for c in crops)
    for c in crops:
        x1, y1, x2, y2 = c.map_box(BOX)
        assert x1 >= -1e-6 and y1 >= -1e-6 and x2 <= 32 + 1e-6 and y2 <= 32 + 1e-6
    assert all(not c.flip for c in (random_crop(gen, 8, 8, flip_p=0.0) for _ in range(10)))
    with pytest.raises(ValueError, match="scale_jitter"):
        random_crop(gen, 8, 8, scale_jitter=1.5)


def test_photo_to_latent_chain():
    photo_to_square = square_crop(640, 480, 256)  # centred 480 square -> 256 px
    to_latent = scale_crop(256, 256, 32, 32)
    (x, y), = map_through([[320, 240]], [photo_to_square, to_latent])
    assert (x, y) == pytest.approx((16, 16))
    with pytest.raises(ValueError, match="positive"):
        face_mask((5, 5, 5, 9), None, 8, 8)
