"""What happens when training diverges: the check, the message, and what a resume may change.

The check runs on the reduced loss and the gradient norm before the update, so a non-finite step is
never applied. The message names the step, the last good checkpoint and the samples of the step
(on this process; every rank raises with its own), and the three ways out, each allowed on
``--resume``: a lower ``lr`` (or ``backbone_lr``), a ``max_grad_norm`` (these run-mechanics fields may
differ from the checkpoint's config), or ``--skip-step N`` (the step's samples are drawn and
dropped, nothing is updated, the schedule moves on).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from dreamid_core import DreamIDError

#: config fields a resume may change after a divergence (they change how, not what, is trained)
RUN_MECHANICS = ("lr", "backbone_lr", "max_grad_norm")


class TrainingDivergedError(DreamIDError, RuntimeError):
    """The loss or the gradients became NaN or infinite."""


def describe_samples(samples: Sequence[dict[str, Any]], limit: int = 8) -> str:
    """``[{"position", "image", "prompt"}, ...]`` -> one line per sample (the first ``limit``)."""
    lines = [f"#{s['position']} {s['image']} ({s['prompt']!r})" for s in samples[:limit]]
    if len(samples) > limit:
        lines.append(f"... and {len(samples) - limit} more")
    return "; ".join(lines)


def check_finite(cfg, step: int, means: torch.Tensor, grad_norm: torch.Tensor, *, last_checkpoint: str | None,
                 samples: Sequence[dict[str, Any]], rank: int, resume_command: str) -> None:
    """Raise :class:`TrainingDivergedError` when the step's mean loss parts or (except fp16, whose
    scaler skips such steps itself) the gradient norm are not finite."""
    bad_loss = not bool(torch.isfinite(means).all())
    bad_grad = not bool(torch.isfinite(grad_norm)) and cfg.mixed_precision != "fp16"
    if not (bad_loss or bad_grad):
        return
    where = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written yet"
    what = f"loss {means[0].item()} (mse {means[1].item()}, reg {means[2].item()})" if bad_loss else \
        f"gradient norm {grad_norm.item()} (loss {means[0].item()})"
    raise TrainingDivergedError(
        f"training diverged at step {step}: {what} is not finite; the update was not applied and {where}. "
        f"The step's samples on rank {rank}: {describe_samples(samples)}. Ways out, each accepted by --resume: "
        f"a lower lr (now {cfg.lr}) or max_grad_norm (now {cfg.max_grad_norm}) in a --config "
        f"(`{resume_command} --config NEW.json`); or drop this batch: `{resume_command} --skip-step {step}`. "
        "Prefer mixed_precision 'bf16' to 'fp16', and check the data report and those images.")
