"""Train the DreamIdentity ID encoder: ``python -m training.train --config cfg.json --output-dir runs/x``.

Single process on CPU, or ``accelerate launch -m training.train ...`` on GPUs/nodes. The UNet, VAE
and text encoder(s) are frozen; the encoder's MLPs and feature norms train (the face backbone
too, in its own parameter group, when ``backbone_lr`` is set).

Resuming (``--resume``) continues from the newest complete checkpoint and reproduces the
uninterrupted run bit for bit on CPU: the data order is a function of (seed, sample position)
(:mod:`training.sampler`), each micro-step's noise and timesteps come from a generator seeded by
(seed, step, micro-step, rank) (:func:`training.step.step_generator`), cached latents depend only
on their image (:mod:`training.latents`), and optimizer, scheduler and RNG states are restored.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import random
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dreamid_core.cli_runner import run_main

from .checkpoint import CONFIG_FILE, CheckpointManager, restore_rng
from .config import ConfigError, ExperimentConfig
from .divergence import TrainingDivergedError, check_finite, describe_samples
from .launch import check_global_batch, check_launch, global_batch, launch_command
from .locking import RunLock
from .resume import check_resumable, load_checkpoint, save_checkpoint, truncate_metrics
from .setup import align_faces, build_data, build_encoder, build_optimizer, load_base, weight_dtype_for
from .step import diffusion_loss, step_generator

logger = logging.getLogger("training.train")

__all__ = ["RunFlags", "TrainResult", "TrainingDivergedError", "train", "main"]


@dataclass
class RunFlags:
    """How to run (not what to compute): paths, resumption, logging, loader workers."""

    output_dir: str
    resume: bool = False
    max_steps: int | None = None  # overrides the config's max_steps (the schedule's horizon)
    stop_after_step: int | None = None  # stop (after a checkpoint) at this step; the schedule is unchanged
    cache_dir: str | None = None  # face crops and latents; default <output_dir>/cache
    log_every: int = 10
    num_workers: int = 2
    report_to: str = "tensorboard"  # "tensorboard" | "none"
    channels_last: bool = False
    compile_unet: bool = False  # torch.compile the UNet (GPU; results no longer bit-identical to eager)
    progress: bool = True
    # collectives wait this long for the slowest rank (NCCL's default, 10 min, is shorter than aligning a
    # big recon folder's shard or a slow checkpoint write on a network disk)
    process_group_timeout_min: float = 180.0
    skip_steps: tuple[int, ...] = ()  # these steps draw their samples and drop them (after a divergence)
    allow_batch_change: bool = False  # resume even though the global batch differs from the checkpoint's


@dataclass
class TrainResult:
    step: int
    losses: list[float] = field(default_factory=list)  # mean loss of each step run in this call (skipped: none)
    checkpoint: Path | None = None
    output_dir: Path | None = None
    encoder: Any = None  # the trained IDEncoder (unwrapped), as it is after the last step


# -- learning-rate schedule ---------------------------------------------------------------------------

def lr_factor(step: int, *, schedule: str, warmup: int, total: int) -> float:
    factor = min(1.0, (step + 1) / warmup) if warmup else 1.0
    progress = min(1.0, max(0, step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        factor *= 0.5 * (1.0 + math.cos(math.pi * progress))
    elif schedule == "linear":
        factor *= 1.0 - progress
    return factor


def build_lr_scheduler(cfg: ExperimentConfig, optimizer: torch.optim.Optimizer):
    fn = partial(lr_factor, schedule=cfg.lr_schedule, warmup=cfg.lr_warmup_steps, total=cfg.max_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


# -- helpers ------------------------------------------------------------------------------------------

def _accelerate():
    try:
        import accelerate
    except ImportError as exc:
        from dreamid_core import MissingDependencyError

        raise MissingDependencyError(f"training needs accelerate ({exc}): pip install -e '.[train]'") from exc
    return accelerate


def process_group_kwargs(flags: RunFlags):
    """The explicit process-group timeout (accelerate passes it to torch.distributed.init_process_group)."""
    from datetime import timedelta

    from accelerate.utils import InitProcessGroupKwargs

    return InitProcessGroupKwargs(timeout=timedelta(minutes=flags.process_group_timeout_min))


def _tb_hparams(cfg: ExperimentConfig) -> dict[str, Any]:
    return {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v) for k, v in cfg.to_dict().items()}


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# -- the run ------------------------------------------------------------------------------------------

def train(cfg: ExperimentConfig, flags: RunFlags) -> TrainResult:
    """Run (or resume) training; returns the steps done and where the last checkpoint is."""
    accelerate = _accelerate()
    from accelerate.utils import ProjectConfiguration

    if flags.max_steps is not None:
        cfg = cfg.replace(max_steps=flags.max_steps)
    cfg.check_data()
    cfg = cfg.resolved()  # resolution null -> the family's native size, before comparing with a checkpoint
    out = Path(flags.output_dir)
    accelerator = accelerate.Accelerator(
        kwargs_handlers=[process_group_kwargs(flags)],
        mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with="tensorboard" if flags.report_to == "tensorboard" else None,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")))
    check_launch(accelerator.num_processes)  # several launched processes that accelerate sees as one each
    main = accelerator.is_main_process
    lock = RunLock(out) if main else contextlib.nullcontext()
    with lock:  # one trainer per run folder (the main process holds the lock for the whole run)
        return _train(cfg, flags, accelerator, out)


def _train(cfg: ExperimentConfig, flags: RunFlags, accelerator, out: Path) -> TrainResult:
    main = accelerator.is_main_process
    manager = CheckpointManager(out)
    if main:
        manager.cleanup()
    accelerator.wait_for_everyone()

    resume_from = manager.latest()
    if resume_from is not None and not flags.resume:
        raise FileExistsError(f"{out} already holds {resume_from.path.name}: pass --resume to continue that run, "
                              "or choose a new --output-dir")
    if flags.resume and resume_from is None:
        logger.warning("--resume given but %s holds no complete checkpoint; starting from step 0", out)
    world = accelerator.num_processes
    now_batch = {"num_processes": world, "batch_size": cfg.batch_size,
                 "gradient_accumulation_steps": cfg.gradient_accumulation_steps}
    saved_state = None
    if resume_from is not None:
        saved_cfg = ExperimentConfig.from_json(resume_from.config_json(), str(resume_from.path / CONFIG_FILE))
        check_resumable(saved_cfg, cfg, resume_from.path)
        saved_state = resume_from.training_state()
        saved_batch = {"num_processes": int(saved_state.get("num_processes", 1)), "batch_size": saved_cfg.batch_size,
                       "gradient_accumulation_steps": saved_cfg.gradient_accumulation_steps}
        note = check_global_batch(saved=saved_batch, now=now_batch, run_dir=str(out), allow=flags.allow_batch_change,
                                  launcher=saved_state.get("launch"))
        if note:
            logger.warning("%s", note)
    if main:
        cfg.save(out / CONFIG_FILE)
        logger.info("global batch %d = %d process(es) x batch_size %d x gradient_accumulation_steps %d; resume "
                    "with `%s --output-dir %s --resume`", global_batch(**now_batch), world, cfg.batch_size,
                    cfg.gradient_accumulation_steps, launch_command(world), out)

    _seed_everything(cfg.seed)
    device = accelerator.device
    base = load_base(cfg, device, weight_dtype_for(cfg.mixed_precision), channels_last=flags.channels_last)
    if flags.compile_unet:
        base.unet = torch.compile(base.unet)
    encoder = build_encoder(cfg, base).to(device)
    cache_dir = Path(flags.cache_dir) if flags.cache_dir else out / "cache"
    crop_size = encoder.config.backbone.image_size
    # every rank aligns its shard of the recon folder (a resumable step of its own), then all read every shard
    align_faces(cfg, cache_dir=cache_dir, crop_size=crop_size, shard=accelerator.process_index, num_shards=world,
                device=device, progress=main and flags.progress)
    accelerator.wait_for_everyone()
    data = build_data(cfg, base, cache_dir=cache_dir, report_path=out / "data_report.json" if main else None,
                      crop_size=crop_size, device=device, align_faces=False)
    if flags.stop_after_step == 0:
        logger.info("--stop-after-step 0: data prepared (faces aligned, %s written); no training step run",
                    out / "data_report.json")
        return TrainResult(step=0, checkpoint=resume_from.path if resume_from else None, output_dir=out)
    optimizer = build_optimizer(cfg, encoder)
    lr_scheduler = build_lr_scheduler(cfg, optimizer)
    step = 0
    if resume_from is not None:
        step = load_checkpoint(cfg, resume_from, saved_state, encoder, optimizer, lr_scheduler, data.sampler)
    encoder, optimizer = accelerator.prepare(encoder, optimizer)
    if resume_from is not None:
        rng = resume_from.rng_state(accelerator.process_index)
        if rng is not None:
            restore_rng(rng)
        logger.info("resumed from %s at step %d (sample %d)", resume_from.path, step, data.sampler.position)
    if main:
        truncate_metrics(out / "metrics.jsonl", step)
    if flags.report_to == "tensorboard":
        accelerator.init_trackers("dreamid", config=_tb_hparams(cfg))

    stop = cfg.max_steps if flags.stop_after_step is None else min(cfg.max_steps, flags.stop_after_step)
    result = TrainResult(step=step, checkpoint=resume_from.path if resume_from else None, output_dir=out)
    try:
        _loop(cfg, flags, accelerator, base, encoder, optimizer, lr_scheduler, data, manager, step, stop, result)
    finally:
        accelerator.end_training()
    result.encoder = accelerator.unwrap_model(encoder)
    return result


def _loop(cfg, flags, accelerator, base, encoder, optimizer, lr_scheduler, data, manager, step, stop, result):
    from tqdm.auto import tqdm

    from .data import collate

    main = accelerator.is_main_process
    world, rank = accelerator.num_processes, accelerator.process_index
    samples_per_step = cfg.batch_size * world * cfg.gradient_accumulation_steps
    loader = torch.utils.data.DataLoader(
        data.dataset, batch_sampler=data.sampler.micro_batches(batch_size=cfg.batch_size, num_processes=world,
                                                               rank=rank),
        collate_fn=collate, num_workers=flags.num_workers, pin_memory=accelerator.device.type == "cuda")
    batches = iter(loader)
    split = accelerator.unwrap_model(encoder).split
    trainable = [p for p in encoder.parameters() if p.requires_grad]
    metrics_file = manager.run_dir / "metrics.jsonl"
    resume_command = f"{launch_command(world)} --output-dir {manager.run_dir} --resume"
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not (main and flags.progress), desc="train", unit="step")
    tick, tick_step = time.perf_counter(), step
    while step < stop:
        samples: list[dict[str, Any]] = []  # this process's samples of the step, for a divergence message
        record: dict[str, Any]
        if step + 1 in flags.skip_steps:
            for _ in range(cfg.gradient_accumulation_steps):
                _note_samples(samples, next(batches))
            record = {"step": step + 1, "skipped": True}
            logger.warning("step %d skipped (--skip-step): its samples are dropped and nothing is updated: %s",
                           step + 1, describe_samples(samples))
        else:
            sums = torch.zeros(3, device=accelerator.device)  # loss, mse, reg summed over micro-steps
            for micro in range(cfg.gradient_accumulation_steps):
                batch = next(batches)
                _note_samples(samples, batch)
                with accelerator.accumulate(encoder):
                    latents = data.latents.latents_for(batch, base.vae, accelerator.device)
                    gen = step_generator(cfg.seed, step, micro, rank)
                    with accelerator.autocast():
                        parts = diffusion_loss(base, encoder, split, latents, batch["crop"].to(accelerator.device),
                                               batch["prompt"], generator=gen, reg_weight=cfg.reg_weight,
                                               trigger=cfg.trigger, k=cfg.num_tokens, noise_offset=cfg.noise_offset)
                    accelerator.backward(parts.loss)
                    sums += torch.stack([parts.loss.detach(), parts.mse.detach(), parts.reg.detach()]).float()
                    if accelerator.sync_gradients:
                        grad_norm = accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm or float("inf"))
                        means = accelerator.reduce(sums, "sum") / (world * cfg.gradient_accumulation_steps)
                        last = manager.latest()
                        check_finite(cfg, step + 1, means, grad_norm, last_checkpoint=str(last.path) if last else None,
                                     samples=samples, rank=rank, resume_command=resume_command)
                        optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            loss, mse, reg = (float(v) for v in means)
            record = {"step": step + 1, "loss": loss, "mse": mse, "reg": reg,
                      "lr": lr_scheduler.get_last_lr()[0], "grad_norm": float(grad_norm)}
            result.losses.append(loss)
        lr_scheduler.step()
        step += 1
        data.sampler.advance(samples_per_step)
        result.step = step
        bar.update(1)
        if "loss" in record:
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
        if main:
            with open(metrics_file, "a") as fh:
                fh.write(json.dumps(record) + "\n")
        if (step % flags.log_every == 0 or step == stop) and "loss" in record:
            now = time.perf_counter()
            rate = (step - tick_step) * samples_per_step / max(now - tick, 1e-9)
            tick, tick_step = now, step
            accelerator.log({**{k: v for k, v in record.items() if k != "step"}, "samples_per_s": rate}, step=step)
            if main:
                logger.info("step %d/%d loss %.5f (mse %.5f, reg %.3f) lr %.2e %.1f samples/s", step, cfg.max_steps,
                            record["loss"], record["mse"], record["reg"], record["lr"], rate)
        if step % cfg.checkpoint_every == 0 or step == stop:
            result.checkpoint = save_checkpoint(cfg, accelerator, manager, step, encoder, optimizer, lr_scheduler,
                                                data)
    bar.close()
    logger.info("stopped at step %d (max_steps %d); latents encoded %d, reused %d", step, cfg.max_steps,
                data.latents.encoded, data.latents.hits)


def _note_samples(samples: list[dict[str, Any]], batch: dict[str, Any]) -> None:
    samples.extend({"position": p, "image": Path(i).name, "prompt": t}
                   for p, i, t in zip(batch["position"], batch["image"], batch["prompt"], strict=True))


# -- command line ---------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="experiment config JSON (ExperimentConfig); with --resume, default: the "
                                    "checkpoint's own")
    p.add_argument("--output-dir", required=True, help="run folder: checkpoints, logs, data report")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    p.add_argument("--max-steps", type=int, help="override the config's max_steps")
    p.add_argument("--skip-step", type=int, action="append", default=[], metavar="N",
                   help="draw step N's samples and drop them without an update (after a divergence at step N); "
                        "repeatable")
    p.add_argument("--allow-batch-change", action="store_true",
                   help="resume although processes x batch_size x gradient_accumulation_steps differs from the "
                        "checkpoint's (changes the recipe; refused otherwise)")
    p.add_argument("--stop-after-step", type=int, help="checkpoint and stop at this step (schedule unchanged); 0: "
                                                       "prepare only (align the recon faces, write the data report)")
    p.add_argument("--process-group-timeout", type=float, default=180.0, metavar="MINUTES",
                   help="how long collectives wait for the slowest rank (NCCL's own default is 10 min)")
    p.add_argument("--cache-dir", help="face crops and latents cache (default: OUTPUT_DIR/cache)")
    p.add_argument("--log-every", type=int, default=10, help="steps between log lines and TensorBoard points")
    p.add_argument("--num-workers", type=int, default=2, help="data loader worker processes")
    p.add_argument("--report-to", choices=("tensorboard", "none"), default="tensorboard")
    p.add_argument("--channels-last", action="store_true", help="UNet in channels_last memory format")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (GPU; minutes to compile)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--log-level", default="INFO")
    return p


def _run(args: argparse.Namespace) -> None:
    if args.config:
        cfg = ExperimentConfig.load(args.config)
    elif args.resume and (latest := CheckpointManager(args.output_dir).latest()) is not None:
        cfg = ExperimentConfig.from_json(latest.config_json(), str(latest.path / CONFIG_FILE))
    else:
        raise ConfigError("--config is required (only --resume of an existing run can do without it)")
    flags = RunFlags(output_dir=args.output_dir, resume=args.resume, max_steps=args.max_steps,
                     stop_after_step=args.stop_after_step, cache_dir=args.cache_dir, log_every=args.log_every,
                     num_workers=args.num_workers, report_to=args.report_to, channels_last=args.channels_last,
                     compile_unet=args.compile, progress=not args.no_progress,
                     allow_batch_change=args.allow_batch_change, skip_steps=tuple(args.skip_step),
                     process_group_timeout_min=args.process_group_timeout)
    result = train(cfg, flags)
    logger.info("done: step %d, checkpoint %s", result.step, result.checkpoint)


def main(argv: list[str] | None = None) -> int:
    return run_main(_run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
