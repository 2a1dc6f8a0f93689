"""Train the DreamIdentity ID encoder: ``python -m training.train --config cfg.json --output-dir runs/x``.

This file sets a run up (accelerator, run-folder lock, resume checks, base model, encoder, data) and hands
it to :class:`training.train.loop.TrainLoop`; the loss is :mod:`training.train.loss`.

Single process on CPU, or ``accelerate launch -m training.train ...`` on GPUs/nodes. The UNet, VAE
and text encoder(s) are frozen; the encoder's MLPs and feature norms train (the face backbone
too, in its own parameter group, when ``backbone_lr`` is set).

Resuming (``--resume``) continues from the newest complete checkpoint and reproduces the
uninterrupted run bit for bit on CPU: the data order is a function of (seed, sample position)
(:mod:`training.train.sampler`), each micro-step's noise and timesteps come from a generator seeded by
(seed, step, micro-step, rank) (:func:`training.common.diffusion.step_generator`), cached latents depend only
on their image (:mod:`training.common.latents`), and optimizer, scheduler and RNG states are restored.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..common.locking import RunLock
from .checkpoint import CONFIG_FILE, CheckpointManager, restore_rng
from .config import ExperimentConfig, RunFlags
from .launch import check_global_batch, check_launch, global_batch, launch_command, processes
from .loop import TrainLoop, TrainResult
from .prepare import align_faces, build_data, build_encoder, build_lr_scheduler, build_optimizer, load_base, weight_dtype_for
from .resume import check_resumable, load_checkpoint, truncate_metrics

logger = logging.getLogger("training.train")

__all__ = ["train"]


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
        logger.info("global batch %d = %s x batch_size %d x gradient_accumulation_steps %d; resume "
                    "with `%s --output-dir %s --resume`", global_batch(**now_batch), processes(world), cfg.batch_size,
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
        TrainLoop(cfg, flags, accelerator, base, encoder, optimizer, lr_scheduler, data, manager).run(step, stop, result)
    finally:
        accelerator.end_training()
    result.encoder = accelerator.unwrap_model(encoder)
    return result
