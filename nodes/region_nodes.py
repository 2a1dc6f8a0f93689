"""DreamID_IdentityRegions: several people in one prompt, each identity's tokens acting only in its region.

The prompt is encoded like DreamID_InjectIDTokens (so the CONDITIONING is the same); the MODEL is a clone
with an attn2 replace patch on every cross-attention block that adds ``log(mask)`` to the attention logits
of each identity's token positions (``dreamid_core.identities.regions``), for the positive batch chunks only. The
patch goes through ComfyUI's patch API, so LoRAs (weight patches) and ControlNets (residuals) compose with
it; another pack's attn2 *replace* patch on the same blocks would replace this one (last one set wins).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from comfy.ldm.modules import attention as comfy_attention

from ..dreamid_core import check_trigger
from ..dreamid_core.errors import TriggerNotFoundError
from ..dreamid_core.identities.embeds import IdentityEmbeds
from ..dreamid_core.identities.regions import biased_attention, check_aspect, check_region_mask, region_bias
from .adapters.attention_patches import attention_blocks
from .adapters.comfy_tokens import tokenize_with_identities

if TYPE_CHECKING:
    from comfy.model_patcher import ModelPatcher
    from comfy.sd import CLIP

logger = logging.getLogger(__name__)
CATEGORY = "DreamIdentity"
MAX_PEOPLE = 3


class RegionPatch:
    """attn2 replace patch: biased cross-attention for positive chunks, ComfyUI's own attention otherwise.

    ``record`` (a list, or None) receives ``(block, probs [B, heads, N_q, N_k], grid)`` of every biased call,
    for tests that measure where the identity tokens attend."""

    def __init__(self, masks: list[torch.Tensor | None], positions: list[list[int]], context_len: int,
                 names: list[str]) -> None:
        self.masks, self.positions, self.context_len, self.names = masks, positions, context_len, names
        self.record: list | None = None
        self._bias: dict[tuple, torch.Tensor] = {}

    def bias(self, grid: tuple[int, int], latent: tuple[int, int], length: int) -> torch.Tensor:
        key = (grid, length)
        if key not in self._bias:
            masks, positions = [], []
            for mask, pos, name in zip(self.masks, self.positions, self.names, strict=True):
                if mask is None:
                    continue
                check_aspect(mask, latent, name)
                masks.append(mask)
                positions.append([p + r * self.context_len for r in range(length // self.context_len) for p in pos])
            self._bias[key] = region_bias(masks, positions, length, grid)
        return self._bias[key]

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict[str, Any]) -> torch.Tensor:
        heads = extra_options["n_heads"]
        precision = extra_options.get("attn_precision")
        grid = tuple(extra_options.get("activations_shape", extra_options["original_shape"])[-2:])
        latent = tuple(extra_options["original_shape"][-2:])
        chunks = extra_options.get("cond_or_uncond") or [0]
        per = q.shape[0] // len(chunks)
        out = []
        for i, kind in enumerate(chunks):
            rows = slice(i * per, (i + 1) * per)
            qi, ki, vi = q[rows], k[rows], v[rows]
            if kind != 0 or ki.shape[1] % self.context_len or grid[0] * grid[1] != qi.shape[1]:
                out.append(comfy_attention.optimized_attention(qi, ki, vi, heads, attn_precision=precision))
                continue
            bias = self.bias(grid, latent, ki.shape[1]).to(qi.device)
            out.append(biased_attention(qi, ki, vi, heads, bias))
            if self.record is not None:
                from ..dreamid_core.identities.regions import attention_probs

                self.record.append((extra_options.get("block"), attention_probs(qi, ki, heads, bias), grid))
        return torch.cat(out)


def _people_inputs() -> dict:
    extra = {}
    for i in range(2, MAX_PEOPLE + 1):
        extra[f"id_embeds_{i}"] = ("DREAMID_EMBEDS", {"tooltip": f"Optional: person {i}'s identity."})
        extra[f"trigger_{i}"] = ("STRING", {"default": f"S{i}*", "tooltip": f"The word that stands for person {i}."})
        extra[f"mask_{i}"] = ("MASK", {"tooltip": f"Where person {i} goes (white = inside); unconnected: everywhere."})
    return extra


class DreamIDIdentityRegions:
    DESCRIPTION = ("Two or three people in one image, each keeping their own face: encodes the prompt with every "
                   "identity's trigger (like DreamID_InjectIDTokens) and returns a MODEL whose cross-attention lets "
                   "each identity's tokens act only inside its mask (e.g. DreamID_ScenePosition's head_masks). "
                   "The rest of the prompt stays global, so the scene is one image. Use the MODEL and CONDITIONING "
                   "together; LoRAs and ControlNets compose with it.")

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The checkpoint's MODEL (it is cloned, never changed)."}),
                "clip": ("CLIP", {"tooltip": "The checkpoint's CLIP."}),
                "text": ("STRING", {"multiline": True, "dynamicPrompts": True,
                                    "default": "a photo of S1* and S2* together in a cafe, detailed faces",
                                    "tooltip": "The prompt, with each person's trigger where they go."}),
                "id_embeds": ("DREAMID_EMBEDS", {"tooltip": "Person 1's identity."}),
                "trigger": ("STRING", {"default": "S1*", "tooltip": "The word that stands for person 1."}),
            },
            "optional": {"mask": ("MASK", {"tooltip": "Where person 1 goes (white = inside); unconnected: everywhere."}),
                         **_people_inputs()},
        }

    RETURN_TYPES = ("MODEL", "CONDITIONING")
    RETURN_NAMES = ("model", "positive")
    OUTPUT_TOOLTIPS = ("The MODEL with the region patch (use it in the sampler).",
                       "The positive conditioning with every identity in it.")
    FUNCTION = "apply"
    CATEGORY = CATEGORY

    def apply(self, model: ModelPatcher, clip: CLIP, text: str, id_embeds: IdentityEmbeds, trigger: str,
              mask: torch.Tensor | None = None,
              **extra: IdentityEmbeds | str | torch.Tensor) -> tuple[ModelPatcher, list[list]]:
        people = [(check_trigger(trigger), id_embeds, mask, "mask")]
        for i in range(2, MAX_PEOPLE + 1):
            embeds = extra.get(f"id_embeds_{i}")
            if embeds is None:
                if extra.get(f"mask_{i}") is not None:
                    raise ValueError(f"mask_{i} is connected but id_embeds_{i} is not: connect person {i}'s identity "
                                     "or remove the mask.")
                continue
            people.append((check_trigger(extra.get(f"trigger_{i}", f"S{i}*")), embeds, extra.get(f"mask_{i}"),
                           f"mask_{i}"))
        folded = [p[0].casefold() for p in people]
        if len(set(folded)) != len(folded):
            raise TriggerNotFoundError(f"two people use the same trigger word ({[p[0] for p in people]}); give each "
                                       "person their own trigger, e.g. S1* and S2*.")
        tokens, found = tokenize_with_identities(clip, text, {t: e.parts for t, e, _, _ in people})
        cond = clip.encode_from_tokens_scheduled(tokens)
        key = next(iter(found.positions))
        positions = [found.positions[key][t] for t, _, _, _ in people]
        masks = [check_region_mask(m, name) if m is not None else None for _, _, m, name in people]
        patch = RegionPatch(masks, positions, int(cond[0][0].shape[1]), [name for *_, name in people])
        clone = model.clone()
        for block, number in attention_blocks(clone):
            clone.set_model_attn2_replace(patch, block, number)
        logger.info("DreamIdentity regions: %s", ", ".join(
            f"{t} ({'masked' if m is not None else 'everywhere'}, {found.counts[t]}x)" for t, _, m, _ in people))
        return (clone, cond)
