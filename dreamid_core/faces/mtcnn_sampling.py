"""Where MTCNN's networks look: pyramid levels packed into shared canvases for P-Net, and the
box crops R-Net/O-Net see, sampled from an area-averaged mip chain.

Packing: P-Net is fully convolutional with a 12 px window and stride 2, so levels placed at even
offsets in one canvas give, for every cell whose window lies inside a level, the output a separate
call on that level gives (cells whose window straddles two levels are masked out). The cascade
packs the small levels of all photos of a batch into one canvas (see ``MTCNNDetector._propose``
for why the large ones keep a call each).

Crops: a box of side ``b`` resampled to ``size`` px is read from the mip ``m`` (the photo
area-averaged ``2^m`` times) where ``b / 2^m`` lies in ``[size, 2 size)``, with 2x2 bilinear
samples per output pixel when one sample per pixel would fall over 1.25 mip pixels apart: samples
stay about one mip pixel apart (little aliasing) while the cost per box is at most
``(2 size)^2`` samples, where supersampling the full-resolution photo cost up to ``(4 size)^2``
and still aliased boxes over ``4 size``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_GAP = 2  # px between packed levels (even, so every level's cell grid stays aligned with the canvas's)


def shelf_pack(sizes: list[tuple[int, int]]) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """Pack ``(h, w)`` rectangles into one canvas: ``(y, x)`` of each (even), and the canvas ``(H, W)``.

    Shelves (rows) filled left to right in order of decreasing height; the shelf width is chosen
    among a few candidates to minimise the canvas area (a pyramid packs at ~1.2-1.4x its own area).
    """
    if not sizes:
        return [], (0, 0)
    padded = [(h + _GAP + (h % 2), w + _GAP + (w % 2)) for h, w in sizes]  # even extents, gap included
    order = sorted(range(len(sizes)), key=lambda i: -padded[i][0])
    widest = max(w for _, w in padded)
    total = sum(h * w for h, w in padded)
    candidates = {widest} | {max(widest, int(math.sqrt(total) * f)) // 2 * 2 for f in (1.0, 1.2, 1.5, 2.0)}
    best: tuple[int, list[tuple[int, int]], tuple[int, int]] | None = None
    for width in sorted(candidates):
        where: list[tuple[int, int]] = [(0, 0)] * len(sizes)
        x = y = shelf = used_w = 0
        for i in order:
            h, w = padded[i]
            if x + w > width:  # next shelf
                y, x, shelf = y + shelf, 0, 0
            where[i] = (y, x)
            x, shelf, used_w = x + w, max(shelf, h), max(used_w, x + w)
        canvas = (y + shelf, used_w)
        if best is None or canvas[0] * canvas[1] < best[0]:
            best = (canvas[0] * canvas[1], where, canvas)
    assert best is not None
    return best[1], best[2]


class CropSampler:
    """Square-ish box crops of one photo ``[1, 3, H, W]`` (float, raw 0..255), zeros outside the photo."""

    def __init__(self, image: torch.Tensor) -> None:
        self.mips = [image]  # mip m: the photo area-averaged by 2^m (built when first needed)

    def _mip(self, m: int) -> torch.Tensor:
        while len(self.mips) <= m:
            self.mips.append(F.avg_pool2d(self.mips[-1], 2, ceil_mode=True))
        return self.mips[m]

    def crops(self, boxes: torch.Tensor, size: int) -> torch.Tensor:
        """``boxes`` ``[N, 4]`` (host tensor, photo pixels) -> ``[N, 3, size, size]`` on the photo's device."""
        image = self.mips[0]
        out = image.new_zeros((boxes.shape[0], 3, size, size))
        if not len(boxes):
            return out
        side = (boxes[:, 2:] - boxes[:, :2]).amax(dim=1).clamp_min(1e-6)  # [N]
        level = torch.floor(torch.log2(side / size)).clamp(min=0).long()  # [N] mip each box is read from
        max_level = max(0, int(math.log2(max(1, min(image.shape[-2:])))) - 1)
        level = level.clamp(max=max_level)
        # 2x2 samples per output pixel once they would fall over 1.25 mip pixels apart, else one
        k = torch.where(side / (size * 2.0 ** level) > 1.25, 2, 1)  # [N]
        for m, kk in torch.unique(torch.stack([level, k], dim=1), dim=0).tolist():
            idx = torch.nonzero((level == m) & (k == kk)).flatten()
            out[idx.to(out.device)] = _sample(self._mip(m), boxes[idx] / 2 ** m, size, kk)
        return out


def _sample(image: torch.Tensor, boxes: torch.Tensor, size: int, k: int) -> torch.Tensor:
    """Bilinear ``k x k`` samples per output pixel of each box of ``image`` ``[1, 3, h, w]``, averaged.

    All crops come from one ``grid_sample`` call, stacked along the grid's height.
    """
    h, w = image.shape[-2:]
    n, s = boxes.shape[0], size * k
    boxes = boxes.to(image.device, image.dtype)
    t = (torch.arange(s, device=image.device, dtype=image.dtype) + 0.5) / s  # [s] fractions of the box
    xs = boxes[:, 0:1] + t * (boxes[:, 2:3] - boxes[:, 0:1])  # [N, s] pixel x of each sample column
    ys = boxes[:, 1:2] + t * (boxes[:, 3:4] - boxes[:, 1:2])  # [N, s]
    gx = (2 * xs / w - 1)[:, None, :].expand(n, s, s)  # [N, s(rows), s(cols)], align_corners=False
    gy = (2 * ys / h - 1)[:, :, None].expand(n, s, s)
    grid = torch.stack([gx, gy], dim=-1).reshape(1, n * s, s, 2)  # crops stacked vertically
    out = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    out = out.reshape(3, n, s, s).transpose(0, 1)  # [1, 3, N*s, s] -> [N, 3, s, s]
    return F.avg_pool2d(out, k) if k > 1 else out
