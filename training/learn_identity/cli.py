"""``python -m training.learn_identity``: learn one identity from a few photos on a local SD model.

    python -m training.learn_identity --base-model models/sd21-base --photos me/ --out me.safetensors
    # E4T-style: start from the encoder's S*, then tune a few steps
    python -m training.learn_identity ... --encoder dreamid_sd21.safetensors --steps 50
    # the seed paper's textual-inversion baseline: word init, no attention loss
    python -m training.learn_identity ... --init-word person --attn-weight 0
    # per-stage key/value pairs (Beyond Inserting), 5 denoising-time stages
    python -m training.learn_identity ... --layout per_stage --num-stages 5

The file is written by :func:`dreamid_core.identities.learned_identity.save_learned_identity`: a ``words``
identity is a standard textual-inversion ``.safetensors`` (``embedding:NAME`` in ComfyUI), a
``per_stage`` one holds ``[S, 2, k, D]`` per text encoder; both carry their config as metadata.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from dreamid_core import ConfigError, FacePipeline, detector_names, make_detector
from dreamid_core.cli.runner import HelpFormatter, describe, run_main
from dreamid_core.fileio import safetensors_target
from dreamid_core.identities.families import UNET_FAMILIES
from dreamid_core.identities.learned_identity import LAYOUTS, NORMS, STAGE_KINDS, IdentityConfig, save_learned_identity
from dreamid_core.learning import IdentityLearner, LearnResult, RunOptions, check_settings

from .data import detect_faces, encode_photos, photo_paths
from .host import DiffusersHost
from .init import from_encoder, from_file, from_word

logger = logging.getLogger("training.learn_identity")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.learn_identity", description=describe(__doc__),
                                formatter_class=HelpFormatter)
    p.add_argument("--base-model", type=Path, required=True, help="local diffusers folder or .safetensors")
    p.add_argument("--base-config", type=Path, help="diffusers config folder for a single-file --base-model")
    p.add_argument("--family", choices=UNET_FAMILIES, help="base model family (default: read from its files)")
    p.add_argument("--photos", nargs="+", required=True, help="photos (or folders of photos) of ONE person")
    p.add_argument("--out", type=Path, required=True, help="the identity .safetensors to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--layout", choices=LAYOUTS, default="words",
                   help="words: k token vectors (a textual-inversion file); per_stage: K/V tokens per stage "
                        "(Beyond Inserting)")
    p.add_argument("--num-tokens", type=int, help="k identity tokens (default: the encoder's k, else 2)")
    p.add_argument("--num-stages", type=int, default=5, help="per_stage: stages (key/value pairs)")
    p.add_argument("--stage-kind", choices=STAGE_KINDS, default="time", help="per_stage: denoising-time or UNet-block")
    init = p.add_mutually_exclusive_group()
    init.add_argument("--encoder", type=Path, help="start from this DreamIdentity encoder's S* (E4T-style)")
    init.add_argument("--init-file", type=Path, help="start from an identity or textual-inversion file")
    init.add_argument("--init-word", default="person", help="start from this word's embedding")
    p.add_argument("--backbone", type=Path, help="arcface_torch backbone, if the encoder file has none")
    p.add_argument("--norm", choices=NORMS, default="vocabulary",
                   help="vocabulary: keep each vector at the median norm of the word embeddings and learn its direction "
                        "(Directional Textual Inversion: keeps prompt following); free: plain textual inversion")
    p.add_argument("--class-word", default="person", help="the reference prompt's word for the attention loss")
    p.add_argument("--trigger", default="S*", help="the word that S* replaces in every prompt")
    p.add_argument("--steps", type=int, default=400, help="optimisation steps (a few hundred learn an identity)")
    p.add_argument("--lr", type=float, default=5e-3, help="learning rate of the identity's vectors")
    p.add_argument("--attn-weight", type=float, default=0.003, help="face-wise attention loss (0 = plain TI)")
    p.add_argument("--seed", type=int, default=0, help="seeds the augmentation, prompts, timesteps and noise: the same "
                                                        "seed gives the same identity")
    p.add_argument("--resolution", type=int, help="training size in px (default: the base model's own: its UNet's "
                                                  "sample size x the VAE factor, e.g. 512 SD1.5, 768 SD2.x-768, "
                                                  "1024 SDXL)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True, help="flip and scale/crop jitter")
    p.add_argument("--scale-jitter", type=float, default=0.1)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", default="auto", help="frozen model dtype: auto (bf16 on a GPU), float32, float16, bfloat16")
    p.add_argument("--detector", default="mtcnn", choices=detector_names())
    p.add_argument("--insightface-root", type=Path)
    p.add_argument("--provider", default="auto")
    p.add_argument("--loss-csv", type=Path, help="write step, loss, mse, attention per step here")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _dtype(name: str, device: torch.device) -> torch.dtype:
    from ..common.generation import resolve_dtype

    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return resolve_dtype(name, device)


def load_base(args: argparse.Namespace, device: torch.device) -> Any:
    from ..common.base_model import load_base_model

    dtype = _dtype(args.dtype, device)
    base = load_base_model(args.base_model, family=args.family, config=args.base_config)
    for module in [base.unet, *base.text_encoders]:
        module.to(device=device, dtype=dtype)
    base.vae.to(device=device, dtype=torch.float32)  # runs once per photo; SD's VAE is unstable in fp16
    return base


def run(args: argparse.Namespace) -> LearnResult:
    from ..common.generation import resolve_device

    device = resolve_device(args.device)
    out = safetensors_target(args.out, overwrite=args.overwrite)  # refused before anything is loaded
    opts = RunOptions(batch_size=args.batch_size, augment=args.augment, scale_jitter=args.scale_jitter,
                      gradient_checkpointing=args.gradient_checkpointing)
    probe = IdentityConfig(layout=args.layout, num_tokens=args.num_tokens or 2, num_stages=args.num_stages,
                           stage_kind=args.stage_kind, steps=args.steps, lr=args.lr, attn_weight=args.attn_weight,
                           resolution=args.resolution or 512)
    check_settings(probe, opts)  # before loading anything (the model's own resolution rule comes after)
    pipeline = FacePipeline(make_detector(args.detector, insightface_root=args.insightface_root,
                                          provider=args.provider, device=str(device)))
    photos, faces = detect_faces(photo_paths(args.photos), pipeline)
    base = load_base(args, device)
    resolution = args.resolution or native_resolution(base)
    host = DiffusersHost(base, device=device, num_stages=args.num_stages, stage_kind=args.stage_kind,
                         gradient_checkpointing=args.gradient_checkpointing)
    try:
        widths = base.widths
        if args.encoder is not None:
            start = from_encoder(args.encoder, photos, pipeline, widths, backbone=args.backbone, device=device)
            init = "encoder"
        elif args.init_file is not None:
            start, init = from_file(args.init_file, widths), f"file:{args.init_file.name}"
        else:
            start, init = from_word(host, args.init_word, args.num_tokens or 2), f"word:{args.init_word}"
        k = next(iter(start.values())).shape[-2]
        if args.num_tokens is not None and args.num_tokens != k:
            raise ConfigError(f"--num-tokens {args.num_tokens} but the init ({init}) holds {k} token(s); drop "
                              "--num-tokens or match it")
        cfg = IdentityConfig(layout=args.layout, num_tokens=k, num_stages=args.num_stages, stage_kind=args.stage_kind,
                             target=base.family, init=init, class_word=args.class_word, steps=args.steps, lr=args.lr,
                             attn_weight=args.attn_weight, seed=args.seed, resolution=resolution,
                             base_model=Path(args.base_model).name, norm=args.norm)
        latents = encode_photos(photos, faces, base.vae, resolution=resolution, device=device)
        base.vae.to("cpu")  # not needed again: free the device memory
        learner = IdentityLearner(host, latents, cfg, start, opts)
        with _progress(args.log_every, cfg.steps) as on_step:
            result = learner.run(on_step=on_step)
    finally:
        host.close()
    save_learned_identity(out, result.identity, overwrite=args.overwrite)
    if args.loss_csv is not None:
        args.loss_csv.parent.mkdir(parents=True, exist_ok=True)
        with open(args.loss_csv, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["step", "loss", "diffusion", "attention"])
            for i, s in enumerate(result.history):
                w.writerow([i, f"{s.loss:.6f}", f"{s.diffusion:.6f}", f"{s.attention:.6f}"])
    logger.info("learned a %s identity (k=%d, %s init) in %d steps, %.1f s -> %s", cfg.layout, k, init, cfg.steps,
                result.seconds, out)
    return result


def native_resolution(base) -> int:
    """The base model's own training size: its UNet's sample size times the VAE's factor."""
    from ..common.diffusion import base_vae_factor

    return int(base.unet.config.sample_size) * base_vae_factor(base)


@contextlib.contextmanager
def _progress(every: int, total: int):
    """A progress bar on a terminal (tqdm), and a log line every ``every`` steps."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - diffusers depends on tqdm
        tqdm = None
    bar = tqdm(total=total, unit="step", disable=not sys.stderr.isatty()) if tqdm is not None else None

    def on_step(i: int, stats) -> None:
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{stats.loss:.4f}")
        if every and ((i + 1) % every == 0 or i + 1 == total):
            logger.info("step %d/%d: loss %.5f (diffusion %.5f, attention %.4f)", i + 1, total, stats.loss,
                        stats.diffusion, stats.attention)

    try:
        yield on_step
    finally:
        if bar is not None:
            bar.close()


def main(argv: list[str] | None = None) -> int:
    """Exit 0 done, 2 a mistake the user can fix (message on one line), 1 a bug (dreamid_core.cli.runner)."""
    return run_main(run, build_parser().parse_args(argv))
