"""The per-identity optimisation: only the identity's token vectors train (float32), the base model is
frozen (its own dtype: fp16/bf16 on a GPU), the photo latents are encoded once.

One step (seeded by ``(seed, step)``, so a run is reproducible):

    latents, masks = augmented views of the photos            # no VAE in the loop
    t ~ U{0..T-1}, noise ~ N(0, I); x_t = add_noise(latents, noise, t)
    words:     context = text(prompt with S*)
    per_stage: keys = text(prompt with K[stage(t)]), values = text(prompt with V[stage(t)])
               (SDXL's pooled embedding from the key encoding, as in the ComfyUI node)
    mse  = || UNet(x_t, t, context) - target ||^2             # target: noise or velocity
    attn = mean over cross-attention layers (<= 1024 queries) and samples of dreamid_core.attention_loss
           .face_attention_loss(maps with S*, maps of the class-word prompt, face mask)
    loss = mse + attn_weight * attn                           # attn_weight 0: plain textual inversion

With ``stage_kind="unet"`` every layer reads its own stage's keys and values (all S encoded).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from dreamid_core import DreamIDError
from dreamid_core.attention_loss import face_attention_loss, face_mass, resize_mask
from dreamid_core.errors import ConfigError
from dreamid_core.learned_identity import IdentityConfig, LearnedIdentity
from dreamid_core.stages import stage_for_timestep

from ..common.diffusion import base_vae_factor, diffusion_target, sdxl_time_ids, step_generator
from ..common.prompt_encoding import PART_FOR_ENCODER, encode_prompts
from .attention import install
from .data import PhotoLatents
from .prompts import TEMPLATES, check_templates, template_tokens

logger = logging.getLogger(__name__)


class LearningDivergedError(DreamIDError, RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class RunOptions:
    """How to run (what is learned lives in :class:`IdentityConfig`)."""

    batch_size: int = 1
    trigger: str = "S*"
    templates: Sequence[str] = TEMPLATES
    augment: bool = True
    scale_jitter: float = 0.1
    flip_p: float = 0.5
    gradient_checkpointing: bool = False
    log_every: int = 10
    attn_terms: tuple[float, float, float] = (1.0, 1.0, 1.0)  # context, class, face weights inside the loss
    attn_max_queries: int | None = 1024  # attention loss on layers up to 32x32 at 512 px (as the ComfyUI node)


@dataclass
class StepStats:
    loss: float
    mse: float
    attn: float = 0.0
    face_mass: float | None = None  # identity tokens' attention share inside the face mask (when recorded)


@dataclass
class LearnResult:
    identity: LearnedIdentity
    history: list[StepStats] = field(default_factory=list)
    seconds: float = 0.0


def check_config(cfg: IdentityConfig, opts: RunOptions) -> None:
    if not isinstance(cfg.steps, int) or cfg.steps < 1:
        raise ConfigError(f"steps must be an integer >= 1, got {cfg.steps!r}; a few hundred learn an identity")
    if not (isinstance(cfg.lr, (int, float)) and math.isfinite(cfg.lr) and cfg.lr > 0):
        raise ConfigError(f"learning rate must be a finite number > 0, got {cfg.lr!r}; 5e-3 is a good start")
    if not (math.isfinite(cfg.attn_weight) and cfg.attn_weight >= 0):
        raise ConfigError(f"attention-loss weight must be finite and >= 0, got {cfg.attn_weight!r} (0 = plain "
                         "textual inversion, 0.003 = the paper's best)")
    if opts.batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {opts.batch_size}")
    if not isinstance(cfg.resolution, int) or cfg.resolution < 8 or cfg.resolution % 8:
        raise ConfigError(f"resolution must be a positive multiple of 8 (the VAE's factor), got {cfg.resolution!r}; "
                         "512 for SD1.x / SD2.1-base, 768 for SD2.x-v, 1024 for SDXL")
    if not (math.isfinite(opts.scale_jitter) and 0 <= opts.scale_jitter < 0.5):
        raise ConfigError(f"scale jitter must be in [0, 0.5), got {opts.scale_jitter!r} (0.1 = crops of 90-100 %)")


class IdentityLearner:
    """Learns one identity on a frozen :class:`training.common.base_model.BaseModel` (see the module docstring)."""

    def __init__(self, base: Any, photos: PhotoLatents, cfg: IdentityConfig, init: dict[str, torch.Tensor],
                 opts: RunOptions | None = None, *, device: torch.device | str = "cpu") -> None:
        self.opts = opts or RunOptions()
        check_config(cfg, self.opts)
        self.base, self.photos, self.cfg = base, photos, cfg
        self.device = torch.device(device)
        self.keys = PART_FOR_ENCODER[base.family]
        want = 2 if cfg.layout == "words" else 4
        for key in self.keys:
            if key not in init or init[key].ndim != want:
                raise ValueError(f"init tensors {({k: tuple(v.shape) for k, v in init.items()})} do not fit a "
                                 f"{cfg.layout} identity for {self.keys}")
        self.params = {key: torch.nn.Parameter(init[key].detach().to(self.device, torch.float32).clone())
                       for key in self.keys}
        self.optimizer = torch.optim.AdamW(list(self.params.values()), lr=cfg.lr, weight_decay=0.0)
        self.unet_dtype = next(base.unet.parameters()).dtype
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.unet_dtype == torch.float16)
        self.templates = [template_tokens(base.tokenizers[0], t, self.opts.trigger, cfg.num_tokens, cfg.class_word)
                          for t in check_templates(self.opts.templates)]
        self.num_timesteps = int(base.noise_scheduler.config.num_train_timesteps)
        self.state, self._uninstall = install(base.unet, num_stages=cfg.num_stages, stage_kind=cfg.stage_kind,
                                              num_timesteps=self.num_timesteps)
        self.state.max_queries = self.opts.attn_max_queries
        self._checkpointing = bool(getattr(base.unet, "is_gradient_checkpointing", False))
        if self.opts.gradient_checkpointing:
            base.unet.enable_gradient_checkpointing()

    # -- pieces -------------------------------------------------------------------------------------

    def _encode(self, prompts: list[str], parts: dict[str, torch.Tensor] | None):
        base = self.base
        return encode_prompts(base.family, base.text_encoders, base.tokenizers, prompts, parts,
                              trigger=self.opts.trigger, k=self.cfg.num_tokens)

    def contexts(self, prompts: list[str], timesteps: torch.Tensor):
        """``(context [B, L, C], pooled, kv)``; kv = per-stage ``(keys, values)`` ``[S', B, L, C]`` or None."""
        b = len(prompts)
        if self.cfg.layout == "words":
            parts = {k: p[None].expand(b, *p.shape) for k, p in self.params.items()}  # [B, k, D]
            ctx, pooled = self._encode(prompts, parts)
            return ctx, pooled, None
        if self.cfg.stage_kind == "time":  # each row needs only its own stage: encode those
            rows = torch.tensor([stage_for_timestep(float(t), self.cfg.num_stages, self.num_timesteps)
                                 for t in timesteps.tolist()], device=self.device)
            keys, pooled = self._encode(prompts, {k: p[rows, 0] for k, p in self.params.items()})
            values, _ = self._encode(prompts, {k: p[rows, 1] for k, p in self.params.items()})
            return keys, pooled, (keys[None], values[None])
        keys, values, pooled = [], [], None
        for s in range(self.cfg.num_stages):
            k_s, pooled_s = self._encode(prompts, {k: p[s, 0][None].expand(b, -1, -1) for k, p in self.params.items()})
            keys.append(k_s)
            values.append(self._encode(prompts, {k: p[s, 1][None].expand(b, -1, -1) for k, p in self.params.items()})[0])
            pooled = pooled_s if pooled is None else pooled
        return keys[0], pooled, (torch.stack(keys), torch.stack(values))

    def unet(self, noisy: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, pooled) -> torch.Tensor:
        kwargs = {}
        if self.base.family == "sdxl":
            res = noisy.shape[-1] * base_vae_factor(self.base)
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled.to(self.unet_dtype),
                                           "time_ids": sdxl_time_ids(noisy.shape[0], res, noisy.device, self.unet_dtype)}
        return self.base.unet(noisy.to(self.unet_dtype), timesteps, encoder_hidden_states=context.to(self.unet_dtype),
                              **kwargs).sample

    def attention_term(self, maps, ref_maps, masks: torch.Tensor, picks: list[int]):
        """Mean over layers and samples of the core's face-wise loss, and the identity's face mass."""
        losses, mass = [], []
        for (name, probs), (ref_name, ref) in zip(maps, ref_maps, strict=True):
            if name != ref_name:
                raise RuntimeError(f"attention layers out of step: {name} vs {ref_name}")
            m = resize_mask(masks, probs.shape[2]).to(probs.device)  # [B, HW]
            for b, ti in enumerate(picks):
                tt = self.templates[ti]
                wc, wk, wf = self.opts.attn_terms
                loss, _ = face_attention_loss(probs[b:b + 1], ref[b:b + 1], m[b:b + 1], tt.id_positions,
                                              tt.class_positions, tt.pairs, context_weight=wc, class_weight=wk,
                                              face_weight=wf)
                losses.append(loss)
                mass.append(face_mass(probs[b:b + 1].detach(), tt.id_positions, m[b:b + 1]))
        return torch.stack(losses).mean(), float(torch.cat(mass).mean())

    # -- one step -----------------------------------------------------------------------------------

    def draw(self, gen: torch.Generator, masks: bool = True):
        """One batch from ``gen``: (latents, masks, template picks, timesteps, noisy latents, target)."""
        opts, base = self.opts, self.base
        latents, masks = self.photos.sample(gen, opts.batch_size, scale_jitter=opts.scale_jitter, flip_p=opts.flip_p,
                                            augment=opts.augment, masks=masks)  # [B, C, h, w], [B, h, w]
        picks = torch.randint(0, len(self.templates), (opts.batch_size,), generator=gen).tolist()
        noise = torch.randn(latents.shape, generator=gen)
        timesteps = torch.randint(0, base.noise_scheduler.config.num_train_timesteps, (opts.batch_size,), generator=gen)
        latents, noise, timesteps = latents.to(self.device), noise.to(self.device), timesteps.to(self.device)
        scheduler = base.noise_scheduler
        noisy = scheduler.add_noise(latents, noise, timesteps)
        target = diffusion_target(scheduler, latents, noise, timesteps)
        return latents, masks, picks, timesteps, noisy, target

    def step(self, step: int) -> StepStats:
        cfg = self.cfg
        use_attn = cfg.attn_weight > 0
        latents, masks, picks, timesteps, noisy, target = self.draw(step_generator(cfg.seed, step), masks=use_attn)
        prompts = [self.templates[i].prompt for i in picks]
        ref_maps = None
        if use_attn:
            with torch.no_grad(), self.state.record() as recs:
                ref_ctx, ref_pooled = self._encode([self.templates[i].reference for i in picks], None)
                self.unet(noisy, timesteps, ref_ctx, ref_pooled)
                ref_maps = list(recs)
        self.optimizer.zero_grad(set_to_none=True)
        context, pooled, kv = self.contexts(prompts, timesteps)
        with self.state.contexts(*kv) if kv is not None else nullcontext():
            with self.state.record() if use_attn else nullcontext() as recs:
                pred = self.unet(noisy, timesteps, context, pooled)
                mse = F.mse_loss(pred.float(), target.float())
                attn, mass = (self.attention_term(list(recs), ref_maps, masks, picks) if use_attn
                              else (mse.new_zeros(()), None))
                loss = mse + cfg.attn_weight * attn
                if not torch.isfinite(loss):
                    raise LearningDivergedError(f"step {step}: the loss is {loss.item()}; lower the learning rate "
                                                f"(now {cfg.lr}) or the attention-loss weight ({cfg.attn_weight})")
                self.state.collecting = False  # the backward's recomputation (checkpointing) must not record
                self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return StepStats(loss=loss.item(), mse=mse.item(), attn=attn.item(), face_mass=mass)

    @torch.no_grad()
    def probe(self, draws: int = 4, seed: int = 1_000_003) -> StepStats:
        """Diffusion MSE, attention loss and identity face mass of the current tokens on ``draws`` fixed
        batches, the same for every call and run: how far learning got, through the same processor.
        ``loss`` is ``mse + attn_weight * attn``."""
        mses, attns, masses = [], [], []
        for i in range(draws):
            _, masks, picks, timesteps, noisy, target = self.draw(step_generator(seed, i))
            with self.state.record() as recs:
                ref_ctx, ref_pooled = self._encode([self.templates[j].reference for j in picks], None)
                self.unet(noisy, timesteps, ref_ctx, ref_pooled)
                ref_maps = list(recs)
            context, pooled, kv = self.contexts([self.templates[j].prompt for j in picks], timesteps)
            with self.state.contexts(*kv) if kv is not None else nullcontext(), self.state.record() as recs:
                pred = self.unet(noisy, timesteps, context, pooled)
                maps = list(recs)
            mses.append(F.mse_loss(pred.float(), target.float()).item())
            attn, mass = self.attention_term(maps, ref_maps, masks, picks)
            attns.append(attn.item())
            masses.append(mass)
        mse, attn = sum(mses) / draws, sum(attns) / draws
        return StepStats(loss=mse + self.cfg.attn_weight * attn, mse=mse, attn=attn, face_mass=sum(masses) / draws)

    # -- the run ------------------------------------------------------------------------------------

    def identity(self) -> LearnedIdentity:
        tensors = {k: p.detach().to("cpu", torch.float32).clone() for k, p in self.params.items()}
        return LearnedIdentity(self.cfg, tensors)

    def run(self, callback: Callable[[int, StepStats], None] | None = None, *, close: bool = True) -> LearnResult:
        """All ``cfg.steps`` steps; ``close`` False keeps the processors for :meth:`probe` (call :meth:`close`)."""
        history: list[StepStats] = []
        t0 = time.perf_counter()
        try:
            for step in range(self.cfg.steps):
                stats = self.step(step)
                history.append(stats)
                if callback is not None:
                    callback(step, stats)
                if self.opts.log_every and (step + 1) % self.opts.log_every == 0:
                    logger.info("step %d/%d: loss %.5f (mse %.5f, attention %.4f)", step + 1, self.cfg.steps,
                                stats.loss, stats.mse, stats.attn)
        except BaseException:
            self.close()
            raise
        if close:
            self.close()
        return LearnResult(self.identity(), history, time.perf_counter() - t0)

    def close(self) -> None:
        """Restore the UNet's processors and checkpointing setting (idempotent)."""
        if self._uninstall is not None:
            self._uninstall()
            self._uninstall = None
            if self.opts.gradient_checkpointing and not self._checkpointing:
                self.base.unet.disable_gradient_checkpointing()
