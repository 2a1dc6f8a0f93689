"""The diffusion maths shared by encoder training and identity learning: seeded noise, timesteps, targets.

Noise and timesteps come from a generator seeded by ``(seed, step, micro-step, rank)``
(:func:`step_generator`): the draws of step n never depend on what ran before it, which is half
of what makes a resumed run equal an uninterrupted one (the other half is the sampler's order).
"""

from __future__ import annotations

import torch

from dreamid_core.learning.seeding import step_generator

__all__ = ["base_vae_factor", "diffusion_target", "sdxl_time_ids", "step_generator"]


def sdxl_time_ids(batch: int, resolution: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """SDXL micro-conditioning: original size, crop top-left (0, 0), target size -> ``[B, 6]``."""
    row = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], device=device, dtype=dtype)
    return row.expand(batch, 6)


def base_vae_factor(base) -> int:
    """Pixels per latent (8 for SD's VAE)."""
    return 2 ** (len(base.vae.config.block_out_channels) - 1)


def diffusion_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet should predict for these noised latents: the noise (epsilon) or the velocity."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"prediction_type {kind!r} is not supported; the base model's scheduler must predict 'epsilon' "
                     "or 'v_prediction'")
