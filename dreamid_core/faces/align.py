"""Alignment to the ArcFace 112x112 template: a similarity transform and an affine warp (torch).

Pixel convention is OpenCV's (pixel centres at integer coordinates), which is the convention
the ArcFace template was defined in. The warp crops a region around the face first and
pre-shrinks it with antialiasing when the face is much larger than the output, so an 8k photo
costs about as much as a small one and large faces do not alias.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .images import block_means

#: Five points (eye on the image's left, eye on the right, nose, mouth left, mouth right) in 112x112.
ARCFACE_TEMPLATE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64)


def template(size: int = 112) -> np.ndarray:
    """The ArcFace template scaled to a ``size`` x ``size`` crop."""
    return ARCFACE_TEMPLATE_112 * (size / 112.0)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) mapping ``src`` onto ``dst``.

    Umeyama (1991). ``src``, ``dst``: ``[N, 2]``. Returns a ``[2, 3]`` matrix M with
    ``dst ~= M @ [x, y, 1]``.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or src.shape[0] < 2:
        raise ValueError(f"similarity_transform needs two [N>=2, 2] point sets, got {src.shape} and {dst.shape}")
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s0, d0 = src - mu_s, dst - mu_d
    var_s = (s0 ** 2).sum() / len(src)
    if var_s < 1e-12:
        raise ValueError("similarity_transform: the source points coincide")
    cov = d0.T @ s0 / len(src)  # [2, 2]
    u, sig, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[-1] = -1.0
    rot = u @ np.diag(d) @ vt
    scale = (sig * d).sum() / var_s
    m = np.zeros((2, 3))
    m[:, :2] = scale * rot
    m[:, 2] = mu_d - scale * rot @ mu_s
    return m


def apply_transform(m: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a ``[2, 3]`` affine matrix to ``[N, 2]`` points."""
    points = np.asarray(points, dtype=np.float64)
    return points @ m[:, :2].T + m[:, 2]


def invert_affine(m: np.ndarray) -> np.ndarray:
    a = np.vstack([m, [0.0, 0.0, 1.0]])
    return np.linalg.inv(a)[:2]


def warp_affine(image: torch.Tensor, m: np.ndarray, size: int) -> torch.Tensor:
    """Warp ``image`` ``[3, H, W]`` (float 0..1, or uint8 0..255) so that output pixel p samples ``M^-1 p``;
    ``[3, size, size]`` float.

    Outside the image is filled with the border colour, so faces near an edge do not get black wedges.
    A face more than twice the output size is shrunk first, antialiased. On a uint8 photo on the CPU laid
    out ``[H, W, 3]`` (what the face pipeline passes), whole ``k x k`` blocks of the face's region are averaged
    on the bytes first and only the rest (< 2x) is resized, so only a ``k^2``-th of its pixels become float
    (``python bench/large_photos.py`` times both); the crop then differs from the float
    path's by the filter (box then triangle instead of one triangle), on average well under a grey level.
    """
    _, h, w = image.shape
    inv = invert_affine(m)  # output pixel -> source pixel
    corners = apply_transform(inv, np.array([[0, 0], [size - 1, 0], [0, size - 1], [size - 1, size - 1]]))
    scale = float(np.sqrt(abs(np.linalg.det(inv[:, :2]))))  # source pixels per output pixel
    shrink = scale / 1.5 if scale > 2.0 else 1.0  # the region ends up 1.5 px per output pixel
    # whole blocks averaged first only on a uint8 [H, W, 3] photo seen as [3, H, W] on the CPU, as the face
    # pipeline passes it (a float region, a strided view of the frame, pools 2-5x slower than it resizes
    # with antialiasing; a planar uint8 one would need a transposed copy first)
    on_bytes = image.dtype == torch.uint8 and image.device.type == "cpu" and image.stride(0) == 1
    block = int(shrink) if on_bytes else 1
    # 1. crop the source region, plus a margin for the bilinear footprint (and for the partial blocks at its
    # far edges, which are not centred where whole blocks are)
    margin = 2 + 3 * block if block > 1 else 2
    x0 = int(np.clip(np.floor(corners[:, 0].min()) - margin, 0, w - 1))
    x1 = int(np.clip(np.ceil(corners[:, 0].max()) + margin + 1, x0 + 1, w))
    y0 = int(np.clip(np.floor(corners[:, 1].min()) - margin, 0, h - 1))
    y1 = int(np.clip(np.ceil(corners[:, 1].max()) + margin + 1, y0 + 1, h))
    region = image[:, y0:y1, x0:x1]  # [3, h', w']
    if block > 1:  # block means of the uint8 region, then 0..1
        region = torch.from_numpy(block_means(region.permute(1, 2, 0).numpy(), block)).permute(2, 0, 1) / 255.0
    elif not region.is_floating_point():  # uint8 photo: only the face's region becomes float 0..1
        region = region.float().div_(255.0)
    # 2. shrink it (the rest of the way) when the face is more than twice the output size (antialiased)
    rest = shrink / block
    if rest > 1.0 + 1e-6:
        new_h = max(1, round(region.shape[1] / rest))
        new_w = max(1, round(region.shape[2] / rest))
        region = F.interpolate(region[None], size=(new_h, new_w), mode="bilinear", antialias=True,
                               align_corners=False)[0]
    rh, rw = region.shape[1:]
    # region pixels per block, per axis (the resize rounds its size): block j's centre is at photo pixel
    # x0 + (j + 0.5) * block - 0.5, and region pixel i's at block (i + 0.5) * per - 0.5
    per_x = -(-(x1 - x0) // block) / rw
    per_y = -(-(y1 - y0) // block) / rh
    # 3. sample: output (u, v) -> source (x, y) -> region coords -> grid_sample's [-1, 1]
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64),
                            indexing="ij")
    inv_t = torch.as_tensor(inv, dtype=torch.float64)
    src_x = inv_t[0, 0] * xs + inv_t[0, 1] * ys + inv_t[0, 2]
    src_y = inv_t[1, 0] * xs + inv_t[1, 1] * ys + inv_t[1, 2]
    rx = (src_x - x0 + 0.5) / block / per_x - 0.5
    ry = (src_y - y0 + 0.5) / block / per_y - 0.5
    grid = torch.stack([(2 * rx + 1) / rw - 1, (2 * ry + 1) / rh - 1], dim=-1)  # [size, size, 2]
    out = F.grid_sample(region[None].float(), grid[None].to(torch.float32), mode="bilinear",
                        padding_mode="border", align_corners=False)
    return out[0]


def align_face(image: torch.Tensor, landmarks: np.ndarray, size: int = 112) -> tuple[torch.Tensor, np.ndarray]:
    """Aligned crop ``[3, size, size]`` and the ``[2, 3]`` matrix mapping image pixels to crop pixels."""
    m = similarity_transform(np.asarray(landmarks, dtype=np.float64), template(size))
    return warp_affine(image, m, size), m
