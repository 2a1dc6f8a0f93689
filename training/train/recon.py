"""Reconstruction photos (a folder of face photos, FFHQ-style) aligned once into ID crops: its own
resumable, sharded step.

:func:`align_recon` aligns the photos of ONE shard (``shard_of(relative path, num_shards)``), each
by the core's :class:`~dreamid_core.FacePipeline` (largest face), writes the crop PNG, then one
record per photo into its shard's part file (:class:`training.common.records.StepStore`, step ``align``
under the cache folder). Killed, it loses at most the photo it was on; rerun, it skips every photo
already recorded by any shard layout. Failures are recorded too (a faceless photo is not detected
again on every restart). Under ``accelerate launch`` every rank aligns its own shard before the
first step (``--stop-after-step 0`` does only that and the data report).

:func:`collect_recon` reads the records of every shard into training items and a report of what
was skipped and why; it refuses a folder that is not fully aligned.

The key of a photo is its path, size and mtime plus the alignment settings (crop size, detector,
min face size): an edited photo or another detector is aligned again.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dreamid_core import FacePipeline, make_detector
from dreamid_core.errors import DreamIDError
from dreamid_core.faces.detection import FaceDetector
from dreamid_core.faces.images import load_image

from ..common.records import StepStore, shard_of
from .data import IMAGE_EXTENSIONS, DataReport, FaceItem, file_id, save_crop

logger = logging.getLogger(__name__)

STEP = "align"


class ReconNotAlignedError(DreamIDError, RuntimeError):
    """Some reconstruction photos have no alignment record yet (a shard has not run or finished)."""


@dataclass
class AlignSummary:
    shard: int
    num_shards: int
    photos: int = 0  # in this shard
    aligned_now: int = 0
    from_cache: int = 0
    skipped_now: Counter = field(default_factory=Counter)  # reason -> count, among aligned_now

    def log(self) -> None:
        logger.info("face alignment shard %d/%d: %d photos, %d aligned now (%d skipped: %s), %d done before",
                    self.shard, self.num_shards, self.photos, self.aligned_now, sum(self.skipped_now.values()),
                    dict(self.skipped_now) or "none", self.from_cache)


def list_photos(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _photos(folder: str | Path) -> tuple[Path, list[Path]]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"recon_dir {folder} is not a folder; give a folder of face photos (FFHQ-style)")
    photos = list_photos(folder)
    if not photos:
        raise FileNotFoundError(f"recon_dir {folder} holds no photos ({', '.join(IMAGE_EXTENSIONS)})")
    return folder, photos


def _detector_name(detector: str | FaceDetector) -> str:
    return detector if isinstance(detector, str) else detector.name


def photo_key(image_id: str, crop_size: int, detector: str, min_face_size: int) -> str:
    return hashlib.sha1(f"{image_id}|{crop_size}|{detector}|{min_face_size}".encode()).hexdigest()


def align_recon(folder: str | Path, cache_dir: str | Path, *, crop_size: int = 112, min_face_size: int = 64,
                detector: str | FaceDetector = "mtcnn", detector_device: str = "cpu", shard: int = 0,
                num_shards: int = 1, progress: bool = False) -> AlignSummary:
    """Align this shard's photos that no shard has recorded yet (see the module docstring)."""
    from tqdm.auto import tqdm

    folder, photos = _photos(folder)
    cache_dir = Path(cache_dir)
    store = StepStore(cache_dir, STEP)
    done = store.records()
    det_name = _detector_name(detector)
    summary = AlignSummary(shard=shard, num_shards=num_shards)
    todo = []
    for photo in photos:
        rel = photo.relative_to(folder).as_posix()
        if shard_of(rel, num_shards) != shard:
            continue
        summary.photos += 1
        key = photo_key(file_id(photo), crop_size, det_name, min_face_size)
        record = done.get(key)
        if record is None or (record.get("status") == "ok" and not (cache_dir / f"{key}.png").is_file()):
            todo.append((rel, photo, key))
    summary.from_cache = summary.photos - len(todo)
    if todo:
        det = make_detector(detector, device=detector_device) if isinstance(detector, str) else detector
        pipeline = FacePipeline(det, crop_size=crop_size, quick_min_face=None)  # num_faces counts every face
        with store.writer(shard, num_shards) as writer:
            for rel, photo, key in tqdm(todo, desc=f"align faces {shard + 1}/{num_shards}", unit="photo",
                                        disable=not progress):
                entry = _align_one(pipeline, photo, cache_dir / f"{key}.png", min_face_size)
                writer.append({"key": key, "file": rel, **entry})
                summary.aligned_now += 1
                if entry["status"] != "ok":
                    summary.skipped_now[entry["reason"]] += 1
    summary.log()
    return summary


