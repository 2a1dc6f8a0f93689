"""The four steps of the self-augmented editing data (DreamIdentity Sec. 3.3), resumable and sharded.

Layout under the dataset folder ``out`` (every path stored in a record is relative to ``out``)::

    names/parts/*.jsonl      one record per registered name
    sources/parts/*.jsonl    one per source image: kept (aligned face saved) or rejected (+ reason)
    sources/images/<slug>/<i>.png, sources/crops/<slug>/<i>.png
    edits/parts/*.jsonl      one per edited image (template id, prompt with S*, prompt with the name)
    edits/images/<slug>/<i>-<template>-<j>.png
    scores/parts/*.jsonl     one per edited image: identity and CLIP scores, or why there are none
    manifest.jsonl           every edit with its scores and "kept" (what the trainer reads)
    manifest_summary.json    per-template counts, the selection settings, corrupt files

Each step owns the items whose key hashes to its shard (:func:`training.common.records.shard_of`), skips
keys already recorded by any part file, writes an item's files first and its record last. The
image generator, the face pipeline and the scorers are passed in, so tests can swap them.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dreamid_core import FaceNotFoundError, ImageInputError
from dreamid_core.errors import ConfigError
from dreamid_core.faces.images import crop_to_uint8, load_image, to_tensor
from dreamid_core.fileio import atomic_write

from ..common.generation import generate_many, item_seed
from ..common.records import StepStore, check_shard, shard_of, write_jsonl_atomic
from .edit_prompts import SOURCE_TEMPLATE, Name, fill, select_templates, training_prompt
from .selection import COMBINE_METHODS, keep_count, select_top

logger = logging.getLogger(__name__)

MANIFEST = "manifest.jsonl"
MANIFEST_SUMMARY = "manifest_summary.json"


@dataclass(frozen=True)
class BuildConfig:
    """What the dataset steps compute. Defaults follow the paper where it says."""

    out: Path
    shard: int = 0
    num_shards: int = 1
    seed: int = 0  # every image's seed is item_seed(seed, its key)
    trigger: str = "S*"
    images_per_name: int = 4  # source images generated per name
    min_face: float = 128.0  # px; a source face's detected box must have short side > this (paper: 128)
    templates: tuple[str, ...] | None = None  # edit template ids; None = all of the paper's
    edits_per_prompt: int = 1  # edited images per (source, template)
    batch_size: int = 4  # images per generator / scorer call
    keep_fraction: float = 0.25  # top share kept per template (paper: 25 %)
    combine: str = "rank"  # "rank" or "zscore", see training.build_dataset.selection
    id_weight: float = 0.5  # identity score's share of the combined score
    progress: bool = False  # a tqdm bar over this shard's items in each step

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        check_shard(self.shard, self.num_shards)
        for name in ("images_per_name", "edits_per_prompt", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.min_face < 0:
            raise ConfigError(f"--min-face must be >= 0 px, got {self.min_face}")
        if self.combine not in COMBINE_METHODS:
            raise ConfigError(f"--combine must be one of {COMBINE_METHODS}, got {self.combine!r}")
        keep_count(1, 1, self.keep_fraction)  # validates the fraction
        select_templates(list(self.templates) if self.templates else None)  # validates the ids


@dataclass
class StepSummary:
    """What one run of one step did in its shard."""

    step: str
    shard: int
    num_shards: int
    total: int = 0  # items this shard owns
    done_before: int = 0
    new: int = 0
    outcomes: Counter = field(default_factory=Counter)  # of the new items: kept / rejected:<reason> / ...
    corrupt: list[str] = field(default_factory=list)  # unreadable image files met (paths)

    def log(self) -> None:
        shard = f" shard {self.shard}/{self.num_shards}" if self.num_shards > 1 else ""
        details = ", ".join(f"{k} {v}" for k, v in sorted(self.outcomes.items()))
        logger.info("%s%s: %d item(s), %d done before, %d new items%s", self.step, shard, self.total,
                    self.done_before, self.new, f" ({details})" if details else "")
        if self.corrupt:
            logger.warning("%s: %d corrupt image file(s) skipped: %s", self.step, len(self.corrupt),
                           ", ".join(self.corrupt))


# -- helpers ----------------------------------------------------------------------------------------

def save_png(image: Any, path: Path) -> None:
    """Write a PIL image atomically (a killed process never leaves half a PNG under the real name)."""
    with atomic_write(path) as tmp:
        image.save(tmp, format="PNG")


def crop_to_pil(crop: torch.Tensor) -> Any:
    from PIL import Image

    return Image.fromarray(crop_to_uint8(crop))


def _todo(store: StepStore, keys: Sequence[str], cfg: BuildConfig, step: str) -> tuple[list[str], StepSummary]:
    done = set(store.records())
    mine = [k for k in keys if shard_of(k, cfg.num_shards) == cfg.shard]
    summary = StepSummary(step, cfg.shard, cfg.num_shards, total=len(mine))
    todo = [k for k in mine if k not in done]
    summary.done_before = len(mine) - len(todo)
    return todo, summary


def _chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _bar(cfg: BuildConfig, step: str, total: int) -> Any:
    """This shard's progress over its pending items (updated per item written)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"{step} {cfg.shard + 1}/{cfg.num_shards}", unit="item", disable=not cfg.progress)


