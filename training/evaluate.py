"""``python -m training.evaluate``: the DreamIdentity paper's evaluation protocol.

Every test face (one photo per identity in ``--faces``, the largest face detected and aligned by
the core pipeline) × every prompt of ``--prompts`` (each contains the trigger S*) × 4 images
(``--images-per-prompt``), DDIM 30 steps, CFG 7.5, each image seeded from ``--seed``, the face and
the prompt. S* comes from the encoder and is injected with :func:`training.text.encode_prompts`.

- text-alignment: raw CLIP cosine of the image and the prompt with the trigger replaced by a
  neutral phrase (``--neutral``, default "a person"): "S* as a chef" is scored as
  "a person as a chef", so the score measures the edit, not how CLIP reads "S*";
- face similarity: identity cosine between the input face and the face found in each output;
  outputs without a face are reported as the no-face rate, not counted as 0.

``--embedding FILE`` evaluates a plain textual-inversion ``.safetensors`` (``emb_params``, or
``clip_l`` + ``clip_g`` for SDXL) on the same protocol, for baselines. It is one fixed identity,
so the SAME S* is used for every test face (face similarity then measures how close each test face
is to that one identity: meaningful with a single test face, the one the embedding was made from).

Writes ``summary.md``, ``summary.csv`` (per prompt and overall), ``images.csv`` (per image),
``grid.png`` and the images under ``images/``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dreamid_core import (
    DreamIDError,
    FaceNotFoundError,
    FacePipeline,
    ImageInputError,
    IncompatibleEncoderError,
    WeightFormatError,
    detector_names,
    load_encoder,
    make_detector,
)
from dreamid_core.images import load_image

from .eval_report import (
    ImageResult,
    markdown_table,
    summarize,
    write_image_csv,
    write_summary_csv,
)
from .generation import item_seed
from .grid import image_grid
from .text import PART_FOR_ENCODER

logger = logging.getLogger("training.evaluate")

PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
EXAMPLE_PROMPTS = Path(__file__).resolve().parent / "data" / "eval_prompts_example.txt"


@dataclass(frozen=True)
class EvalConfig:
    out: Path
    images_per_prompt: int = 4  # paper: 4
    seed: int = 0
    trigger: str = "S*"
    neutral: str = "a person"  # replaces the trigger in the text CLIP scores
    scale: float = 1.0  # S* strength
    grid_rows: int = 16  # rows of grid.png (one per face and prompt)

    def __post_init__(self) -> None:
        if self.images_per_prompt < 1:
            raise ValueError(f"--images-per-prompt must be >= 1, got {self.images_per_prompt}")


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


class EncoderIdentity:
    """S* of each test face from a DreamIdentity encoder."""

    fixed = False

    def __init__(self, encoder: Any, widths: dict[str, int], scale: float = 1.0) -> None:
        if dict(encoder.config.widths) != dict(widths):
            raise IncompatibleEncoderError(f"the encoder makes S* for {dict(encoder.config.widths)} but the base model's "
                                           f"text encoder(s) take {dict(widths)}; evaluate it on the base model it "
                                           f"was trained for (target {encoder.config.target!r})")
        self.encoder, self.scale = encoder, scale
        self.k = encoder.config.num_tokens

    @torch.inference_mode()
    def parts(self, crop: torch.Tensor) -> dict[str, torch.Tensor]:
        p = next(self.encoder.parameters())
        s = self.encoder.encode(crop[None].to(p.device, p.dtype), scale=self.scale)  # [k, out_dim]
        return self.encoder.split(s)


class EmbeddingIdentity:
    """One textual-inversion embedding, used for every test face."""

    fixed = True

    def __init__(self, path: str | Path, family: str, widths: dict[str, int]) -> None:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"embedding not found: {path}")
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise WeightFormatError(f"{path.name} is not a readable safetensors file ({exc})") from exc
        keys = PART_FOR_ENCODER[family]
        if "emb_params" in tensors and len(keys) == 1:
            parts = {keys[0]: tensors["emb_params"]}
        elif all(k in tensors for k in keys):
            parts = {k: tensors[k] for k in keys}
        else:
            want = "emb_params" if len(keys) == 1 else " and ".join(keys)
            raise WeightFormatError(f"{path.name} holds {sorted(tensors)}; a {family} textual-inversion file holds "
                                    f"{want} ([k, width] each)")
        for key, t in parts.items():
            if t.ndim != 2 or t.shape[1] != widths[key]:
                raise IncompatibleEncoderError(f"{path.name}: {key} is {tuple(t.shape)} but the base model's {key} "
                                               f"takes [k, {widths[key]}]; use an embedding made for this base model")
        if len({t.shape[0] for t in parts.values()}) != 1:
            raise WeightFormatError(f"{path.name}: its tensors disagree on k: {[tuple(t.shape) for t in parts.values()]}")
        self._parts = {k: v.float() for k, v in parts.items()}
        self.k = next(iter(parts.values())).shape[0]

    def parts(self, crop: torch.Tensor) -> dict[str, torch.Tensor]:
        return self._parts


def evaluate(cfg: EvalConfig, *, faces: dict[str, torch.Tensor], prompts: list[str], identity_source: Any,
             generator: Any, pipeline: FacePipeline, identity: Any, clip: Any,
             header: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the protocol and write every output. ``generator.batch(prompts, seeds, parts=, k=)`` draws
    the images (:class:`training.generation.DiffusersGenerator`)."""
    from PIL import Image

    out = Path(cfg.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    results: list[ImageResult] = []
    grid_rows, grid_labels = [], []
    encode_ms = []
    n = cfg.images_per_prompt
    for face_name, crop in faces.items():
        t0 = time.perf_counter()
        parts = identity_source.parts(crop)  # {key: [k, D]}
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        encode_ms.append((time.perf_counter() - t0) * 1000)
        ref = identity.embed(crop[None])  # [1, D]
        for pi, prompt in enumerate(prompts):
            seeds = [item_seed(cfg.seed, f"{face_name}/{pi}/{j}") for j in range(n)]
            batch_parts = {k: v[None].expand(n, *v.shape) for k, v in parts.items()}  # [n, k, D]
            images = generator.batch([prompt] * n, seeds, parts=batch_parts, k=identity_source.k)
            clip_text = prompt.replace(cfg.trigger, cfg.neutral)
            text_scores = clip.score(images, [clip_text]).tolist()
            for j, (image, seed, ts) in enumerate(zip(images, seeds, text_scores, strict=True)):
                rel = f"images/{face_name}/{pi:03d}-{j}.png"
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                image.save(out / rel)
                try:
                    found = pipeline.process_one(_rgb(image))
                    sim = float((identity.embed(found.crop[None]) * ref).sum())
                except FaceNotFoundError:
                    sim = None
                results.append(ImageResult(face=face_name, prompt_index=pi, prompt=prompt, seed=seed, image=rel,
                                           text_alignment=float(ts), face_similarity=sim, face_found=sim is not None))
            if len(grid_rows) < cfg.grid_rows:
                face_img = Image.fromarray((crop.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())
                grid_rows.append([face_img, *images])
                grid_labels.append(f"{face_name}: {prompt}")
            logger.info("%s | %s: CLIP %.4f, faces found %d/%d", face_name, prompt, sum(text_scores) / n,
                        sum(r.face_found for r in results[-n:]), n)
    rows = summarize(results)
    overall = rows[-1]
    head = {"test faces": len(faces), "prompts": len(prompts), "images per prompt": n,
            "identity": "textual-inversion embedding (the same for every face)" if identity_source.fixed
            else "DreamIdentity encoder", "S* encoding time (mean per face)": f"{sum(encode_ms) / len(encode_ms):.1f} ms",
            "neutral phrase for CLIP": repr(cfg.neutral), **(header or {})}
    (out / "summary.md").write_text("# DreamIdentity evaluation\n\n" + markdown_table(rows, head), encoding="utf-8")
    write_summary_csv(out / "summary.csv", rows)
    write_image_csv(out / "images.csv", results)
    image_grid(grid_rows, grid_labels).save(out / "grid.png")
    logger.info("overall: text-alignment %.4f, face similarity %s, no-face rate %.1f%% (%d images) -> %s",
                overall.text_alignment, "n/a" if overall.face_similarity is None else f"{overall.face_similarity:.4f}",
                overall.no_face_rate * 100, overall.images, out / "summary.md")
    return {"rows": rows, "results": results, "encode_ms": encode_ms}


def _rgb(image: Any) -> Any:
    import numpy as np

    return np.array(image.convert("RGB"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--base-model", type=Path, required=True, help="local diffusers folder or .safetensors")
    p.add_argument("--base-config", type=Path, help="diffusers config folder for a single-file --base-model")
    p.add_argument("--family", choices=("sd1", "sd2", "sdxl"))
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--encoder", type=Path, help="DreamIdentity encoder .safetensors")
    who.add_argument("--embedding", type=Path, help="textual-inversion .safetensors (one fixed identity, a baseline)")
    p.add_argument("--backbone", type=Path, help="arcface_torch backbone, if the encoder file has none")
    p.add_argument("--faces", type=Path, required=True, help="folder of test photos, one identity per photo")
    p.add_argument("--prompts", type=Path, default=EXAMPLE_PROMPTS, help="one prompt per line, each with the trigger")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--face-model", type=Path, required=True,
                   help="arcface_torch ViT .pt/.safetensors or insightface glintr100.onnx / w600k_r50.onnx")
    p.add_argument("--clip-model", type=Path, required=True, help="transformers CLIPModel folder (ViT-B/32 in the "
                                                                  "literature)")
    p.add_argument("--images-per-prompt", type=int, default=4)
    p.add_argument("--steps", type=int, default=30, help="DDIM steps")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trigger", default="S*")
    p.add_argument("--neutral", default="a person", help="replaces the trigger in the text CLIP scores")
    p.add_argument("--scale", type=float, default=1.0, help="S* strength (encoder only)")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--grid-rows", type=int, default=16)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--detector", default="mtcnn", choices=detector_names())
    p.add_argument("--insightface-root", type=Path)
    p.add_argument("--provider", default="auto")
    p.add_argument("--detect-retry", action=argparse.BooleanOptionalAction, default=True,
                   help="retry images without a face at other sizes and padded")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def run(args: argparse.Namespace) -> dict[str, Any]:
    from .generation import DiffusersGenerator, resolve_device, resolve_dtype
    from .metrics import ClipScorer, IdentityScorer
    from .models import load_base_model

    cfg = EvalConfig(out=args.out, images_per_prompt=args.images_per_prompt, seed=args.seed, trigger=args.trigger,
                     neutral=args.neutral, scale=args.scale, grid_rows=args.grid_rows)
    device = resolve_device(args.device)
    prompts = load_prompts(args.prompts, args.trigger)
    identity = IdentityScorer(args.face_model, device=device, provider=args.provider).load()
    clip = ClipScorer(args.clip_model, device=device).load()
    pipeline = FacePipeline(make_detector(args.detector, insightface_root=args.insightface_root,
                                          provider=args.provider, device=str(device)), retry=args.detect_retry)
    faces, skipped = load_test_faces(args.faces, pipeline)
    base = load_base_model(args.base_model, family=args.family, config=args.base_config,
                           dtype=resolve_dtype(args.dtype, device)).to(device)
    if args.encoder is not None:
        source = EncoderIdentity(load_encoder(args.encoder, backbone_path=args.backbone, device=device), base.widths,
                                 args.scale)
        what = str(args.encoder)
    else:
        source = EmbeddingIdentity(args.embedding, base.family, base.widths)
        what = str(args.embedding)
    generator = DiffusersGenerator(base, steps=args.steps, guidance=args.guidance, height=args.height,
                                   width=args.width, negative_prompt=args.negative_prompt, trigger=args.trigger,
                                   device=device)
    header = {"S* from": what, "base model": str(args.base_model), "sampler": f"DDIM {args.steps} steps, CFG "
              f"{args.guidance}", "seed": args.seed, "face model": str(args.face_model),
              "CLIP model": str(args.clip_model)}
    if skipped:
        header["test photos skipped (no face / unreadable)"] = ", ".join(skipped)
    return evaluate(cfg, faces=faces, prompts=prompts, identity_source=source, generator=generator, pipeline=pipeline,
                    identity=identity, clip=clip, header=header)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        run(args)
    except (DreamIDError, FileNotFoundError, ValueError) as exc:
        logger.error("%s", exc, exc_info=args.verbose)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
