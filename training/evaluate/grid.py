"""A labelled image grid (PIL only): one row per (test face, prompt), the input face first."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

LABEL_HEIGHT = 14


def image_grid(rows: Sequence[Sequence[Any]], labels: Sequence[str] | None = None, *, cell: int = 128,
               pad: int = 2, background: tuple[int, int, int] = (24, 24, 24)) -> Any:
    """``rows`` of PIL images (ragged rows allowed) -> one RGB image; each image is resized to
    ``cell`` x ``cell``; ``labels`` (one per row) are written above the row."""
    from PIL import Image, ImageDraw

    if not rows:
        raise ValueError("image_grid needs at least one row")
    if labels is not None and len(labels) != len(rows):
        raise ValueError(f"{len(rows)} rows but {len(labels)} labels")
    label_h = LABEL_HEIGHT if labels else 0
    cols = max(len(r) for r in rows)
    row_h = cell + label_h + pad
    grid = Image.new("RGB", (cols * (cell + pad) + pad, len(rows) * row_h + pad), background)
    draw = ImageDraw.Draw(grid)
    for r, row in enumerate(rows):
        top = pad + r * row_h
        if labels:
            draw.text((pad + 2, top), labels[r][:160], fill=(230, 230, 230))
        for c, image in enumerate(row):
            tile = image.convert("RGB").resize((cell, cell))
            grid.paste(tile, (pad + c * (cell + pad), top + label_h))
    return grid
