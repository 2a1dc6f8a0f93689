"""The loss curve of a learning run as a ComfyUI IMAGE (drawn with PIL; no plotting library needed)."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw

COLOURS = {"loss": (230, 230, 230), "diffusion": (90, 170, 255), "attention": (255, 150, 60)}


def loss_curve_image(history: list[dict[str, float]], width: int = 512, height: int = 256) -> torch.Tensor:
    """``[1, height, width, 3]`` float 0..1: each series of ``history`` (log scale), with a legend."""
    img = Image.new("RGB", (width, height), (24, 24, 28))
    draw = ImageDraw.Draw(img)
    pad = 28
    series = {k: [h[k] for h in history] for k in COLOURS if history and k in history[0]}
    values = [v for vs in series.values() for v in vs if math.isfinite(v) and v > 0]
    if not values:
        draw.text((pad, height // 2), "no finite loss values", fill=(230, 230, 230))
    else:
        lo, hi = math.log10(min(values)), math.log10(max(values))
        hi = hi if hi > lo else lo + 1.0
        draw.rectangle([pad, pad, width - pad, height - pad], outline=(80, 80, 90))
        n = max(1, len(history) - 1)
        for i, (name, vs) in enumerate(series.items()):
            pts = [(pad + (width - 2 * pad) * j / n, height - pad - (height - 2 * pad) * (math.log10(v) - lo) / (hi - lo))
                   for j, v in enumerate(vs) if math.isfinite(v) and v > 0]
            if len(pts) > 1:
                draw.line(pts, fill=COLOURS[name], width=2)
            draw.text((pad + 4 + 110 * i, 6), f"{name} {vs[-1]:.4g}", fill=COLOURS[name])
        draw.text((pad, height - pad + 6), f"{len(history)} steps, log scale {10 ** lo:.3g}..{10 ** hi:.3g}",
                  fill=(160, 160, 170))
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]
