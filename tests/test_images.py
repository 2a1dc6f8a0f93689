"""Unusual but valid photos are normalised to RGB uint8; unusable ones are refused by name."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dreamid_core import ImageInputError
from dreamid_core.faces.images import block_means, load_image, resize_rgb, to_rgb_list, to_rgb_uint8


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


def _float_resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    t = torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float()
    out = torch.nn.functional.interpolate(t, size=size, mode="bilinear", antialias=size[0] < image.shape[0],
                                          align_corners=False)
    return out[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


@pytest.mark.parametrize("shape,size", [((886, 1280), (443, 640)), ((6000, 8000), (480, 640)),
                                        ((301, 517), (97, 166)), ((120, 90), (480, 360)), ((640, 480), (640, 479))])
def test_resize_rgb_is_the_antialiased_float_resize_on_uint8(shape, size):
    """The detector's copy of a photo: within 1 level of the same resize through float, for shrinking by
    large and odd factors and for enlarging; contiguous uint8 whatever the photo's own strides."""
    rng = np.random.default_rng(sum(shape))
    coarse = rng.integers(0, 256, (shape[0] // 8 + 1, shape[1] // 8 + 1, 3), dtype=np.uint8)  # edges and flats
    image = np.ascontiguousarray(np.repeat(np.repeat(coarse, 8, 0), 8, 1)[:shape[0], :shape[1]])
    out = resize_rgb(image, size)
    assert out.shape == (*size, 3) and out.dtype == np.uint8 and out.flags.c_contiguous
    assert np.abs(out.astype(int) - _float_resize(image, size)).max() <= 1


def test_resize_rgb_reads_a_read_only_photo_without_a_warning(recwarn):
    image = np.random.default_rng(0).integers(0, 256, (200, 300, 3), dtype=np.uint8)
    image.flags.writeable = False  # what np.asarray(PIL image) gives
    out = resize_rgb(image, (100, 150))
    assert out.flags.writeable and not [w for w in recwarn if "not writable" in str(w.message)]
    np.testing.assert_array_equal(image, np.random.default_rng(0).integers(0, 256, (200, 300, 3), dtype=np.uint8))
    assert resize_rgb(image, (200, 300)) is image


def test_block_means_are_the_mean_of_each_block():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (53, 70, 3), dtype=np.uint8)  # sides not multiples of the factor
    out = block_means(image, 4)
    assert out.shape == (14, 18, 3) and out.dtype == np.float32
    for y, x in [(0, 0), (5, 9), (13, 17)]:  # (13, 17): the partial corner block
        block = image[4 * y:4 * y + 4, 4 * x:4 * x + 4].reshape(-1, 3).astype(float)
        np.testing.assert_allclose(out[y, x], block.mean(0), rtol=1e-6)
    np.testing.assert_array_equal(block_means(image, 1), image)
    with pytest.raises(ValueError, match="factor must be >= 1, got 0"):
        block_means(image, 0)


def test_large_float_images_are_converted_by_their_whole_range():
    """Float photos are converted a band of 65536 values at a time, as 0..1 until a band says otherwise:
    a 0..255 image whose top rows happen to be dark (all <= 1) is still read as 0..255, and a NaN or an
    out-of-range value in the last band is refused, whatever the bands before it held."""
    rng = np.random.default_rng(3)
    u = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)  # 360000 values: six bands
    np.testing.assert_array_equal(to_rgb_uint8(u.astype(np.float32) / 255), u)
    np.testing.assert_array_equal(to_rgb_uint8(u.astype(np.float64) / 255), u)
    dark_top = u.astype(np.float32)
    dark_top[:100] = rng.integers(0, 2, (100, 400, 3))  # the first 120000 values are 0 or 1
    np.testing.assert_array_equal(to_rgb_uint8(dark_top), dark_top.astype(np.uint8))
    edges = np.full((300, 400, 3), 0.5, np.float32)
    edges[0, :4, 0] = [-0.0009, 1.0009, 0.5 / 255, 254.5 / 255]  # 0.26 levels outside 0..1: no clip needed
    assert to_rgb_uint8(edges)[0, :4, 0].tolist() == [0, 255, 0, 254]  # rint: halves go to the even level
    for value, message in ((np.nan, "NaN"), (np.inf, "NaN or infinite"), (-0.5, r"values in \[-0.5, 1\]")):
        bad = u.astype(np.float32) / 255
        bad[-1, -1, -1] = value
        with pytest.raises(ImageInputError, match=message):
            to_rgb_uint8(bad, where="image 0")
