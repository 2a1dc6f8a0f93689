"""``python -m training.evaluate``: the command line of :func:`training.evaluate.protocol.evaluate`."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import torch

from dreamid_core import FacePipeline, detector_names, load_encoder, make_detector
from dreamid_core.cli.runner import HelpFormatter, describe, run_main
from dreamid_core.fileio import atomic_write
from dreamid_core.identities.families import UNET_FAMILIES

from . import protocol
from .identity_sources import EmbeddingIdentity, EncoderIdentity, LearnedIdentitySource
from .protocol import EXAMPLE_PROMPTS, EvalConfig, evaluate, load_prompts, load_test_faces

logger = logging.getLogger("training.evaluate")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.evaluate", description=describe(protocol.__doc__),
                                formatter_class=HelpFormatter)
    p.add_argument("--base-model", type=Path, required=True, help="local diffusers folder or .safetensors")
    p.add_argument("--base-config", type=Path, help="diffusers config folder for a single-file --base-model")
    p.add_argument("--family", choices=UNET_FAMILIES, help="base model family (default: read from its files)")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--encoder", type=Path, help="DreamIdentity encoder .safetensors")
    who.add_argument("--identity", type=Path, help="a learned identity of either layout (python -m "
                     "training.learn_identity), one for every face; several methods or one per face: "
                     "python -m training.evaluate_identities")
    who.add_argument("--embedding", type=Path, help="textual-inversion file (one fixed identity, a baseline): this "
                                                    "pack's .safetensors, diffusers learned_embeds (.safetensors/.bin) "
                                                    "or A1111 .pt (read with weights_only=True)")
    p.add_argument("--backbone", type=Path, help="arcface_torch backbone, if the encoder file has none")
    p.add_argument("--faces", type=Path, required=True, help="folder of test photos, one identity per photo")
    p.add_argument("--prompts", type=Path, default=EXAMPLE_PROMPTS, help="one prompt per line, each with the trigger")
    p.add_argument("--out", type=Path, required=True,
                   help="folder for images/, summary.md, summary.csv, images.csv and the grids")
    p.add_argument("--scale", type=float, default=1.0, help="S* strength (encoder only)")
    add_protocol_args(p)
    p.add_argument("--grid-rows", type=int, default=16, help="rows per grid page (grid.png, grid-002.png, ...)")
    p.add_argument("--shard", type=int, default=0, help="this process's shard of the (face, prompt) units")
    p.add_argument("--num-shards", type=int, default=1, help="processes sharing the evaluation (e.g. one per GPU; "
                                                             "the last to finish writes the summary)")
    add_runtime_args(p)
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def add_protocol_args(p: argparse.ArgumentParser) -> None:
    """The paper's protocol settings and the scorers, shared with ``python -m training.evaluate_identities``."""
    p.add_argument("--face-model", type=Path, required=True,
                   help="arcface_torch ViT .pt/.safetensors or insightface glintr100.onnx / w600k_r50.onnx")
    p.add_argument("--clip-model", type=Path, required=True, help="transformers CLIPModel folder (ViT-B/32 in the "
                                                                  "literature)")
    p.add_argument("--images-per-prompt", type=int, default=4, help="images per (face, prompt); the paper: 4")
    p.add_argument("--steps", type=int, default=30, help="DDIM steps")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale; the paper: 7.5")
    p.add_argument("--seed", type=int, default=0, help="each image's seed is derived from this, its face and its prompt")
    p.add_argument("--trigger", default="S*", help="the word that S* replaces in every prompt")
    p.add_argument("--neutral", default="a person", help="replaces the trigger in the text CLIP scores")
    p.add_argument("--negative-prompt", default="", help="negative prompt for every image")
    p.add_argument("--height", type=int, help="image height (default: the base model's native size)")
    p.add_argument("--width", type=int, help="image width (default: the base model's native size)")


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    """Where it runs and which face detector it uses, shared with ``python -m training.evaluate_identities``."""
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--detector", default="mtcnn", choices=detector_names())
    p.add_argument("--insightface-root", type=Path)
    p.add_argument("--provider", default="auto")
    p.add_argument("--detect-retry", action=argparse.BooleanOptionalAction, default=True,
                   help="retry images without a face at other sizes and padded")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ..common.base_model import load_base_model
    from ..common.generation import resolve_device, resolve_dtype
    from ..common.scorers import ClipScorer, IdentityScorer
    from ..learn_identity.sampling import IdentityGenerator

    for flag, path in (("--encoder", args.encoder), ("--identity", getattr(args, "identity", None)),
                       ("--embedding", args.embedding), ("--faces", args.faces)):
        if path is not None and not Path(path).exists():  # before minutes of model loading
            raise FileNotFoundError(f"{flag} {path} does not exist")
    cfg = EvalConfig(out=args.out, images_per_prompt=args.images_per_prompt, seed=args.seed, trigger=args.trigger,
                     neutral=args.neutral, scale=args.scale, grid_rows=args.grid_rows, shard=args.shard,
                     num_shards=args.num_shards)
    device = resolve_device(args.device, shard=args.shard)
    prompts = load_prompts(args.prompts, args.trigger)
    identity = IdentityScorer(args.face_model, device=device, provider=args.provider).load()
    clip = ClipScorer(args.clip_model, device=device).load()
    pipeline = FacePipeline(make_detector(args.detector, insightface_root=args.insightface_root,
                                               provider=args.provider, device=device), retry=args.detect_retry)
    faces, skipped = load_test_faces(args.faces, pipeline)
    base = load_base_model(args.base_model, family=args.family, config=args.base_config,
                           dtype=resolve_dtype(args.dtype, device)).to(device)
    source, what = identity_source(args, base, device)
    generator = IdentityGenerator(base, num_stages=getattr(source, "num_stages", 1),  # per-stage: same processor
                                  stage_kind=getattr(source, "stage_kind", "time"), steps=args.steps,
                                  guidance=args.guidance, height=args.height, width=args.width,
                                  negative_prompt=args.negative_prompt, trigger=args.trigger, device=device)
    header = {**s_star_header(Path(what), out=args.out), "base model": str(args.base_model),
              "sampler": f"DDIM {args.steps} steps, CFG {args.guidance}", "seed": args.seed,
              "face model": str(args.face_model), "CLIP model": str(args.clip_model)}
    if skipped:
        header["test photos skipped (no face / unreadable)"] = ", ".join(skipped)
    return evaluate(cfg, faces=faces, prompts=prompts, identity_source=source, generator=generator, pipeline=pipeline,
                    identity=identity, clip=clip, header=header)