def collect_recon(folder: str | Path, cache_dir: str | Path, *, crop_size: int = 112, min_face_size: int = 64,
                  detector: str | FaceDetector = "mtcnn") -> tuple[list[FaceItem], DataReport]:
    """Training items of every aligned photo, and the report of every skipped one (with the reason)."""
    folder, photos = _photos(folder)
    cache_dir = Path(cache_dir)
    records = StepStore(cache_dir, STEP).records()
    det_name = _detector_name(detector)
    report = DataReport(source="recon", total=len(photos), details={"folder": str(folder)})
    items: list[FaceItem] = []
    missing = []
    for photo in photos:
        rel = photo.relative_to(folder).as_posix()
        image_id = file_id(photo)
        key = photo_key(image_id, crop_size, det_name, min_face_size)
        record, crop = records.get(key), cache_dir / f"{key}.png"
        if record is None or (record.get("status") == "ok" and not crop.is_file()):
            missing.append(rel)
        elif record.get("status") == "ok":
            items.append(FaceItem(crop=str(crop), image=str(photo), image_id=image_id))
        else:
            report.skip(rel, record.get("reason", "error"), record.get("detail", ""))
    if missing:
        raise ReconNotAlignedError(
            f"{len(missing)} of {len(photos)} photos under {folder} are not aligned yet (e.g. {missing[:3]}): a shard "
            "of the alignment step has not finished. Run `python -m training.train --config CFG --output-dir RUN "
            "--stop-after-step 0` (with the run's launcher, so every rank aligns its shard) until it completes.")
    report.usable = len(items)
    report.details.update(cache_dir=str(cache_dir), detector=det_name, min_face_size=min_face_size)
    return items, report


def prepare_recon(folder: str | Path, cache_dir: str | Path, *, crop_size: int = 112, min_face_size: int = 64,
                  detector: str | FaceDetector = "mtcnn", detector_device: str = "cpu",
                  progress: bool = False) -> tuple[list[FaceItem], DataReport]:
    """One process: align what is missing (every shard's work), then collect."""
    summary = align_recon(folder, cache_dir, crop_size=crop_size, min_face_size=min_face_size, detector=detector,
                          detector_device=detector_device, progress=progress)
    items, report = collect_recon(folder, cache_dir, crop_size=crop_size, min_face_size=min_face_size,
                                  detector=detector)
    report.details.update(aligned_now=summary.aligned_now, from_cache=summary.from_cache)
    return items, report


def _align_one(pipeline: FacePipeline, photo: Path, crop_path: Path, min_face_size: int) -> dict[str, Any]:
    from dreamid_core import FaceNotFoundError, ImageInputError

    try:
        image = load_image(photo)
        result = pipeline.process_one(image)
    except ImageInputError as exc:
        return {"status": "skipped", "reason": "unreadable", "detail": str(exc)[:300]}
    except FaceNotFoundError as exc:
        return {"status": "skipped", "reason": "no_face", "detail": str(exc).split(". ")[0][:300]}
    except Exception as exc:  # one odd file must not end a 70k-photo run; it is reported instead
        logger.warning("unexpected %s while aligning %s: %s", type(exc).__name__, photo, exc)
        return {"status": "skipped", "reason": "error", "detail": f"{type(exc).__name__}: {exc}"[:300]}
    short = result.detection.short_side
    if short < min_face_size:
        return {"status": "skipped", "reason": "face_too_small",
                "detail": f"face box short side {short:.0f} px < min_face_size {min_face_size}"}
    save_crop(result.crop, crop_path)
    return {"status": "ok", "num_faces": result.num_faces, "face_px": round(short, 1)}
