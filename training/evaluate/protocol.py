"""The DreamIdentity paper's evaluation protocol: text alignment and face similarity of identity prompts.

Run by ``python -m training.evaluate`` (:mod:`training.evaluate.cli`).

Every test face (one photo per identity in ``--faces``, the largest face detected and aligned by
the core pipeline) × every prompt of ``--prompts`` (each contains the trigger S*) × 4 images
(``--images-per-prompt``), DDIM 30 steps, CFG 7.5, each image seeded from ``--seed``, the face and
the prompt. S* comes from the encoder and is injected with :func:`training.common.prompt_encoding.encode_prompts`.

- text-alignment: raw CLIP cosine of the image and the prompt with the trigger replaced by a
  neutral phrase (``--neutral``, default "a person"): "S* as a chef" is scored as
  "a person as a chef", so the score measures the edit, not how CLIP reads "S*";
- face similarity: identity cosine between the input face and the face found in each output;
  outputs without a face are reported as the no-face rate, not counted as 0.

``--embedding FILE`` evaluates a plain textual-inversion file (this pack's ``.safetensors``, diffusers
``learned_embeds``, A1111 ``.pt``; :mod:`training.evaluate.identity_sources`) on the same protocol, for baselines. It is
one fixed identity, so the SAME S* is used for every test face (face similarity then measures how close each test face
is to that one identity: meaningful with a single test face, the one the embedding was made from).

The work is split into (test face, prompt) units, each recorded in ``eval/parts/`` once its images
are saved: a killed evaluation continues where it stopped, and ``--shard i --num-shards n`` splits the
units over processes (``--device auto`` puts shard i on GPU i mod n). The shard that finds every unit
done writes ``summary.md``, ``summary.csv`` (per prompt and overall), ``images.csv`` (per image) and
the grid pages (``grid.png``, ``grid-002.png``, ...: every row, ``--grid-rows`` a page); the images
are under ``images/``.

Where things plug in: S* comes from an identity source (:func:`training.evaluate.cli.identity_source`,
:mod:`training.evaluate.identity_sources`); one (face, prompt) unit is :func:`_run_unit`; the tables are
:func:`write_summary`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from dreamid_core import (
    FaceNotFoundError,
    FacePipeline,
    ImageInputError,
)
from dreamid_core.errors import ConfigError
from dreamid_core.faces.images import crop_to_uint8, load_image
from dreamid_core.fileio import atomic_write

from ..common.generation import item_seed
from ..common.records import StepStore, check_shard
from .grid import image_grid
from .report import (
    ImageResult,
    markdown_table,
    summarize,
    write_image_csv,
    write_summary_csv,
)

logger = logging.getLogger("training.evaluate")

PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
EXAMPLE_PROMPTS = Path(__file__).resolve().parents[1] / "data" / "eval_prompts_example.txt"
SETTINGS_FILE = "eval_settings.json"

__all__ = ["EvalConfig", "evaluate", "load_prompts", "load_test_faces"]


@dataclass(frozen=True)
class EvalConfig:
    out: Path
    images_per_prompt: int = 4  # paper: 4
    seed: int = 0
    trigger: str = "S*"
    neutral: str = "a person"  # replaces the trigger in the text CLIP scores
    scale: float = 1.0  # S* strength
    grid_rows: int = 16  # rows per grid page (one per face and prompt): grid.png, grid-002.png, ...
    shard: int = 0  # this process's share of the (face, prompt) units
    num_shards: int = 1

    def __post_init__(self) -> None:
        if self.images_per_prompt < 1:
            raise ConfigError(f"--images-per-prompt must be >= 1, got {self.images_per_prompt}")
        if self.grid_rows < 1:
            raise ConfigError(f"--grid-rows must be >= 1, got {self.grid_rows}")
        check_shard(self.shard, self.num_shards)

    def settings(self) -> dict[str, Any]:
        """What decides the numbers (not where they go, nor how the work is split)."""
        return {"images_per_prompt": self.images_per_prompt, "seed": self.seed, "trigger": self.trigger,
                "neutral": self.neutral, "scale": self.scale}


def load_prompts(path: str | Path, trigger: str = "S*") -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file not found: {path} (one prompt per line containing {trigger!r}; an "
                                f"example ships as {EXAMPLE_PROMPTS})")
    prompts = []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if trigger not in line:
            raise ValueError(f"{path} line {number} ({line!r}) does not contain the trigger {trigger!r}; every "
                             f"evaluation prompt must name the identity, e.g. 'a photo of {trigger}'")
        prompts.append(line)
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


def load_test_faces(folder: str | Path, pipeline: FacePipeline) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``{file stem: aligned crop [3, 112, 112]}`` for every photo in ``folder`` (sorted); photos
    that cannot be read or show no face are skipped and returned as the second value."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"test faces folder not found: {folder} (one photo per identity)")
    faces, skipped = {}, []
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES):
        try:
            faces[path.stem] = pipeline.process_one(load_image(path)).crop
        except (ImageInputError, FaceNotFoundError) as exc:
            logger.warning("test face %s skipped: %s", path.name, exc)
            skipped.append(path.name)
    if not faces:
        raise FaceNotFoundError(f"no usable test face in {folder} ({len(skipped)} file(s) skipped); expected photos "
                                f"({', '.join(PHOTO_SUFFIXES)}) with one clearly visible face each")
    return faces, skipped


def evaluate(cfg: EvalConfig, *, faces: dict[str, torch.Tensor], prompts: list[str], identity_source: Any,
             generator: Any, pipeline: FacePipeline, identity: Any, clip: Any,
             header: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run this shard's (face, prompt) units that are not done yet, then, once every unit of every shard
    is recorded, write the summary. ``generator.batch(prompts, seeds, parts=, k=)`` draws the images
    (:class:`training.common.generation.DiffusersGenerator`). Returns ``{"rows", "results", "encode_ms",
    "pending"}``; ``rows`` is None while other shards' units are pending."""
    out = Path(cfg.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    _check_settings(out, {**(header or {}), **cfg.settings(), "faces": sorted(faces), "prompts": prompts})
    store = StepStore(out, "eval")
    units = [(face, pi) for face in faces for pi in range(len(prompts))]  # face-major: the order of every table
    done = store.records()
    mine = [u for i, u in enumerate(units)  # round robin: balanced, and stable (the settings check fixes units)
            if i % cfg.num_shards == cfg.shard and unit_key(*u) not in done]
    encode_ms: dict[str, float] = {}
    with store.writer(cfg.shard, cfg.num_shards) as writer:
        for face_name, pi in mine:
            crop = faces[face_name]
            if face_name not in encode_ms:  # S* and the reference identity once per face
                t0 = time.perf_counter()
                parts = identity_source.parts(crop)  # {key: [k, D]}
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                encode_ms[face_name] = (time.perf_counter() - t0) * 1000
                ref = identity.embed(crop[None])  # [1, D]
            results = _run_unit(cfg, face_name, pi, prompts[pi], parts, ref, identity_source.k, generator=generator,
                                pipeline=pipeline, identity=identity, clip=clip, out=out)
            writer.append({"key": unit_key(face_name, pi), "results": [asdict(r) for r in results],
                           "encode_ms": encode_ms[face_name]})
    done = store.records()
    pending = [unit_key(*u) for u in units if unit_key(*u) not in done]
    if pending:
        logger.info("shard %d/%d done; %d of %d (face, prompt) units are pending in other shards: the summary is "
                    "written by the shard that finishes last (or rerun any shard)", cfg.shard, cfg.num_shards,
                    len(pending), len(units))
        return {"rows": None, "results": None, "encode_ms": list(encode_ms.values()), "pending": pending}
    records = [done[unit_key(*u)] for u in units]
    results = [ImageResult(**r) for rec in records for r in rec["results"]]
    face_ms = {rec["key"].split("/")[0]: rec["encode_ms"] for rec in records}
    rows = write_summary(cfg, out, results, faces=faces, prompts=prompts, identity_source=identity_source,
                         encode_ms=list(face_ms.values()), header=header)
    return {"rows": rows, "results": results, "encode_ms": list(face_ms.values()), "pending": []}


def unit_key(face_name: str, prompt_index: int) -> str:
    return f"{face_name}/{prompt_index:03d}"


def _check_settings(out: Path, settings: dict[str, Any]) -> None:
    """A resumed (or other shard's) evaluation must compute the same thing as the one that began ``out``."""
    import json

    path = out / SETTINGS_FILE
    text = json.dumps(settings, indent=1, sort_keys=True, default=str)
    if path.is_file():
        before = json.loads(path.read_text())
        now = json.loads(text)
        diff = {k: (before.get(k), now.get(k)) for k in set(before) | set(now) if before.get(k) != now.get(k)}
        if diff:
            raise ValueError(f"{out} holds an evaluation with other settings ({diff}); rerun with the same ones to "
                             "continue it, or give another --out")
        return
    with atomic_write(path) as tmp:
        tmp.write_text(text)


def _run_unit(cfg: EvalConfig, face_name: str, pi: int, prompt: str, parts: dict[str, torch.Tensor],
              ref: torch.Tensor, k: int, *, generator: Any, pipeline: FacePipeline, identity: Any, clip: Any,
              out: Path) -> list[ImageResult]:
    """One test face x one prompt: draw ``images_per_prompt`` images, save them, score them."""
    n = cfg.images_per_prompt
    seeds = [item_seed(cfg.seed, f"{face_name}/{pi}/{j}") for j in range(n)]
    batch_parts = {key: v[None].expand(n, *v.shape) for key, v in parts.items()}  # [n, k, D]
    images = generator.batch([prompt] * n, seeds, parts=batch_parts, k=k)
    text_scores = clip.score(images, [prompt.replace(cfg.trigger, cfg.neutral)]).tolist()
    results = []
    for j, (image, seed, ts) in enumerate(zip(images, seeds, text_scores, strict=True)):
        rel = f"images/{face_name}/{pi:03d}-{j}.png"
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(out / rel) as tmp:
            image.save(tmp, format="PNG")
        try:
            found = pipeline.process_one(_rgb(image))
            sim = float((identity.embed(found.crop[None]) * ref).sum())
        except FaceNotFoundError:
            sim = None
        results.append(ImageResult(face=face_name, prompt_index=pi, prompt=prompt, seed=seed, image=rel,
                                   text_alignment=float(ts), face_similarity=sim, face_found=sim is not None))
    logger.info("%s | %s: CLIP %.4f, faces found %d/%d", face_name, prompt, sum(text_scores) / n,
                sum(r.face_found for r in results), n)
    return results


def write_summary(cfg: EvalConfig, out: Path, results: list[ImageResult], *, faces: dict[str, torch.Tensor],
                  prompts: list[str], identity_source: Any, encode_ms: list[float],
                  header: dict[str, Any] | None) -> list[Any]:
    """summary.md, summary.csv, images.csv and the grid pages, from every unit's results."""
    rows = summarize(results)
    overall = rows[-1]
    pages = write_grids(cfg, out, results, faces)
    head = {"test faces": len(faces), "prompts": len(prompts), "images per prompt": cfg.images_per_prompt,
            "identity": "textual-inversion embedding (the same for every face)" if identity_source.fixed
            else "DreamIdentity encoder", "S* encoding time (mean per face)": f"{sum(encode_ms) / len(encode_ms):.1f} ms",
            "neutral phrase for CLIP": repr(cfg.neutral), "grid": ", ".join(p.name for p in pages), **(header or {})}
    # atomic: two shards finishing together both write the same tables
    with atomic_write(out / "summary.md") as tmp:
        tmp.write_text("# DreamIdentity evaluation\n\n" + markdown_table(rows, head), encoding="utf-8")
    with atomic_write(out / "summary.csv") as tmp:
        write_summary_csv(tmp, rows)
    with atomic_write(out / "images.csv") as tmp:
        write_image_csv(tmp, results)
    logger.info("overall: text-alignment %.4f, face similarity %s, no-face rate %.1f%% (%d images) -> %s",
                overall.text_alignment, "n/a" if overall.face_similarity is None else f"{overall.face_similarity:.4f}",
                overall.no_face_rate * 100, overall.images, out / "summary.md")
    return rows


def write_grids(cfg: EvalConfig, out: Path, results: list[ImageResult], faces: dict[str, torch.Tensor]) -> list[Path]:
    """Every (face, prompt) row, ``grid_rows`` rows a page: grid.png, then grid-002.png, grid-003.png, ..."""
    from PIL import Image

    by_unit: dict[tuple[str, int], list[ImageResult]] = {}
    for r in results:
        by_unit.setdefault((r.face, r.prompt_index), []).append(r)
    units = list(by_unit.items())
    pages = []
    for start in range(0, len(units), cfg.grid_rows):
        rows, labels = [], []
        for (face_name, _), rs in units[start:start + cfg.grid_rows]:
            crop = faces[face_name]
            face_img = Image.fromarray(crop_to_uint8(crop))
            rows.append([face_img, *(Image.open(out / r.image) for r in rs)])
            labels.append(f"{face_name}: {rs[0].prompt}")
        page = out / ("grid.png" if not pages else f"grid-{len(pages) + 1:03d}.png")
        with atomic_write(page) as tmp:
            image_grid(rows, labels).save(tmp, format="PNG")
        pages.append(page)
    return pages


def _rgb(image: Any) -> Any:
    import numpy as np

    return np.array(image.convert("RGB"))
