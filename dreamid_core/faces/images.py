"""Turn whatever a user hands us into one RGB ``uint8`` array ``[H, W, 3]`` per photo.

Accepted: PIL images (any mode), numpy arrays ``[H, W]``, ``[H, W, 1|3|4]`` (uint8 or float in
0..1), torch tensors in ComfyUI's IMAGE layout ``[B, H, W, C]`` / ``[H, W, C]`` (float 0..1), and
file paths. Greyscale is replicated to RGB; alpha is composited over mid-grey (a transparent
cut-out then looks like a studio background to the detector).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ImageInputError

#: Smallest side a photo may have; a face needs some pixels to be found at all.
MIN_SIDE = 16
_ALPHA_BACKGROUND = 127.0
_BAND = 1 << 16  # float values converted at once (256 KB: stays in cache)
_BAND_BYTES = 1 << 20  # photo bytes block_means reads per band (its intermediates then stay in cache)


def _from_float(arr: np.ndarray, where: str) -> np.ndarray:
    """Float pixels (0..1, or 0..255) -> uint8, a band of values at a time: a ComfyUI IMAGE of an
    8000x6000 photo is 576 MB of float32, and whole-array temporaries (a clipped copy, a scaled copy,
    a rounded copy) cost 0.5 s in page faults alone. One pass reads each band once: its range is
    checked and it is converted as 0..1 while it is in cache; values outside 0..1 (a 0..255 image)
    stop that pass, and the whole range is checked and converted again as 0..255."""
    if arr.size == 0:
        raise ImageInputError(f"{where} is empty (shape {tuple(arr.shape)})")
    flat = arr.reshape(-1)
    out = np.empty(flat.size, np.uint8)
    buf = np.empty(min(_BAND, flat.size), np.float32)
    for i in range(0, flat.size, _BAND):
        band = flat[i:i + _BAND]
        lo, hi = _band_range(band, where)
        if lo < -1e-3 or hi > 1.0 + 1e-3:
            break
        _band_to_uint8(band, buf, out[i:i + band.size], 255.0)
    else:
        return out.reshape(arr.shape)
    ranges = [_band_range(flat[i:i + _BAND], where) for i in range(0, flat.size, _BAND)]
    lo, hi = min(r[0] for r in ranges), max(r[1] for r in ranges)
    if not (hi <= 255.0 and lo >= 0.0):
        raise ImageInputError(f"{where} has values in [{lo:.3g}, {hi:.3g}]; expected 0..1 (float) or 0..255")
    for i in range(0, flat.size, _BAND):
        band = flat[i:i + _BAND]
        _band_to_uint8(band, buf, out[i:i + band.size], 1.0)
    return out.reshape(arr.shape)


def _band_range(band: np.ndarray, where: str) -> tuple[float, float]:
    lo, hi = float(band.min()), float(band.max())  # NaN propagates through min/max
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ImageInputError(f"{where} contains NaN or infinite values")
    return lo, hi


def _band_to_uint8(band: np.ndarray, buf: np.ndarray, out: np.ndarray, gain: float) -> None:
    """``rint(band * gain)`` into ``out``. No clip: the range is checked first and lies at most 1e-3 * 255
    = 0.26 levels outside 0..255, which rint brings back onto 0 and 255 (np.clip took a third of the time)."""
    work = buf[:band.size]
    np.multiply(band, np.float32(gain), out=work)
    np.rint(work, out=work)
    np.copyto(out, work, casting="unsafe")


def to_rgb_uint8(image: Any, where: str = "image") -> np.ndarray:
    """One photo -> RGB uint8 ``[H, W, 3]``. Raises :class:`ImageInputError` naming the problem."""
    if isinstance(image, (str, os.PathLike)):
        return load_image(image)
    if hasattr(image, "convert") and hasattr(image, "mode"):  # PIL.Image
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            image = image.convert("RGBA")
        elif image.mode != "RGB":
            image = image.convert("RGB")
        arr = np.asarray(image)
    elif isinstance(image, torch.Tensor):
        arr = image.detach().to("cpu", torch.float32).numpy() if image.is_floating_point() else image.cpu().numpy()
    else:
        arr = np.asarray(image)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 2, 3, 4):
        raise ImageInputError(f"{where} has shape {tuple(arr.shape)}; expected [H, W], [H, W, C] or ComfyUI's "
                              "[B, H, W, C] with C in 1..4")
    if arr.dtype != np.uint8:
        arr = _from_float(arr, where) if arr.dtype.kind == "f" else \
            np.clip(arr, 0, 255).astype(np.uint8)
    h, w, c = arr.shape
    if min(h, w) < MIN_SIDE:
        raise ImageInputError(f"{where} is {w}x{h} px; a face photo must be at least {MIN_SIDE}x{MIN_SIDE} px "
                              "(better: the face at least 64 px wide). Use a larger photo.")
    if c in (2, 4):  # grey+alpha or RGBA: composite over mid-grey
        alpha = arr[..., -1:].astype(np.float32) / 255.0
        colour = arr[..., :-1].astype(np.float32)
        arr = (colour * alpha + _ALPHA_BACKGROUND * (1.0 - alpha)).round().astype(np.uint8)
        c -= 1
    if c == 1:
        arr = np.repeat(arr, 3, axis=-1)
    arr = np.ascontiguousarray(arr)
    return arr if arr.flags.writeable else arr.copy()  # torch.from_numpy warns on read-only arrays


def load_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a photo file (EXIF orientation applied) as RGB uint8."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise ImageInputError(f"photo not found: {path}")
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            im.load()
            return to_rgb_uint8(im, where=str(path))
    except UnidentifiedImageError as exc:
        raise ImageInputError(f"{path} is not an image file PIL can read ({exc})") from exc
    except OSError as exc:
        raise ImageInputError(f"{path} could not be decoded ({exc}); the file may be truncated") from exc


def to_rgb_list(images: Any) -> list[np.ndarray]:
    """A batch (ComfyUI ``[B, H, W, C]`` tensor, or any iterable of photos) -> list of RGB uint8."""
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        items: Iterable[Any] = list(images)
    elif isinstance(images, np.ndarray) and images.ndim == 4:
        items = list(images)
    elif isinstance(images, (list, tuple)):
        items = images
    else:
        items = [images]
    out = [to_rgb_uint8(im, where=f"image {i}") for i, im in enumerate(items)]
    if not out:
        raise ImageInputError("no images were given (empty batch)")
    return out


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """RGB uint8 ``[H, W, 3]`` -> float ``[3, H, W]`` in 0..1."""
    return torch.from_numpy(image).permute(2, 0, 1).float().div_(255.0)


def crop_to_uint8(crop: torch.Tensor) -> np.ndarray:
    """An aligned crop, float ``[3, S, S]`` in 0..1 -> RGB uint8 ``[S, S, 3]`` (the inverse of :func:`to_tensor`)."""
    return (crop.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def uint8_chw(image: np.ndarray) -> torch.Tensor:
    """An RGB ``uint8`` photo ``[H, W, 3]`` as a ``[3, H, W]`` tensor that shares its memory (read-only
    arrays too: the callers only read it, so torch's warning about writing to one does not apply)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)


def resize_rgb(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """An RGB ``uint8`` photo ``[H, W, 3]`` resized to ``size`` ``(h, w)``: bilinear, antialiased when it
    shrinks (each output pixel averages what it covers, so small faces stay smooth for the detector).

    On the photo's own bytes, with torch's uint8 kernels (channels-last, AVX2): within 1 level of the same
    resize through float, and faster (``python bench/large_photos.py`` prints by how much).
    """
    h, w = image.shape[:2]
    if (h, w) == tuple(size):
        return image
    shrink = size[0] < h or size[1] < w
    t = uint8_chw(image)[None]  # [1, 3, H, W], channels-last strides
    try:
        out = F.interpolate(t, size=size, mode="bilinear", antialias=shrink, align_corners=False)
    except (RuntimeError, NotImplementedError):  # a torch without the uint8 kernels
        out = F.interpolate(t.float(), size=size, mode="bilinear", antialias=shrink, align_corners=False)
        out = out.round_().clamp_(0, 255).to(torch.uint8)
    return out[0].permute(1, 2, 0).contiguous().numpy()


def block_means(image: np.ndarray, factor: int) -> np.ndarray:
    """The mean of each ``factor x factor`` block of a ``uint8`` image ``[H, W, C]`` (the last, partial
    blocks average what they cover), unrounded: float32 ``[ceil(H / factor), ceil(W / factor), C]``.

    A band of block rows at a time (so the intermediates stay in cache), the rows of each block are
    summed on the image's own bytes (``uint16``), and only those ``factor`` times fewer values become
    float, their columns summed by one matrix product (``python bench/large_photos.py`` times it against
    PIL's ``reduce``).
    """
    if factor < 1:
        raise ValueError(f"block_means factor must be >= 1, got {factor}")
    h, w, c = image.shape
    flat = np.ascontiguousarray(image).reshape(h, w * c)
    full_w = w // factor
    acc = np.uint16 if factor <= 257 else np.uint32  # 257 * 255 still fits 16 bits
    pick = np.tile(np.eye(c, dtype=np.float32) / factor, (factor, 1))  # [f * C, C]: mean of f pixels per channel
    out = np.empty((-(-h // factor), -(-w // factor), c), np.float32)
    band = max(1, _BAND_BYTES // (factor * w * c))  # block rows per band
    for y in range(0, len(out), band):
        rows = flat[y * factor:(y + band) * factor]
        n, k = -(-len(rows) // factor), len(rows) // factor  # block rows here, of which k are whole
        sums = np.empty((n, w * c), np.float32)
        sums[:k] = rows[:k * factor].reshape(k, factor, w * c).sum(1, dtype=acc)
        sums[:k] /= factor
        if n > k:  # the partial last row of blocks
            sums[k:] = rows[k * factor:].mean(0, dtype=np.float32)
        sums = sums.reshape(n, w, c)
        out[y:y + n, :full_w] = sums[:, :full_w * factor].reshape(n, full_w, factor * c) @ pick
        if w > full_w * factor:  # the partial last column of blocks
            out[y:y + n, full_w:] = sums[:, full_w * factor:].mean(1, keepdims=True)
    return out
