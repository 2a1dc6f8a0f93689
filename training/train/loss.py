"""The DreamIdentity loss: S* from the faces, the prompt with S* in it, the diffusion MSE + L2 regulariser.

loss = MSE(UNet(noisy latents, t, text(prompt with S*)), target) + lambda * mean_b sum_i ||s_i||_2
where target is the noise (epsilon prediction) or the velocity (v prediction).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..common.diffusion import base_vae_factor, diffusion_target, sdxl_time_ids
from ..common.prompt_encoding import encode_prompts


@dataclass
class LossParts:
    loss: torch.Tensor  # scalar: mse + reg_weight * reg
    mse: torch.Tensor
    reg: torch.Tensor  # mean over the batch of sum_i ||s_i||_2


def id_regulariser(s: torch.Tensor) -> torch.Tensor:
    """S* ``[B, k, D]`` -> mean over the batch of sum over k of the (non-squared) L2 norm."""
    return s.float().norm(dim=-1).sum(dim=1).mean()


def diffusion_loss(base, encoder: Callable[[torch.Tensor], torch.Tensor],
                   split: Callable[[torch.Tensor], dict[str, torch.Tensor]], latents: torch.Tensor,
                   crops: torch.Tensor, prompts: Sequence[str], *, generator: torch.Generator,
                   reg_weight: float, trigger: str = "S*", k: int = 2, noise_offset: float = 0.0) -> LossParts:
    """The DreamIdentity loss for one micro-batch.

    ``base``: a :class:`training.common.base_model.BaseModel` (frozen). ``encoder``: the (possibly DDP-wrapped)
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
