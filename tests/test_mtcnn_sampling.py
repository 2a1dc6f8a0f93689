"""Packing pyramid levels for P-Net and sampling box crops for R-Net/O-Net (random-weight nets, CPU)."""

from __future__ import annotations

import numpy as np
import torch

from dreamid_core.faces.mtcnn import PNet, _cells
from dreamid_core.faces.mtcnn_sampling import CropSampler, shelf_pack


def test_shelf_pack_places_levels_apart_on_even_offsets():
    rng = np.random.default_rng(0)
    sizes = [(int(h), int(w)) for h, w in rng.integers(12, 200, (25, 2))]
    where, (height, width) = shelf_pack(sizes)
    taken = np.zeros((height, width), bool)
    for (y, x), (h, w) in zip(where, sizes, strict=True):
        assert y % 2 == 0 and x % 2 == 0 and y + h <= height and x + w <= width
        assert not taken[y:y + h + 1, x:x + w + 1].any()  # a gap of at least one pixel after each level
        taken[y:y + h, x:x + w] = True
    assert taken.sum() / (height * width) > 0.5  # not a strip of mostly empty canvas
    assert shelf_pack([]) == ([], (0, 0))


def test_pnet_on_a_packed_canvas_equals_a_call_per_level():
    torch.manual_seed(0)
    net = PNet().eval()
    levels = [torch.randn(1, 3, h, w) for h, w in ((40, 52), (29, 37), (21, 26), (14, 18))]  # even and odd sides
    where, (height, width) = shelf_pack([tuple(level.shape[-2:]) for level in levels])
    canvas = torch.zeros(1, 3, height, width)
    for (y, x), level in zip(where, levels, strict=True):
        canvas[:, :, y:y + level.shape[2], x:x + level.shape[3]] = level
    with torch.inference_mode():
        prob, reg = net(canvas)
        for (y, x), level in zip(where, levels, strict=True):
            alone_prob, alone_reg = net(level)
            h, w = level.shape[-2:]
            assert alone_prob.shape[-2:] == (_cells(h), _cells(w))
            # cells whose window lies inside the level (an odd side's last cell also sees the gap)
            gh, gw = (h - 12) // 2 + 1, (w - 12) // 2 + 1
            packed_prob = prob[:, y // 2:y // 2 + gh, x // 2:x // 2 + gw]
            packed_reg = reg[:, :, y // 2:y // 2 + gh, x // 2:x // 2 + gw]
            torch.testing.assert_close(packed_prob, alone_prob[:, :gh, :gw], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(packed_reg, alone_reg[..., :gh, :gw], atol=1e-5, rtol=1e-4)


def test_crops_read_the_right_pixels_at_every_scale():
    h, w = 300, 400
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    image = torch.stack([xs, ys, xs * 0 + 100.0])[None] * 0.5  # [1, 3, H, W]: a linear ramp, so averages are exact
    sampler = CropSampler(image)
    # a box of exactly 24 px on pixel edges, one of 100 px (mip 2), one of 190 px (mip 2 with 2x2 samples)
    boxes = torch.tensor([[50.0, 60.0, 74.0, 84.0], [100.0, 20.0, 200.0, 120.0], [200.0, 100.0, 390.0, 290.0]])
    crops = sampler.crops(boxes, 24)
    assert crops.shape == (3, 3, 24, 24)
    torch.testing.assert_close(crops[0], image[0, :, 60:84, 50:74])
    for crop, (x1, y1, x2, y2) in zip(crops[1:], boxes[1:].tolist(), strict=True):
        centres = (torch.arange(24) + 0.5) / 24
        want_x = (x1 + centres * (x2 - x1) - 0.5) * 0.5  # the ramp's value at each output pixel's centre
        want_y = (y1 + centres * (y2 - y1) - 0.5) * 0.5
        inner = slice(2, 22)  # the ramp is exact away from the photo's border
        torch.testing.assert_close(crop[0, 12, inner], want_x[inner], atol=0.6, rtol=0)
        torch.testing.assert_close(crop[1, inner, 12], want_y[inner], atol=0.6, rtol=0)
    outside = sampler.crops(torch.tensor([[-200.0, -200.0, -100.0, -100.0]]), 48)
    assert torch.equal(outside, torch.zeros(1, 3, 48, 48))
    assert sampler.crops(torch.zeros(0, 4), 24).shape == (0, 3, 24, 24)
