"""Image generation behind a small protocol, so the dataset builder and the evaluation can run
on a real diffusers pipeline or on anything else that maps (prompt, seed) to an image (tests use
real photos, since tiny test models only draw noise).

- a generator is any callable ``generator(prompt, seed) -> PIL.Image``; optionally
  ``generator.batch(prompts, seeds, parts=None, k=2) -> list[PIL.Image]`` (batched, and S*-aware:
  ``parts`` are per-prompt S* vectors ``{"clip_h": [B, k, D]}`` injected where the prompt says "S*").
- :class:`DiffusersGenerator`: the base model's pipeline (DDIM by default), prompts encoded by
  :func:`training.common.prompt_encoding.encode_prompts`, one seeded ``torch.Generator`` per image (the seed fixes
  the image's initial noise, so a rerun draws the same image).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from typing import Any

import torch

from dreamid_core.errors import ConfigError

from .prompt_encoding import encode_prompts

logger = logging.getLogger(__name__)


def item_seed(base_seed: int, key: str) -> int:
    """A 31-bit seed from the run's seed and an item's key: stable across runs, shards and machines."""
    digest = hashlib.sha256(f"{base_seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def resolve_device(name: str = "auto", *, shard: int = 0) -> torch.device:
    """``auto``: shard i on ``cuda:(i mod number of GPUs)`` (one process per GPU), else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", shard % torch.cuda.device_count())
        return torch.device("cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in table:
        raise ConfigError(f"--dtype must be auto or one of {sorted(table)}, got {name!r}")
    return table[name]


def generate_many(generator: Any, prompts: Sequence[str], seeds: Sequence[int], batch_size: int = 4) -> list[Any]:
    """Images for (prompt, seed) pairs, batched when the generator has ``batch``."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    if hasattr(generator, "batch"):
        out: list[Any] = []
        for i in range(0, len(prompts), batch_size):
            out.extend(generator.batch(list(prompts[i:i + batch_size]), list(seeds[i:i + batch_size])))
        return out
    return [generator(p, s) for p, s in zip(prompts, seeds, strict=True)]


class DiffusersGenerator:
    """The frozen base model's diffusers pipeline as a generator (``generator(prompt, seed) -> image``).

    ``steps``/``guidance``: DDIM steps and classifier-free guidance (the paper: 30 and 7.5).
    ``height``/``width``: None uses the model's native size. ``negative_prompt``: the unconditional text.
    """

    def __init__(self, base: Any, *, steps: int = 30, guidance: float = 7.5, height: int | None = None,
                 width: int | None = None, negative_prompt: str = "", scheduler: str = "ddim",
                 trigger: str = "S*", device: str | torch.device = "cpu") -> None:
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.base = base
        self.steps = steps
        self.guidance = guidance
        self.height = height
        self.width = width
        self.negative_prompt = negative_prompt
        self.trigger = trigger
        self.device = torch.device(device)
        self.pipe = base.pipeline(scheduler)
        self.pipe.set_progress_bar_config(disable=True)

    def __call__(self, prompt: str, seed: int) -> Any:
        return self.batch([prompt], [seed])[0]

    @torch.inference_mode()
    def batch(self, prompts: Sequence[str], seeds: Sequence[int], parts: dict[str, torch.Tensor] | None = None,
              k: int = 2) -> list[Any]:
        """``parts`` None: plain prompts (names stay text). Otherwise S* ``{key: [B, k, D]}`` is injected."""
        base = self.base
        if parts is not None:
            parts = {key: v.to(self.device, base.text_encoders[0].dtype) for key, v in parts.items()}
        embeds, pooled = encode_prompts(base.family, base.text_encoders, base.tokenizers, list(prompts), parts,
                                        trigger=self.trigger, k=k)
        neg, neg_pooled = encode_prompts(base.family, base.text_encoders, base.tokenizers,
                                         [self.negative_prompt] * len(prompts), None)
        kwargs: dict[str, Any] = dict(prompt_embeds=embeds, negative_prompt_embeds=neg)
        if base.family == "sdxl":
            kwargs.update(pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=neg_pooled)
        generators = [torch.Generator(device=self.device).manual_seed(int(s)) for s in seeds]
        out = self.pipe(num_inference_steps=self.steps, guidance_scale=self.guidance, height=self.height,
                        width=self.width, generator=generators, output_type="pil", **kwargs)
        return list(out.images)
