"""The identity learner's host on a diffusers base model: ``dreamid_core.learning.LearnHost``.

The learning itself is ``dreamid_core.learning.IdentityLearner`` (the ComfyUI node runs the same
learner on ComfyUI's objects). This file lets it call a diffusers UNet and transformers text encoders
the way the pipelines call them, in ComfyUI's sigma space so that both hosts hand the learner the same
quantities:

- ``noise``: ``sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)`` and ``x_t = x0 + sigma_t * noise``;
  the UNet gets ``x_t / sqrt(1 + sigma_t^2)`` (the scheduler's ``add_noise`` exactly) and the integer
  timestep;
- ``denoise``: the x0 estimate from the UNet's output: eps models ``x_t - sigma * eps``, v models
  ``x_in / sqrt(1 + sigma^2) - v * sigma / sqrt(1 + sigma^2)``;
- cross-attention through :mod:`.attention` (per-stage keys/values, recorded maps);
- the prompt with the identity's vectors written into the word embeddings
  (:func:`training.common.prompt_encoding.encode_prompts`, the same tokenization as the node).

Only the vectors get gradients: the UNet and text encoders are set ``requires_grad_(False)`` while
the host is open and restored on ``close()``.
"""

from __future__ import annotations

from typing import Any

import torch

from dreamid_core.learning import Conditioning, Encoded, Noised
from dreamid_core.learning.prompts import PLACEHOLDER

from ..common.diffusion import base_vae_factor, sdxl_time_ids
from ..common.prompt_encoding import PART_FOR_ENCODER, encode_prompts, tokenize_with_trigger
from .attention import install

PREDICTIONS = {"epsilon": "eps", "v_prediction": "v"}


def _content(ids: list[int], bos: int, eos: int) -> range:
    end = ids.index(eos, 1) if eos in ids[1:] else len(ids)
    return range(1 if ids and ids[0] == bos else 0, end)


class DiffusersHost:
    """``LearnHost`` over a :class:`training.common.base_model.BaseModel` (see the module docstring)."""

    def __init__(self, base: Any, *, device: torch.device | str = "cpu", num_stages: int = 1,
                 stage_kind: str = "time", gradient_checkpointing: bool = False, max_queries: int | None = 1024):
        self.base = base
        self.family = base.family
        self.keys = PART_FOR_ENCODER[base.family]
        kind = base.noise_scheduler.config.prediction_type
        if kind not in PREDICTIONS:
            raise ValueError(f"prediction_type {kind!r} is not supported; the base model's scheduler must predict "
                             "'epsilon' or 'v_prediction'")
        self.prediction = PREDICTIONS[kind]
        self.num_timesteps = int(base.noise_scheduler.config.num_train_timesteps)
        self.device = torch.device(device)
        self.compute_dtype = next(base.unet.parameters()).dtype
        levels = len(base.unet.config.block_out_channels)
        self.resolution_multiple = base_vae_factor(base) * 2 ** (levels - 1)
        ac = base.noise_scheduler.alphas_cumprod.to(torch.float64)
        self.sigmas = ((1 - ac) / ac).sqrt().float().to(self.device)  # [T]
        self._modules = [base.unet, *base.text_encoders]
        self._grad_flags = [[p.requires_grad for p in m.parameters()] for m in self._modules]
        for m in self._modules:
            m.requires_grad_(False)
        self._checkpointing = bool(getattr(base.unet, "is_gradient_checkpointing", False))
        self._set_checkpointing = gradient_checkpointing and not self._checkpointing
        if self._set_checkpointing:
            base.unet.enable_gradient_checkpointing()
        self.state, self._uninstall = install(base.unet, num_stages=num_stages, stage_kind=stage_kind,
                                              num_timesteps=self.num_timesteps)
        self.state.max_queries = max_queries

    @property
    def max_queries(self) -> int | None:
        return self.state.max_queries

    @max_queries.setter
    def max_queries(self, value: int | None) -> None:
        self.state.max_queries = value

    def __enter__(self) -> DiffusersHost:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._uninstall is None:
            return
        self._uninstall()
        self._uninstall = None
        if self._set_checkpointing:
            self.base.unet.disable_gradient_checkpointing()
        for m, flags in zip(self._modules, self._grad_flags, strict=True):
            for p, flag in zip(m.parameters(), flags, strict=True):
                p.requires_grad_(flag)

    # -- text -----------------------------------------------------------------------------------------

    def word_embeddings(self, word: str) -> dict[str, torch.Tensor]:
        parts = {}
        for key, te, tok in zip(self.keys, self.base.text_encoders, self.base.tokenizers, strict=True):
            ids = tok(word, add_special_tokens=False).input_ids
            if not ids:
                raise ValueError(f"the word {word!r} gives no tokens; use an ordinary word such as 'person'")
            parts[key] = te.get_input_embeddings().weight[ids].detach().to("cpu", torch.float32).clone()
        return parts

    def vocabulary_norm(self) -> dict[str, float]:
        return {key: float(te.get_input_embeddings().weight.detach().float().norm(dim=-1).median())
                for key, te in zip(self.keys, self.base.text_encoders, strict=True)}

    def encode(self, prompt: str, vectors: dict[str, torch.Tensor]) -> Encoded:
        k = next(iter(vectors.values())).shape[0]
        base = self.base
        parts = {key: v[None] for key, v in vectors.items()}  # [1, k, D]
        context, pooled = encode_prompts(base.family, base.text_encoders, base.tokenizers, [prompt], parts,
                                         trigger=PLACEHOLDER, k=k)
        tok = base.tokenizers[0]
        tokens = tokenize_with_trigger(tok, [prompt], PLACEHOLDER, k)
        ids, positions = tokens.input_ids[0].tolist(), tuple(tokens.positions[0])
        words = tuple((i, ids[i]) for i in _content(ids, tok.bos_token_id, tok.eos_token_id) if i not in positions)
        return Encoded(context, pooled, positions, words)

    # -- diffusion ------------------------------------------------------------------------------------

    def noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> Noised:
        sigma = self.sigmas[t.to(self.sigmas.device)].to(x0.device)  # [B]
        return Noised(x0=x0, x_t=x0 + noise * sigma.reshape(-1, 1, 1, 1), sigma=sigma, t=t)

    def denoise(self, noised: Noised, cond: Conditioning, record: bool = False):
        base, state, dtype = self.base, self.state, self.compute_dtype
        s = noised.sigma.float().reshape(-1, 1, 1, 1)
        scale = torch.rsqrt(1.0 + s * s)  # [B, 1, 1, 1]
        x_in = noised.x_t * scale
        kwargs = {}
        if base.family == "sdxl":
            res = noised.x_t.shape[-1] * base_vae_factor(base)
            kwargs["added_cond_kwargs"] = {"text_embeds": cond.pooled.to(dtype),
                                           "time_ids": sdxl_time_ids(x_in.shape[0], res, x_in.device, dtype)}
        state.kv = (cond.keys, cond.values) if cond.keys is not None else None
        state.records.clear()
        state.recording = state.collecting = bool(record)
        try:
            out = base.unet(x_in.to(dtype), noised.t, encoder_hidden_states=cond.context.to(dtype), **kwargs)
            out = out.sample.float()
        finally:
            state.collecting = False  # a checkpointed backward recomputes without recording twice
        maps = [probs for _, probs in state.records]
        state.records = []
        if self.prediction == "eps":
            denoised = noised.x_t - out * s
        else:
            denoised = x_in * scale - out * s * scale
        return denoised, maps