# -- (a) names --------------------------------------------------------------------------------------

def register_names(cfg: BuildConfig, names: Sequence[Name]) -> StepSummary:
    """Add names to the dataset (only new ones; always one part file, names are not sharded)."""
    store = StepStore(cfg.out, "names")
    done = store.records()
    summary = StepSummary("names", 0, 1, total=len(names), done_before=sum(n.slug in done for n in names))
    with store.writer(0, 1) as writer:
        for name in names:
            if name.slug not in done:
                writer.append({"key": name.slug, "name": name.text})
                summary.new += 1
                summary.outcomes["registered"] += 1
    summary.log()
    return summary


def registered_names(out: Path) -> list[Name]:
    records = StepStore(out, "names").records()
    if not records:
        raise FileNotFoundError(f"no names registered in {out}; run `python -m training.build_dataset names "
                                f"--names FILE --out {out}` first")
    return [Name(text=r["name"], slug=r["key"]) for r in sorted(records.values(), key=lambda r: r["key"])]


# -- (b) sources ------------------------------------------------------------------------------------

def generate_sources(cfg: BuildConfig, generator: Any, pipeline: Any) -> StepSummary:
    """"<name> face, looking at the camera" -> image -> largest face detected and aligned; kept when
    its box's short side > ``min_face``. Faceless and too-small images are recorded as rejected."""
    names = {n.slug: n for n in registered_names(cfg.out)}
    keys = [f"{slug}/{i:02d}" for slug in sorted(names) for i in range(cfg.images_per_name)]
    store = StepStore(cfg.out, "sources")
    todo, summary = _todo(store, keys, cfg, "sources")
    chunk = cfg.batch_size if hasattr(generator, "batch") else 1
    with store.writer(cfg.shard, cfg.num_shards) as writer, _bar(cfg, "sources", len(todo)) as bar:
        for keys_chunk in _chunks(todo, chunk):
            prompts = [fill(SOURCE_TEMPLATE, names[k.split("/")[0]].text) for k in keys_chunk]
            seeds = [item_seed(cfg.seed, k) for k in keys_chunk]
            images = generate_many(generator, prompts, seeds, chunk)
            for key, prompt, seed, image in zip(keys_chunk, prompts, seeds, images, strict=True):
                slug, index = key.split("/")
                record = {"key": key, "name": names[slug].text, "prompt": prompt, "seed": seed,
                          "image": f"sources/images/{slug}/{index}.png", "crop": None}
                save_png(image, cfg.out / record["image"])
                record.update(_source_face(cfg, pipeline, image, slug, index))
                writer.append(record)
                bar.update(1)
                summary.new += 1
                summary.outcomes[record["status"] if record["status"] == "kept" else f"rejected:{record['reason']}"] += 1
    summary.log()
    return summary


def _source_face(cfg: BuildConfig, pipeline: Any, image: Any, slug: str, index: str) -> dict[str, Any]:
    try:
        face = pipeline.process_one(np.array(image.convert("RGB")))
    except FaceNotFoundError:
        return {"status": "rejected", "reason": "no_face"}
    except ImageInputError as exc:
        return {"status": "rejected", "reason": f"bad_image: {exc}"}
    short = float(face.detection.short_side)
    info = {"box": [round(float(v), 1) for v in face.detection.box], "face_short_side": round(short, 1),
            "num_faces": face.num_faces}
    if not short > cfg.min_face:
        return {"status": "rejected", "reason": "face_too_small", **info}
    crop = f"sources/crops/{slug}/{index}.png"
    save_png(crop_to_pil(face.crop), cfg.out / crop)
    return {"status": "kept", "reason": None, "crop": crop, **info}


