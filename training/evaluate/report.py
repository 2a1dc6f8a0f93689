"""The evaluation's numbers: per-image rows -> per-prompt and overall means -> CSV and markdown.

- text-alignment: mean raw CLIP cosine over ALL images of the prompt;
- face similarity: mean identity cosine over the images IN WHICH A FACE WAS FOUND (an image
  without a face is not counted as 0; it is counted in the no-face rate instead);
- no-face rate: share of the prompt's images where the face pipeline found no face.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

OVERALL = "overall"
IMAGE_FIELDS = ("face", "prompt_index", "prompt", "seed", "image", "text_alignment", "face_similarity", "face_found")
SUMMARY_FIELDS = ("prompt", "images", "text_alignment", "face_similarity", "no_face_rate", "faces_found")


@dataclass
class ImageResult:
    face: str
    prompt_index: int
    prompt: str
    seed: int
    image: str  # path relative to the output folder
    text_alignment: float
    face_similarity: float | None  # None: no face found in the output
    face_found: bool


@dataclass
class Row:
    prompt: str
    images: int
    text_alignment: float
    face_similarity: float | None
    no_face_rate: float
    faces_found: int


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(results: Sequence[ImageResult]) -> list[Row]:
    """One row per prompt (in prompt order) and a last ``overall`` row over every image."""
    groups: dict[int, list[ImageResult]] = {}
    for r in results:
        groups.setdefault(r.prompt_index, []).append(r)

    def row(name: str, rs: Sequence[ImageResult]) -> Row:
        found = [r.face_similarity for r in rs if r.face_found and r.face_similarity is not None]
        return Row(prompt=name, images=len(rs), text_alignment=_mean([r.text_alignment for r in rs]) or 0.0,
                   face_similarity=_mean(found), no_face_rate=1.0 - len(found) / len(rs) if rs else math.nan,
                   faces_found=len(found))

    rows = [row(rs[0].prompt, rs) for _, rs in sorted(groups.items())]
    rows.append(row(OVERALL, list(results)))
    return rows


def fmt_score(value: float | None, digits: int = 4) -> str:
    """A score as the tables print it; empty when there is none (e.g. no face in any image)."""
    return "" if value is None else f"{value:.{digits}f}"


def write_image_csv(path: Path, results: Sequence[ImageResult]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=IMAGE_FIELDS)
        w.writeheader()
        for r in results:
            d = asdict(r)
            d["text_alignment"] = fmt_score(r.text_alignment, 6)
            d["face_similarity"] = fmt_score(r.face_similarity, 6)
            w.writerow(d)
    return path


def write_summary_csv(path: Path, rows: Sequence[Row]) -> Path:
    """Empty ``face_similarity`` = no face found in any image of that prompt."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=SUMMARY_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({"prompt": r.prompt, "images": r.images, "text_alignment": fmt_score(r.text_alignment, 6),
                        "face_similarity": fmt_score(r.face_similarity, 6), "no_face_rate": fmt_score(r.no_face_rate, 4),
                        "faces_found": r.faces_found})
    return path


def markdown_table(rows: Sequence[Row], header: dict[str, Any] | None = None) -> str:
    lines = []
    if header:
        lines += [f"- **{k}**: {v}" for k, v in header.items()] + [""]
    lines += ["| prompt | images | text-alignment (CLIP) | face similarity | no-face rate |",
              "|---|---:|---:|---:|---:|"]
    for r in rows:
        name = f"**{r.prompt}**" if r.prompt == OVERALL else r.prompt.replace("|", "\\|")
        lines.append(f"| {name} | {r.images} | {fmt_score(r.text_alignment)} | {fmt_score(r.face_similarity) or 'n/a'} | "
                     f"{r.no_face_rate:.1%} |")
    lines += ["", "Text-alignment: raw CLIP cosine of the image and the prompt with the trigger replaced by the "
              "neutral phrase, over all images. Face similarity: identity cosine between the input face and the face "
              "found in the output, over the images where a face was found (faceless images are counted in the "
              "no-face rate, not as 0)."]
    return "\n".join(lines) + "\n"
