"""One training step's maths: S* from the faces, the prompt with S* in it, the diffusion loss.

loss = MSE(UNet(noisy latents, t, text(prompt with S*)), target) + lambda * mean_b sum_i ||s_i||_2
where target is the noise (epsilon prediction) or the velocity (v prediction).

Noise and timesteps come from a generator seeded by ``(seed, step, micro-step, rank)``
(:func:`step_generator`): the draws of step n never depend on what ran before it, which is half
of what makes a resumed run equal an uninterrupted one (the other half is the sampler's order).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .text import encode_prompts


@dataclass
class LossParts:
    loss: torch.Tensor  # scalar: mse + reg_weight * reg
    mse: torch.Tensor
    reg: torch.Tensor  # mean over the batch of sum_i ||s_i||_2


def step_generator(seed: int, step: int, micro: int = 0, rank: int = 0) -> torch.Generator:
    """A CPU generator for one micro-step, independent of every other micro-step's."""
    state = np.random.SeedSequence([int(seed), int(step), int(micro), int(rank)]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def id_regulariser(s: torch.Tensor) -> torch.Tensor:
    """S* ``[B, k, D]`` -> mean over the batch of sum over k of the (non-squared) L2 norm."""
    return s.float().norm(dim=-1).sum(dim=1).mean()


def sdxl_time_ids(batch: int, resolution: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """SDXL micro-conditioning: original size, crop top-left (0, 0), target size -> ``[B, 6]``."""
    row = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], device=device, dtype=dtype)
    return row.expand(batch, 6)


def diffusion_loss(base, encoder: Callable[[torch.Tensor], torch.Tensor],
                   split: Callable[[torch.Tensor], dict[str, torch.Tensor]], latents: torch.Tensor,
                   crops: torch.Tensor, prompts: Sequence[str], *, generator: torch.Generator,
                   reg_weight: float, trigger: str = "S*", k: int = 2, noise_offset: float = 0.0) -> LossParts:
    """The DreamIdentity loss for one micro-batch.

    ``base``: a :class:`training.models.BaseModel` (frozen). ``encoder``: the (possibly DDP-wrapped)
    IDEncoder; ``split``: its ``split``. ``latents`` ``[B, C, h, w]`` (scaled), ``crops`` ``[B, 3, 112, 112]``.
    """
    device = latents.device
    unet = base.unet
    unet_dtype = next(unet.parameters()).dtype
    scheduler = base.noise_scheduler
    b = latents.shape[0]

    s = encoder(crops)  # [B, k, out_dim]
    embeds, pooled = encode_prompts(base.family, base.text_encoders, base.tokenizers, prompts, split(s),
                                    trigger=trigger, k=k)  # [B, 77, C], [B, P] or None

    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)  # drawn on CPU: same bits anywhere
    if noise_offset:
        noise = noise + noise_offset * torch.randn((b, latents.shape[1], 1, 1), generator=generator)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator)
    noise, timesteps = noise.to(device), timesteps.to(device)
    latents = latents.float()
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = diffusion_target(scheduler, latents, noise, timesteps)

    kwargs = {}
    if base.family == "sdxl":
        kwargs["added_cond_kwargs"] = {"text_embeds": pooled.to(unet_dtype),
                                       "time_ids": sdxl_time_ids(b, latents.shape[-1] * base_vae_factor(base),
                                                                 device, unet_dtype)}
    pred = unet(noisy.to(unet_dtype), timesteps, encoder_hidden_states=embeds.to(unet_dtype), **kwargs).sample
    mse = F.mse_loss(pred.float(), target.float())
    reg = id_regulariser(s)
    return LossParts(loss=mse + reg_weight * reg, mse=mse, reg=reg)


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