def kept_sources(out: Path) -> list[dict[str, Any]]:
    return sorted((r for r in StepStore(out, "sources").records().values() if r.get("status") == "kept"),
                  key=lambda r: r["key"])


# -- (c) edits --------------------------------------------------------------------------------------

def edit_items(cfg: BuildConfig) -> list[dict[str, Any]]:
    """Every (kept source, template, j) the edits step owes, with its prompts and file names."""
    templates = select_templates(list(cfg.templates) if cfg.templates else None)
    items = []
    for src in kept_sources(cfg.out):
        slug, index = src["key"].split("/")
        for tid, template in templates.items():
            for j in range(cfg.edits_per_prompt):
                key = f"{src['key']}/{tid}/{j}"
                items.append({"key": key, "source_key": src["key"], "name": src["name"], "template": tid,
                              "prompt": training_prompt(template, cfg.trigger), "gen_prompt": fill(template, src["name"]),
                              "seed": item_seed(cfg.seed, key), "source_crop": src["crop"], "source_image": src["image"],
                              "image": f"edits/images/{slug}/{index}-{tid}-{j}.png"})
    return items


def generate_edits(cfg: BuildConfig, generator: Any) -> StepSummary:
    """The paper's edit prompts for every kept source, generated with the name in the prompt;
    the record's ``prompt`` is the training prompt (name replaced by the trigger)."""
    items = {it["key"]: it for it in edit_items(cfg)}
    store = StepStore(cfg.out, "edits")
    todo, summary = _todo(store, list(items), cfg, "edits")
    chunk = cfg.batch_size if hasattr(generator, "batch") else 1
    with store.writer(cfg.shard, cfg.num_shards) as writer, _bar(cfg, "edits", len(todo)) as bar:
        for keys_chunk in _chunks(todo, chunk):
            batch = [items[k] for k in keys_chunk]
            images = generate_many(generator, [it["gen_prompt"] for it in batch], [it["seed"] for it in batch], chunk)
            for item, image in zip(batch, images, strict=True):
                save_png(image, cfg.out / item["image"])
                writer.append(item)
                bar.update(1)
                summary.new += 1
                summary.outcomes[item["template"]] += 1
    summary.log()
    return summary


# -- (d) filter: scores ------------------------------------------------------------------------------

def _read(out: Path, rel: str, corrupt: list[str]) -> np.ndarray | None:
    try:
        return load_image(out / rel)
    except ImageInputError as exc:
        logger.warning("skipping %s: %s", rel, exc)
        corrupt.append(rel)
        return None


def score_edits(cfg: BuildConfig, pipeline: Any, identity: Any, clip: Any) -> StepSummary:
    """Identity cosine (source crop vs the face the pipeline finds in the edit) and CLIP score of
    the edit's generation prompt, for this shard's unscored edits. No face: ``id_score`` None."""
    from PIL import Image

    edits = StepStore(cfg.out, "edits").records()
    store = StepStore(cfg.out, "scores")
    todo, summary = _todo(store, sorted(edits), cfg, "scores")
    with store.writer(cfg.shard, cfg.num_shards) as writer, _bar(cfg, "scores", len(todo)) as bar:
        for keys_chunk in _chunks(todo, cfg.batch_size):
            records, pairs, clip_jobs = [], [], []
            for key in keys_chunk:
                edit = edits[key]
                record: dict[str, Any] = {"key": key, "id_score": None, "clip_score": None, "reason": None}
                records.append(record)
                image = _read(cfg.out, edit["image"], summary.corrupt)
                source = _read(cfg.out, edit["source_crop"], summary.corrupt) if image is not None else None
                if image is None or source is None:
                    record["reason"] = f"corrupt_image: {edit['image'] if image is None else edit['source_crop']}"
                    continue
                clip_jobs.append((record, Image.fromarray(image), edit["gen_prompt"]))
                try:
                    face = pipeline.process_one(image)
                except FaceNotFoundError:
                    record["reason"] = "no_face"
                    continue
                record["box"] = [round(float(v), 1) for v in face.detection.box]
                pairs.append((record, to_tensor(source), face.crop))
            if pairs:
                sims = identity.similarity(torch.stack([p[1] for p in pairs]), torch.stack([p[2] for p in pairs]))
                for (record, _, _), sim in zip(pairs, sims.tolist(), strict=True):
                    record["id_score"] = round(float(sim), 6)
            if clip_jobs:
                scores = clip.score([j[1] for j in clip_jobs], [j[2] for j in clip_jobs])
                for (record, _, _), s in zip(clip_jobs, scores.tolist(), strict=True):
                    record["clip_score"] = round(float(s), 6)
            for record in records:
                writer.append(record)
                bar.update(1)
                summary.new += 1
                summary.outcomes[(record["reason"] or "scored").split(":")[0]] += 1
    summary.log()
    return summary


