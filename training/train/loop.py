"""The training loop: one optimisation step top to bottom (:meth:`TrainLoop.step`), then what follows each
step (metrics line, TensorBoard point, checkpoint) in :meth:`TrainLoop.run`. The loss is :mod:`.loss`.

A step of ``gradient_accumulation_steps`` micro-batches per process:

    for each micro-batch:   latents (cached or VAE-encoded) + face crops + prompts
                            noise, timesteps <- step_generator(seed, step, micro, rank)
                            loss = diffusion MSE + reg_weight * ||S*||   (:func:`.loss.diffusion_loss`)
                            backward
    on the last one:        clip the gradient, average the losses over processes, stop on NaN/inf
                            (:func:`.divergence.check_finite`), optimizer step
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..common.base_model import BaseModel
from ..common.diffusion import step_generator
from .checkpoint import CheckpointManager
from .config import ExperimentConfig, RunFlags
from .data import collate
from .divergence import check_finite, describe_samples
from .launch import launch_command
from .loss import diffusion_loss
from .prepare import TrainData
from .resume import save_checkpoint

logger = logging.getLogger("training.train")


@dataclass
class TrainResult:
    step: int
    losses: list[float] = field(default_factory=list)  # mean loss of each step run in this call (skipped: none)
    checkpoint: Path | None = None
    output_dir: Path | None = None
    encoder: Any = None  # the trained IDEncoder (unwrapped), as it is after the last step


@dataclass
class TrainLoop:
    """Everything a step touches. ``encoder`` and ``optimizer`` are as ``accelerator.prepare`` returned them."""

    cfg: ExperimentConfig
    flags: RunFlags
    accelerator: Any  # accelerate.Accelerator
    base: BaseModel  # frozen
    encoder: torch.nn.Module  # the IDEncoder, possibly DDP-wrapped
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    data: TrainData
    manager: CheckpointManager

    def __post_init__(self) -> None:
        acc = self.accelerator
        self.world, self.rank = acc.num_processes, acc.process_index
        self.samples_per_step = self.cfg.batch_size * self.world * self.cfg.gradient_accumulation_steps
        self.split = acc.unwrap_model(self.encoder).split
        self.trainable = [p for p in self.encoder.parameters() if p.requires_grad]
        self.resume_command = f"{launch_command(self.world)} --output-dir {self.manager.run_dir} --resume"

    def batches(self):
        """This process's micro-batches, from the sampler's current position on."""
        loader = torch.utils.data.DataLoader(
            self.data.dataset, batch_sampler=self.data.sampler.micro_batches(
                batch_size=self.cfg.batch_size, num_processes=self.world, rank=self.rank),
            collate_fn=collate, num_workers=self.flags.num_workers,
            pin_memory=self.accelerator.device.type == "cuda")
        return iter(loader)

    def step(self, step: int, batches) -> dict[str, Any]:
        """Optimisation step ``step + 1``: the metrics record it writes."""
        cfg, acc = self.cfg, self.accelerator
        samples: list[dict[str, Any]] = []  # this process's samples of the step, for a divergence message
        sums = torch.zeros(3, device=acc.device)  # loss, mse, reg summed over micro-steps
        for micro in range(cfg.gradient_accumulation_steps):
            batch = next(batches)
            _note_samples(samples, batch)
            with acc.accumulate(self.encoder):
                latents = self.data.latents.latents_for(batch, self.base.vae, acc.device)
                gen = step_generator(cfg.seed, step, micro, self.rank)
                with acc.autocast():
                    parts = diffusion_loss(self.base, self.encoder, self.split, latents,
                                           batch["crop"].to(acc.device), batch["prompt"], generator=gen,
                                           reg_weight=cfg.reg_weight, trigger=cfg.trigger, k=cfg.num_tokens,
                                           noise_offset=cfg.noise_offset)
                acc.backward(parts.loss)
                sums += torch.stack([parts.loss.detach(), parts.mse.detach(), parts.reg.detach()]).float()
                # accelerate syncs on the last of gradient_accumulation_steps micro-batches (the Accelerator is
                # built with that count in run.py), so means and grad_norm are always set when the loop ends
                if acc.sync_gradients:  # the last micro-batch: clip, check, update
                    grad_norm = acc.clip_grad_norm_(self.trainable, cfg.max_grad_norm or float("inf"))
                    means = acc.reduce(sums, "sum") / (self.world * cfg.gradient_accumulation_steps)
                    last = self.manager.latest()
                    check_finite(cfg, step + 1, means, grad_norm, last_checkpoint=str(last.path) if last else None,
                                 samples=samples, rank=self.rank, resume_command=self.resume_command)
                    self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        loss, mse, reg = (float(v) for v in means)
        return {"step": step + 1, "loss": loss, "mse": mse, "reg": reg,
                "lr": self.lr_scheduler.get_last_lr()[0], "grad_norm": float(grad_norm)}

    def skip(self, step: int, batches) -> dict[str, Any]:
        """Step ``step + 1`` named by ``--skip-step``: its samples are drawn and dropped, nothing is updated."""
        samples: list[dict[str, Any]] = []
        for _ in range(self.cfg.gradient_accumulation_steps):
            _note_samples(samples, next(batches))
        logger.warning("step %d skipped (--skip-step): its samples are dropped and nothing is updated: %s",
                       step + 1, describe_samples(samples))
        return {"step": step + 1, "skipped": True}

    def run(self, step: int, stop: int, result: TrainResult) -> None:
        """Steps ``step + 1 .. stop``, each followed by its metrics line, log point and (when due) checkpoint."""
        from tqdm.auto import tqdm

        cfg, flags, acc = self.cfg, self.flags, self.accelerator
        main = acc.is_main_process
        batches = self.batches()
        metrics_file = self.manager.run_dir / "metrics.jsonl"
        bar = tqdm(total=cfg.max_steps, initial=step, disable=not (main and flags.progress), desc="train", unit="step")
        tick, tick_step = time.perf_counter(), step
        while step < stop:
            record = self.skip(step, batches) if step + 1 in flags.skip_steps else self.step(step, batches)
            if "loss" in record:
                result.losses.append(record["loss"])
            self.lr_scheduler.step()
            step += 1
            self.data.sampler.advance(self.samples_per_step)
            result.step = step
            bar.update(1)
            if "loss" in record:
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
            if main:
                with open(metrics_file, "a") as fh:
                    fh.write(json.dumps(record) + "\n")
            if (step % flags.log_every == 0 or step == stop) and "loss" in record:
                now = time.perf_counter()
                rate = (step - tick_step) * self.samples_per_step / max(now - tick, 1e-9)
                tick, tick_step = now, step
                acc.log({**{k: v for k, v in record.items() if k != "step"}, "samples_per_s": rate}, step=step)
                if main:
                    logger.info("step %d/%d loss %.5f (mse %.5f, reg %.3f) lr %.2e %.1f samples/s", step,
                                cfg.max_steps, record["loss"], record["mse"], record["reg"], record["lr"], rate)
            if step % cfg.checkpoint_every == 0 or step == stop:
                result.checkpoint = save_checkpoint(cfg, acc, self.manager, step, self.encoder, self.optimizer,
                                                    self.lr_scheduler, self.data)
        bar.close()
        logger.info("stopped at step %d (max_steps %d); latents encoded %d, reused %d", step, cfg.max_steps,
                    self.data.latents.encoded, self.data.latents.hits)


def _note_samples(samples: list[dict[str, Any]], batch: dict[str, Any]) -> None:
    samples.extend({"position": p, "image": Path(i).name, "prompt": t}
                   for p, i, t in zip(batch["position"], batch["image"], batch["prompt"], strict=True))
