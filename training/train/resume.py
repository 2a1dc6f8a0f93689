"""Continuing a run: what may change between a checkpoint and its resumption, what a checkpoint
saves (beyond the files of :mod:`training.train.checkpoint`) and how a run is put back where it was.

- :data:`RESUMABLE_CHANGES` and :func:`check_resumable`: the experiment must stay the same; run
  mechanics (max_steps, checkpointing, the lr and clipping a divergence asks to change, a batch layout
  with the same global batch) may change;
- :func:`save_checkpoint` / :func:`load_checkpoint`: optimizer, scheduler, sampler, the launch
  (processes, global batch, launcher) and every rank's RNG state;
- :func:`truncate_metrics`: ``metrics.jsonl`` back to the resumed step (and without a torn line).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from dreamid_core.errors import ConfigError

from .checkpoint import Checkpoint, CheckpointManager
from .config import ExperimentConfig
from .divergence import RUN_MECHANICS
from .launch import global_batch, launch_command

logger = logging.getLogger("training.train")

#: config fields that may change between a checkpoint and its resumption (batch_size and
#: gradient_accumulation_steps only while the global batch stays the same, see training.train.launch)
RESUMABLE_CHANGES = ("max_steps", "checkpoint_every", "keep_checkpoints", "extra", "batch_size",
                     "gradient_accumulation_steps", *RUN_MECHANICS)


def check_resumable(saved: ExperimentConfig, cfg: ExperimentConfig, where: Path) -> None:
    diff = {k: v for k, v in saved.differences(cfg).items() if k not in RESUMABLE_CHANGES}
    if diff:
        lines = "; ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise ConfigError(f"cannot resume {where} with a different experiment ({lines}). Resume without --config "
                          f"(uses the checkpoint's), or start a new --output-dir. Only {RESUMABLE_CHANGES} may change.")
    if (saved.backbone_lr is None) != (cfg.backbone_lr is None):
        raise ConfigError(f"cannot resume {where}: backbone_lr {saved.backbone_lr!r} -> {cfg.backbone_lr!r} freezes or "
                          "unfreezes the backbone (another optimizer); only its value may change on resume")
    for name in RUN_MECHANICS:
        if getattr(saved, name) != getattr(cfg, name):
            logger.warning("resuming with %s %r (the checkpoint trained with %r)", name, getattr(cfg, name),
                           getattr(saved, name))
    if saved.max_steps != cfg.max_steps and cfg.lr_schedule != "constant":
        logger.warning("max_steps changed %d -> %d: the %s lr schedule is stretched from here on",
                       saved.max_steps, cfg.max_steps, cfg.lr_schedule)


def provenance(cfg: ExperimentConfig, step: int, sizes: dict[str, int]) -> dict[str, Any]:
    return {"trainer": "training.train", "base_model": cfg.base_model, "step": step,
            "config_hash": cfg.config_hash(), "data_sizes": sizes, "extra": cfg.extra}


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the lines a killed run wrote after the step this run starts from (they are redone), and a
    torn last line (disk full, power loss) or any other unreadable line (logged)."""
    from dreamid_core.fileio import atomic_write

    from ..common.records import read_jsonl

    if path.is_file():
        records = [r for r in read_jsonl(path) if isinstance(r.get("step"), int) and r["step"] <= step]
        with atomic_write(path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in records))


def load_checkpoint(cfg: ExperimentConfig, ckpt: Checkpoint, state: dict[str, Any], encoder, optimizer, lr_scheduler,
                     sampler) -> int:
    from safetensors.torch import load_file

    from dreamid_core import read_encoder_config

    saved_config, _, _ = read_encoder_config(ckpt.encoder_path)
    if saved_config != encoder.config:
        raise ConfigError(f"{ckpt.encoder_path} was trained as {saved_config}, but this run builds {encoder.config}")
    tensors = load_file(str(ckpt.encoder_path))
    missing, unexpected = encoder.load_state_dict(tensors, strict=False)
    if unexpected or [m for m in missing if not m.startswith("backbone.")]:
        raise ConfigError(f"{ckpt.encoder_path}: tensors do not fit the encoder (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]})")
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    base_lrs = [cfg.lr] + ([cfg.backbone_lr] if cfg.backbone_lr is not None else [])
    if list(lr_scheduler.base_lrs) != base_lrs:  # a changed lr on resume (after a divergence) takes effect now
        lr_scheduler.base_lrs = base_lrs
        for group, base_lr, factor in zip(optimizer.param_groups, base_lrs, lr_scheduler.lr_lambdas, strict=True):
            group["initial_lr"] = base_lr
            group["lr"] = base_lr * factor(lr_scheduler.last_epoch)
        lr_scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]  # what get_last_lr() reports
    sampler.load_state_dict(state["sampler"])
    return int(state["step"])


def save_checkpoint(cfg, accelerator, manager: CheckpointManager, step: int, encoder, optimizer, lr_scheduler,
                    data) -> Path:
    """Every rank adds its RNG state; the main process writes the rest and commits."""
    main = accelerator.is_main_process
    accelerator.wait_for_everyone()
    if main:
        manager.begin(step)
    accelerator.wait_for_everyone()
    manager.write_rng(step, accelerator.process_index)
    accelerator.wait_for_everyone()
    if main:
        state = {"step": step, "optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
                 "sampler": data.sampler.state_dict(), "num_processes": accelerator.num_processes,
                 "global_batch": global_batch(accelerator.num_processes, cfg.batch_size,
                                              cfg.gradient_accumulation_steps),
                 "launch": launch_command(accelerator.num_processes)}
        if accelerator.scaler is not None:
            state["grad_scaler"] = accelerator.scaler.state_dict()
        manager.commit(step, encoder=accelerator.unwrap_model(encoder), config=cfg, training_state=state,
                       provenance=provenance(cfg, step, data.sampler.sizes),
                       include_backbone=cfg.checkpoint_backbone)
        manager.prune(cfg.keep_checkpoints)
    accelerator.wait_for_everyone()
    return manager.final_dir(step)