LEGACY_DIGEST = "S* file sha256"  # what evaluations begun before contents were compared recorded


def s_star_header(path: Path, out: Path | None = None) -> dict[str, str]:
    """Where S* comes from and what it is: the digest of the file's contents without its provenance
    (:func:`training.common.safetensors_files.identity_digest`). A changed file at the same path is a new
    evaluation; a re-export of the same checkpoint (same tensors and config) continues the one begun.
    ``out``: an evaluation folder whose settings recorded the file's sha256 (before contents were
    compared) takes the content digest instead when the file is still the one it recorded."""
    from ..common.safetensors_files import file_digest, identity_digest

    header = {"S* from": str(path), "S* content sha256": identity_digest(path)}
    settings = Path(out) / protocol.SETTINGS_FILE if out is not None else None
    try:
        before = json.loads(settings.read_text()) if settings is not None else {}
    except (OSError, ValueError):
        before = {}
    if isinstance(before, dict) and LEGACY_DIGEST in before and before[LEGACY_DIGEST] == file_digest(path):
        del before[LEGACY_DIGEST]
        before["S* content sha256"] = header["S* content sha256"]
        with atomic_write(settings) as tmp:
            tmp.write_text(json.dumps(before, indent=1, sort_keys=True, default=str))
        logger.info("%s: the S* file's sha256 is now recorded as its content digest; the evaluation continues",
                    settings)
    return header


def identity_source(args: argparse.Namespace, base: Any, device: torch.device) -> tuple[Any, str]:
    """The S* provider the command line asks for (see :mod:`training.evaluate.identity_sources`), and its label."""
    if args.encoder is not None:
        encoder = load_encoder(args.encoder, backbone_path=args.backbone, device=device)
        return EncoderIdentity(encoder, base.widths, args.scale), str(args.encoder)
    if getattr(args, "identity", None) is not None:
        return LearnedIdentitySource(args.identity, base.widths), str(args.identity)
    return EmbeddingIdentity(args.embedding, base.family, base.widths), str(args.embedding)


def main(argv: list[str] | None = None) -> int:
    return run_main(run, build_parser().parse_args(argv))

