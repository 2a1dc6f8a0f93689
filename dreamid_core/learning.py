"""The pure maths of one identity-learning step, shared by the ComfyUI and diffusers adapters.

API
- ``LEARN_PROMPTS``: the training prompt templates (``"{}"`` = where the identity / class word goes).
- ``noise_prediction_loss(x_t, denoised, noise, sigma) -> scalar``: the diffusion loss through the
  model's own parameterisation: the noise implied by its denoised output, ``(x_t - D(x_t)) / sigma``,
  against the true noise (MSE). For an eps model with ``x_t = x_0 + sigma * noise`` this is exactly the
  usual eps-MSE of textual inversion.
- ``sample_timesteps(generator, n, num_timesteps=1000) -> LongTensor [n]``: uniform training timesteps.
- ``tile_tokens(vectors [m, D], k) -> [k, D]``: an init from a word of m tokens: its rows in order,
  repeated cyclically to k (``"person"`` -> k copies of its one embedding), float32 copies.
- ``context_pairs(id_positions, class_positions, end, ref_end, start=1) -> [(p, q)]``: the other
  tokens of a prompt and its reference (identity replaced by the class word), matched by word: the
  positions ``start..end`` of the prompt outside the identity rows, paired with the same word in the
  reference (shifted by ``len(class) - len(id)`` after the identity). One occurrence each.
- ``check_learn_settings(steps=, lr=, attn_weight=, batch=, resolution=)``: raises
  ``LearnSettingsError`` naming the value and the fix (steps 0, NaN lr, ...).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .errors import DreamIDError

LEARN_PROMPTS = ("a photo of {}", "a close-up photo of {}", "a portrait photo of {}", "a photo of the face of {}")


class LearnSettingsError(DreamIDError, ValueError):
    """A learning setting that cannot work (no steps, a learning rate that is not a positive number...)."""


def noise_prediction_loss(x_t: torch.Tensor, denoised: torch.Tensor, noise: torch.Tensor,
                          sigma: torch.Tensor) -> torch.Tensor:
    """MSE between the noise the model's output implies and the true noise (see the module docstring)."""
    s = sigma.float().reshape(-1, *([1] * (x_t.ndim - 1)))  # [B, 1, 1, 1]
    eps = (x_t.float() - denoised.float()) / s
    return torch.mean((eps - noise.float()) ** 2)


def sample_timesteps(generator: torch.Generator, n: int, num_timesteps: int = 1000) -> torch.Tensor:
    return torch.randint(0, num_timesteps, (n,), generator=generator)


def tile_tokens(vectors: torch.Tensor, k: int) -> torch.Tensor:
    if vectors.ndim != 2 or vectors.shape[0] == 0:
        raise ValueError(f"init vectors must be [m >= 1, D], got {tuple(vectors.shape)}")
    idx = [i % vectors.shape[0] for i in range(k)]
    return vectors.detach().float()[idx].clone()


def context_pairs(id_positions: Sequence[int], class_positions: Sequence[int], end: int, ref_end: int,
                  start: int = 1) -> list[tuple[int, int]]:
    """Same-word position pairs of a prompt and its reference prompt (see the module docstring)."""
    if not id_positions or not class_positions:
        raise ValueError("context_pairs needs the identity rows and the class word's tokens")
    ids, cls = sorted(id_positions), sorted(class_positions)
    shift = len(cls) - len(ids)
    pairs = []
    for p in range(start, end + 1):
        if ids[0] <= p <= ids[-1]:
            continue
        q = p if p < ids[0] else p + shift
        if start <= q <= ref_end and not (cls[0] <= q <= cls[-1]):
            pairs.append((p, q))
    return pairs


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_learn_settings(*, steps: int, lr: float, attn_weight: float, batch: int = 1,
                         resolution: int = 512) -> None:
    if not isinstance(steps, int) or steps < 1:
        raise LearnSettingsError(f"steps={steps!r}: learning needs at least 1 step; set steps to e.g. 200 "
                                 "(about a minute on a GPU with the encoder init).")
    if not _finite(lr) or lr <= 0:
        raise LearnSettingsError(f"learning_rate={lr!r} is not a positive finite number; use e.g. 0.005.")
    if not _finite(attn_weight) or attn_weight < 0:
        raise LearnSettingsError(f"attention_loss_weight={attn_weight!r} must be a finite number >= 0 "
                                 "(0.003 is the paper's best; 0 gives plain textual inversion).")
    if not isinstance(batch, int) or batch < 1:
        raise LearnSettingsError(f"batch={batch!r} must be >= 1")
    if not isinstance(resolution, int) or resolution < 64 or resolution % 64:
        raise LearnSettingsError(f"resolution={resolution!r} must be a multiple of 64 and >= 64 (512 for SD1/SD2, "
                                 "1024 for SDXL)")