# -- (d) filter: selection and the manifest -----------------------------------------------------------

def build_manifest(cfg: BuildConfig, *, allow_partial: bool = False) -> dict[str, Any]:
    """Join edits and scores, keep the top ``keep_fraction`` per template, write ``manifest.jsonl``
    (only when its content changes) and ``manifest_summary.json``. Returns the summary.

    With unscored edits left (other shards still running) nothing is written unless ``allow_partial``."""
    edits = StepStore(cfg.out, "edits").records()
    scores = StepStore(cfg.out, "scores").records()
    pending = sorted(set(edits) - set(scores))
    if pending and not allow_partial:
        logger.info("manifest not written yet: %d of %d edits are unscored (other shards still running?). It is "
                    "written by the last filter shard to finish, or by `merge --allow-partial`.", len(pending), len(edits))
        return {"written": False, "pending": len(pending), "edits": len(edits)}
    items = []
    for key in sorted(edits):
        edit, score = edits[key], scores.get(key, {"reason": "unscored"})
        items.append({**{k: edit[k] for k in ("key", "name", "template", "prompt", "gen_prompt", "seed", "image",
                                              "source_crop", "source_image")},
                      "id_score": score.get("id_score"), "clip_score": score.get("clip_score"),
                      "reason": score.get("reason")})
    select_top(items, keep_fraction=cfg.keep_fraction, method=cfg.combine, id_weight=cfg.id_weight)
    for it in items:
        if it["reason"] is None and not it["kept"]:
            it["reason"] = "below_top_fraction"
    per_template: dict[str, Counter] = {}
    for it in items:
        c = per_template.setdefault(it["template"], Counter())
        c["total"] += 1
        c["scored"] += it["combined"] is not None
        c["kept"] += it["kept"]
    summary = {"written": True, "pending": len(pending), "edits": len(items), "kept": sum(it["kept"] for it in items),
               "keep_fraction": cfg.keep_fraction, "combine": cfg.combine, "id_weight": cfg.id_weight,
               "per_template": {t: dict(c) for t, c in sorted(per_template.items())},
               "reasons": dict(Counter(it["reason"] or "kept" for it in items)),
               "corrupt": sorted(it["reason"].split(": ", 1)[1] for it in items
                                 if (it["reason"] or "").startswith("corrupt_image"))}
    _write_if_changed(cfg.out / MANIFEST, items)
    (cfg.out / MANIFEST_SUMMARY).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    logger.info("manifest: %d edits, %d kept (%s of each template, %s); per template: %s", len(items),
                summary["kept"], cfg.keep_fraction, cfg.combine,
                ", ".join(f"{t} {c['kept']}/{c['total']}" for t, c in summary["per_template"].items()))
    if summary["corrupt"]:
        logger.warning("%d corrupt image file(s) left out: %s", len(summary["corrupt"]), ", ".join(summary["corrupt"]))
    return summary


def _write_if_changed(path: Path, items: list[dict[str, Any]]) -> None:
    text = "".join(json.dumps(it, sort_keys=True, ensure_ascii=False) + "\n" for it in items)
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        logger.info("%s unchanged", path)
        return
    write_jsonl_atomic(path, items)
    logger.info("wrote %s", path)


def read_manifest(path: str | Path, *, kept_only: bool = True) -> list[dict[str, Any]]:
    """The manifest's records with ``image``/``source_crop``/``source_image`` made absolute (they are
    stored relative to the manifest's folder, so a dataset folder can be moved)."""
    from ..common.records import read_jsonl

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}; run `python -m training.build_dataset filter` first")
    root = path.resolve().parent
    out = []
    for record in read_jsonl(path):
        if kept_only and not record.get("kept"):
            continue
        for k in ("image", "source_crop", "source_image"):
            if record.get(k):
                record[k] = str(root / record[k])
        out.append(record)
    return out

