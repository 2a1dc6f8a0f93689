"""Generating with a learned identity of either layout on ComfyUI's objects (DreamID_ApplyPerStageIdentity,
the learner's previews), and the S* that stands for a per-stage identity where one S* is needed."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...dreamid_core.errors import IncompatibleEncoderError
from ...dreamid_core.identities.embeds import IdentityEmbeds
from ...dreamid_core.identities.families import family_name
from ...dreamid_core.identities.learned_identity import LearnedIdentity
from .attention_patches import PerStagePatch, stage_selector
from .comfy_tokens import part_key, tokenize_with_identities, tokenizer_keys
from .dit_model import is_dit, model_family

if TYPE_CHECKING:
    from comfy.model_patcher import ModelPatcher
    from comfy.sd import CLIP


def representative_embeds(ident: LearnedIdentity) -> IdentityEmbeds:
    """DREAMID_EMBEDS for any identity: ``words`` -> S*; ``per_stage`` -> the first sampling stage's
    (noisiest, layout-deciding) KEY vectors, an approximation for nodes that take one S*."""
    if ident.layout == "words":
        return ident.to_embeds()
    s = ident.config.num_stages - 1
    parts = {k: v.clone() for k, v in ident.stage_vectors(s, "key").items()}
    return IdentityEmbeds(parts=parts, info={"target": ident.config.target, "learned": True,
                                             "from_per_stage": f"stage {s} key"})


def clip_single_key(clip: CLIP | None) -> str | None:
    keys = tokenizer_keys(clip) if clip is not None else []
    return part_key(clip, keys[0]) if len(keys) == 1 else None


def apply_per_stage(model: ModelPatcher, clip: CLIP, ident: LearnedIdentity, text: str,
                    trigger: str) -> tuple[ModelPatcher, list[list]]:
    """(MODEL clone with the per-stage attn2 patch for ``text``, the positive CONDITIONING). On FLUX.1 / SD3
    a words identity is the prompt alone (their joint attention has no attn2 to patch); a per-stage one is
    refused."""
    if is_dit(model):
        if ident.layout == "per_stage":
            raise IncompatibleEncoderError(
                f"this identity is per_stage ({ident.config.num_stages} stages, made for "
                f"{ident.config.target}); per-stage identities apply on SD1.x/SD2.x/SDXL UNets, not on "
                f"{family_name(model_family(model))}. Learn a words identity for it.")
        tokens, _ = tokenize_with_identities(clip, text, {trigger: ident.stage_vectors(0, "key")})
        return model.clone(), clip.encode_from_tokens_scheduled(tokens)
    S = ident.config.num_stages if ident.layout == "per_stage" else 1
    contexts = {}
    for s in range(S):
        for kv in ("key", "value"):
            tokens, _ = tokenize_with_identities(clip, text, {trigger: ident.stage_vectors(s, kv)})
            contexts[(s, kv)] = clip.encode_from_tokens(tokens, return_pooled=True)[0]
    tokens, _ = tokenize_with_identities(clip, text, {trigger: ident.stage_vectors(S - 1, "key")})
    positive = clip.encode_from_tokens_scheduled(tokens)
    patched = model.clone()
    kind = ident.config.stage_kind if ident.layout == "per_stage" else "time"
    patched.set_model_attn2_patch(PerStagePatch([contexts[(s, "key")] for s in range(S)],
                                                [contexts[(s, "value")] for s in range(S)],
                                                stage_selector(patched, S, kind)))
    return patched, positive
