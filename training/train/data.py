"""Training data: reconstruction photos (aligned once, cached) and the editing manifest.

- reconstruction photos are aligned by their own resumable, sharded step (:mod:`training.train.recon`);
- :func:`load_edit_manifest`: the JSONL of ``python -m training.build_dataset``; only ``"kept": true`` lines.
- :class:`TrainingData`: a map-style dataset indexed by :class:`~training.train.sampler.SampleRef`.
  The target image is the photo center-cropped and resized to the training resolution, in -1..1.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dreamid_core.faces.images import crop_to_uint8, load_image, to_tensor
from dreamid_core.fileio import atomic_write

from .sampler import SampleRef

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@dataclass(frozen=True)
class FaceItem:
    """One training pair: an aligned ID crop, the image to reconstruct, and (edit) its prompt."""

    crop: str  # path of the aligned crop (PNG, crop_size px)
    image: str  # path of the target photo
    image_id: str  # identity of the target file's content version (path, size, mtime)
    prompt: str | None = None  # None: a template is drawn per sample


@dataclass
class DataReport:
    """What a data source gave: counts and every skipped file with the reason."""

    source: str
    total: int = 0
    usable: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def skip(self, file: str, reason: str, detail: str = "") -> None:
        self.skipped.append({"file": file, "reason": reason, "detail": detail[:300]})

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "total": self.total, "usable": self.usable,
                "skipped_count": len(self.skipped), "skipped_by_reason": dict(Counter(s["reason"] for s in self.skipped)),
                "skipped": self.skipped, **self.details}

    def log(self) -> None:
        d = self.to_dict()
        logger.info("%s data: %d usable of %d (%d skipped: %s)", self.source, self.usable, self.total,
                    len(self.skipped), d["skipped_by_reason"] or "none")
        for s in self.skipped[:5]:
            logger.warning("%s: skipped %s (%s) %s", self.source, s["file"], s["reason"], s["detail"])
        if len(self.skipped) > 5:
            logger.warning("%s: ... and %d more skipped, listed in the data report", self.source, len(self.skipped) - 5)


def file_id(path: Path) -> str:
    st = path.stat()
    return hashlib.sha1(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()


# -- images -------------------------------------------------------------------------------------

def center_square(image: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return image[top:top + side, left:left + side]


def load_target(path: str | Path, resolution: int) -> torch.Tensor:
    """The photo center-cropped to a square and resized: ``[3, R, R]`` float in -1..1."""
    from PIL import Image

    square = center_square(load_image(path))
    im = Image.fromarray(square)
    if im.size != (resolution, resolution):
        im = im.resize((resolution, resolution), Image.Resampling.BICUBIC, reducing_gap=None)
    t = torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1).float()  # [3, R, R]
    return t.div_(127.5).sub_(1.0)


def load_crop(path: str | Path, size: int) -> torch.Tensor:
    """An aligned crop file: ``[3, S, S]`` float in 0..1."""
    arr = load_image(path)
    if arr.shape[:2] != (size, size):
        raise ValueError(f"aligned crop {path} is {arr.shape[1]}x{arr.shape[0]} px; the face backbone needs "
                         f"{size}x{size}. Re-run the alignment (python -m training.build_dataset) with crop size {size}.")
    return to_tensor(arr)


def save_crop(crop: torch.Tensor, path: Path) -> None:
    from PIL import Image

    arr = crop_to_uint8(crop)  # [S, S, 3]
    with atomic_write(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")


def _write_json(path: Path, data: Any) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))


# -- editing manifest -----------------------------------------------------------------------------

def load_edit_manifest(path: str | Path, *, trigger: str = "S*", crop_size: int = 112) -> tuple[list[FaceItem], DataReport]:
    """Kept lines of the dataset builder's JSONL; relative paths are relative to the manifest's folder."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"edit_manifest {path} not found; build it with `python -m training.build_dataset` "
                                "or set recon_fraction to 1.0")
    report = DataReport(source="edit", details={"manifest": str(path)})
    items: list[FaceItem] = []
    not_kept = 0
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        report.total += 1
        where = f"{path.name}:{n}"
        try:
            rec = json.loads(line)
            crop, image, prompt = rec["source_crop"], rec["image"], rec["prompt"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            report.skip(where, "bad_line", f"needs JSON with source_crop, image, prompt, kept ({exc!r})")
            continue
        if not rec.get("kept"):
            not_kept += 1
            continue
        crop_p, image_p = (p if p.is_absolute() else path.parent / p for p in (Path(crop), Path(image)))
        missing = [str(p) for p in (crop_p, image_p) if not p.is_file()]
        if missing:
            report.skip(where, "missing_file", ", ".join(missing))
            continue
        if trigger not in prompt:
            report.skip(where, "no_trigger", f"prompt {prompt!r} lacks {trigger!r}")
            continue
        try:
            with Image.open(crop_p) as im:
                size = im.size
        except Exception as exc:  # unreadable header: a corrupt file
            report.skip(where, "unreadable", f"{crop_p}: {exc}")
            continue
        if size != (crop_size, crop_size):
            report.skip(where, "crop_size", f"{crop_p} is {size[0]}x{size[1]}, expected {crop_size}x{crop_size}")
            continue
        items.append(FaceItem(crop=str(crop_p), image=str(image_p), image_id=file_id(image_p), prompt=prompt))
    report.usable = len(items)
    report.details["not_kept"] = not_kept
    return items, report


def write_report(reports: Sequence[DataReport], path: str | Path) -> Path:
    path = Path(path)
    _write_json(path, {r.source: r.to_dict() for r in reports})
    for r in reports:
        r.log()
    logger.info("data report written to %s", path)
    return path


# -- the dataset ----------------------------------------------------------------------------------

class TrainingData(torch.utils.data.Dataset):
    """``dataset[SampleRef]`` -> ``{"crop", "prompt", "latent_key", "pixels" or "latent"}``.

    ``cached_latent(key)`` (optional) returns a latent stored on disk, so a worker skips decoding
    the photo; otherwise ``pixels`` holds the target image and the VAE encodes it.
    """

    def __init__(self, items: dict[str, list[FaceItem]], *, resolution: int, crop_size: int,
                 templates: Sequence[str], latent_key: Callable[[FaceItem], str],
                 cached_latent: Callable[[str], torch.Tensor | None] | None = None) -> None:
        self.items = items
        self.resolution = resolution
        self.crop_size = crop_size
        self.templates = list(templates)
        self.latent_key = latent_key
        self.cached_latent = cached_latent

    def sizes(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.items.items()}

    def __len__(self) -> int:
        return sum(self.sizes().values())

    def __getitem__(self, ref: SampleRef) -> dict[str, Any]:
        item = self.items[ref.source][ref.index]
        key = self.latent_key(item)
        out: dict[str, Any] = {"crop": load_crop(item.crop, self.crop_size), "latent_key": key,
                               "prompt": item.prompt if item.prompt is not None else self.templates[ref.template],
                               "position": ref.position, "image": item.image}
        latent = self.cached_latent(key) if self.cached_latent is not None else None
        if latent is not None:
            out["latent"] = latent
        else:
            out["pixels"] = load_target(item.image, self.resolution)
        return out


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """A micro-batch, the dict a training step reads (:meth:`training.train.loop.TrainLoop.step`):

    ``crop`` ``[B, 3, S, S]`` aligned faces in 0..1; ``prompt`` the B prompts with the trigger;
    ``latent`` / ``pixels`` per sample (a cached latent, or the ``[3, R, R]`` target image to encode;
    ``latent_key`` names it in the cache); ``position`` (the sampler's) and ``image`` (its file) for messages."""
    return {"crop": torch.stack([s["crop"] for s in samples]), "prompt": [s["prompt"] for s in samples],
            "latent_key": [s["latent_key"] for s in samples], "position": [s["position"] for s in samples],
            "image": [s["image"] for s in samples],
            "latent": [s.get("latent") for s in samples], "pixels": [s.get("pixels") for s in samples]}
