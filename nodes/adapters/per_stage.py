"""Generating with a learned identity of either layout on ComfyUI's objects (DreamID_ApplyPerStageIdentity,
the learner's previews), and the S* that stands for a per-stage identity where one S* is needed."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from ...dreamid_core.errors import IncompatibleEncoderError
from ...dreamid_core.identities.embeds import IdentityEmbeds
from ...dreamid_core.identities.families import family_name
from ...dreamid_core.identities.learned_identity import LearnedIdentity
from .attention_patches import PerStagePatch, fit_context, stage_of_sigma, stage_selector
from .comfy_tokens import part_key, tokenize_with_identities, tokenizer_keys
from .dit_model import image_tokens, is_dit, model_family, patch_size
from .joint_attention import JointAttention

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
    """(MODEL clone that reads the identity's stage contexts for ``text``, the positive CONDITIONING). A UNet gets
    an attn2 patch (:class:`~.attention_patches.PerStagePatch`); FLUX.1 / SD3 a model wrapper that gives their
    joint attention two text streams (:class:`JointPerStage`); a words identity on a DiT is the prompt alone."""
    dit = is_dit(model)
    if dit and ident.layout == "per_stage" and ident.config.stage_kind != "time":
        raise IncompatibleEncoderError(
            f"this identity's stages are by {ident.config.stage_kind!r} (UNet blocks, made for {ident.config.target}); "
            f"{family_name(model_family(model))} has no UNet blocks: learn it with stage_kind 'time'.")
    if dit and ident.layout == "words":
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
    keys, values = [contexts[(s, "key")] for s in range(S)], [contexts[(s, "value")] for s in range(S)]
    if dit:
        patched.set_model_unet_function_wrapper(JointPerStage(
            keys, values, stage_of_sigma(patched, S), patch_size(patched),
            patched.model_options.get("model_function_wrapper")))
        return patched, positive
    kind = ident.config.stage_kind if ident.layout == "per_stage" else "time"
    patched.set_model_attn2_patch(PerStagePatch(keys, values, stage_selector(patched, S, kind)))
    return patched, positive


class JointPerStage:
    """``model_function_wrapper`` of a FLUX.1 / SD3 MODEL with a per-stage identity: each call's text becomes two
    streams (:class:`~.joint_attention.JointAttention`): the positive chunks read the keys' and the values'
    contexts of their step's stage, the other chunks (negative prompt) their own context twice, which is
    their one-stream call. Another wrapper that was set before runs around the model call."""

    def __init__(self, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
                 stage: Callable[[torch.Tensor], int], patch: int, prior: Callable[..., Any] | None) -> None:
        self.keys, self.values, self.stage, self.patch, self.prior = list(keys), list(values), stage, patch, prior

    def __call__(self, apply_model: Callable[..., torch.Tensor], args: dict[str, Any]) -> torch.Tensor:
        x, t, kinds = args["input"], args["timestep"], list(args["cond_or_uncond"])
        c = dict(args["c"])
        ctx = c["c_crossattn"]
        chunk = ctx.shape[0] // len(kinds)
        parts = []
        for i, kind in enumerate(kinds):
            own = ctx[i * chunk:(i + 1) * chunk]
            if kind == 0:
                s = self.stage(t[i * chunk])
                parts.append(torch.cat([fit_context(self.keys[s], own), fit_context(self.values[s], own)], dim=1))
            else:
                parts.append(torch.cat([own, own], dim=1))
        c["c_crossattn"] = torch.cat(parts)
        to = dict(c.get("transformer_options") or {})
        joint = JointAttention(max_queries=None)
        img_len = image_tokens(x, self.patch)
        joint.start(False, txt_len=2 * ctx.shape[1], img_len=img_len, prior=to.get("optimized_attention_override"),
                    stream_len=ctx.shape[1])
        to["optimized_attention_override"] = joint
        c["transformer_options"] = to
        out = (self.prior(apply_model, {**args, "c": c}) if self.prior is not None
               else apply_model(x, t, **c))
        if not joint.calls:
            raise IncompatibleEncoderError(
                f"the per-stage identity found no joint attention of {2 * ctx.shape[1]} text + {img_len} image tokens "
                "in this MODEL (reference latents, or a patch that changes the token count?); use a words identity "
                "with it")
        return out

    def to(self, device: torch.device) -> JointPerStage:
        """ComfyUI moves a wrapper with the model (``ModelPatcher.patch_model``)."""
        prior = self.prior.to(device) if self.prior is not None and hasattr(self.prior, "to") else self.prior
        return JointPerStage([k.to(device) for k in self.keys], [v.to(device) for v in self.values], self.stage,
                             self.patch, prior)
