"""Unusual but valid photos are normalised to RGB uint8; unusable ones are refused by name."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dreamid_core import ImageInputError
from dreamid_core.images import load_image, to_rgb_list, to_rgb_uint8


def test_greyscale_rgba_float_and_comfy_layouts():
    grey = np.full((40, 50), 200, np.uint8)
    assert to_rgb_uint8(grey).shape == (40, 50, 3)
    rgba = np.zeros((40, 50, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:, :25, 3] = 255  # left half opaque red, right half transparent
    out = to_rgb_uint8(rgba)
    assert tuple(out[0, 0]) == (255, 0, 0) and tuple(out[0, 49]) == (127, 127, 127)
    comfy = torch.rand(1, 40, 50, 3)  # ComfyUI IMAGE, float 0..1
    np.testing.assert_array_equal(to_rgb_uint8(comfy), (comfy[0].numpy() * 255).round().astype(np.uint8))
    pil_la = Image.new("LA", (50, 40), (90, 255))
    assert tuple(to_rgb_uint8(pil_la)[0, 0]) == (90, 90, 90)


def test_batch_of_different_sizes():
    photos = to_rgb_list([np.zeros((40, 50, 3), np.uint8), np.zeros((120, 30), np.uint8), torch.rand(64, 64, 3)])
    assert [p.shape for p in photos] == [(40, 50, 3), (120, 30, 3), (64, 64, 3)]
    assert len(to_rgb_list(torch.rand(3, 32, 32, 3))) == 3


@pytest.mark.parametrize("bad,message", [
    (np.zeros((2, 2, 3), np.uint8), r"2x2 px.*at least 16x16"),
    (np.zeros((40, 40, 5), np.uint8), r"shape \(40, 40, 5\)"),
    (np.full((40, 40, 3), np.nan, np.float32), "NaN"),
    (np.full((40, 40, 3), 300.0, np.float32), r"values in \[300"),
])
def test_unusable_images_are_named(bad, message):
    with pytest.raises(ImageInputError, match=message):
        to_rgb_uint8(bad, where="image 3")


def test_empty_batch():
    with pytest.raises(ImageInputError, match="empty batch"):
        to_rgb_list([])


def test_files(tmp_path):
    Image.new("RGB", (30, 20), (1, 2, 3)).save(tmp_path / "a.png")
    assert load_image(tmp_path / "a.png").shape == (20, 30, 3)
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(ImageInputError, match="bad.jpg is not an image"):
        load_image(tmp_path / "bad.jpg")
    with pytest.raises(ImageInputError, match="photo not found"):
        load_image(tmp_path / "missing.jpg")
