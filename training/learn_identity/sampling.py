"""Drawing images with a learned identity of either layout through the base model's diffusers pipeline.

- ``words``: S* ``{key: [B, k, D]}`` injected into the prompt (exactly :class:`DiffusersGenerator`);
- ``per_stage``: ``{key: [B, S, 2, k, D]}``. For every stage s the prompts are encoded twice, with
  the stage's key vectors and with its value vectors; the cross-attention processor
  (:mod:`.attention`) then reads ``keys[stage]`` / ``values[stage]`` instead of the prompt context,
  the stage coming from each UNet call's timestep (or from the layer, ``stage_kind="unet"``). With
  classifier-free guidance the pipeline runs ``[negative, positive]`` rows, so the contexts are
  built the same way. The pipeline's own ``prompt_embeds`` are the stage-0 key encoding (SDXL's
  pooled embedding comes from it, as in training; every cross-attention reads the stages).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..common.generation import DiffusersGenerator
from ..common.prompt_encoding import encode_prompts
from .attention import install


class IdentityGenerator(DiffusersGenerator):
    """A :class:`DiffusersGenerator` that also takes per-stage parts (see the module docstring)."""

    def __init__(self, base: Any, *, num_stages: int = 5, stage_kind: str = "time", **kwargs: Any) -> None:
        super().__init__(base, **kwargs)
        self.num_stages, self.stage_kind = num_stages, stage_kind

    @torch.inference_mode()
    def batch(self, prompts: Sequence[str], seeds: Sequence[int], parts: dict[str, torch.Tensor] | None = None,
              k: int = 2) -> list[Any]:
        if parts is None or next(iter(parts.values())).ndim == 3:  # plain text or words: [B, k, D]
            return super().batch(prompts, seeds, parts=parts, k=k)
        base = self.base
        dtype = base.text_encoders[0].dtype
        parts = {key: v.to(self.device, dtype) for key, v in parts.items()}  # [B, S, 2, k, D]
        stages = next(iter(parts.values())).shape[1]
        if stages != self.num_stages:
            raise ValueError(f"the identity has {stages} stages but the generator was set up for {self.num_stages}")
        prompts = list(prompts)

        def encode(p, vectors):
            return encode_prompts(base.family, base.text_encoders, base.tokenizers, p, vectors, trigger=self.trigger,
                                  k=k)

        neg, neg_pooled = encode([self.negative_prompt] * len(prompts), None)
        keys, values, pooled = [], [], None
        for s in range(stages):
            k_s, p_s = encode(prompts, {key: v[:, s, 0] for key, v in parts.items()})
            keys.append(k_s)
            values.append(encode(prompts, {key: v[:, s, 1] for key, v in parts.items()})[0])
            pooled = p_s if pooled is None else pooled
        cfg = self.guidance > 1.0
        key_ctx, value_ctx = torch.stack(keys), torch.stack(values)  # [S, B, L, C]
        if cfg:  # the pipeline's rows: negative first, then the prompts
            neg_s = neg[None].expand(stages, *neg.shape)
            key_ctx, value_ctx = torch.cat([neg_s, key_ctx], dim=1), torch.cat([neg_s, value_ctx], dim=1)
        kwargs: dict[str, Any] = dict(prompt_embeds=keys[0], negative_prompt_embeds=neg)
        if base.family == "sdxl":
            kwargs.update(pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=neg_pooled)
        generators = [torch.Generator(device=self.device).manual_seed(int(s)) for s in seeds]
        state, uninstall = install(base.unet, num_stages=stages, stage_kind=self.stage_kind,
                                   num_timesteps=int(base.noise_scheduler.config.num_train_timesteps))
        try:
            with state.contexts(key_ctx, value_ctx):
                out = self.pipe(num_inference_steps=self.steps, guidance_scale=self.guidance, height=self.height,
                                width=self.width, generator=generators, output_type="pil", **kwargs)
        finally:
            uninstall()
        return list(out.images)
