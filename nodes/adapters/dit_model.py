"""What identity learning needs to know about a ComfyUI MODEL's architecture: UNet or DiT, its family, the
text widths it reads, and how a DiT (FLUX.1, SD3/3.5) is called.

- :func:`is_dit`: a diffusion transformer (no UNet ``input_blocks``).
- :func:`model_family`: "sd1", "sd2", "sdxl", "sd3", "flux", "chroma" or the model class's name.
- :func:`expected_widths`: ``{part key: width}`` the MODEL's text inputs need from a CLIP, for the checks
  that name both sides when a MODEL and a CLIP of different families meet.
- :func:`dit_blocks`: the transformer blocks of a DiT in forward order (checkpointing wraps them).
- :func:`image_tokens`: the image tokens a latent becomes (the joint attention's image rows).
- :func:`dit_conds`: the keyword conditioning of one ``apply_model`` call on a DiT, made by the model's
  own ``extra_conds`` exactly as ComfyUI's sampler makes it (``c_crossattn``, the pooled ``y``, FLUX's
  ``guidance`` at ComfyUI's default 3.5 for guidance-distilled models), repeated to the batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import comfy.model_base
import torch

if TYPE_CHECKING:
    from comfy.model_patcher import ModelPatcher

_DIT_BLOCK_LISTS = ("double_blocks", "single_blocks", "joint_blocks")


def is_dit(patcher: ModelPatcher) -> bool:
    return not hasattr(patcher.model.diffusion_model, "input_blocks")


def model_family(patcher: ModelPatcher) -> str:
    model = patcher.model
    cfg = model.model_config.unet_config
    image_model = cfg.get("image_model")
    if image_model in ("flux", "chroma"):
        return str(image_model)
    if isinstance(model, comfy.model_base.SD3):
        return "sd3"
    if isinstance(model, comfy.model_base.SDXL):
        return "sdxl"
    if not is_dit(patcher):
        name = type(model.model_config).__name__  # ComfyUI's detected config: SD15, SD20, SD21UnclipL, ...
        if name.startswith("SD15"):
            return "sd1"
        if name.startswith("SD2"):
            return "sd2"
        return {768: "sd1", 1024: "sd2"}.get(int(cfg.get("context_dim") or 0), name)
    return type(model.model_config).__name__


def expected_widths(patcher: ModelPatcher) -> dict[str, int] | None:
    """The text widths the MODEL reads, per identity part where they are separate: FLUX reads T5 as the
    sequence (``context_in_dim``) and CLIP-L's pooled vector (``vec_in_dim``); SD3 reads a 4096-wide joint
    sequence (T5's width) and CLIP-L + CLIP-G pooled (``adm_in_channels``, as ``"clip_l+clip_g"``). None
    for a UNet (its one ``context_dim`` is checked against the CLIP's summed widths)."""
    cfg = patcher.model.model_config.unet_config
    family = model_family(patcher)
    if family == "flux":
        return {"t5xxl": int(cfg["context_in_dim"]), "clip_l": int(cfg["vec_in_dim"])}
    if family == "sd3":
        embed = (cfg.get("context_embedder_config") or {}).get("params", {})
        out = {"t5xxl": int(embed.get("in_features", 4096))}
        if cfg.get("adm_in_channels"):
            out["clip_l+clip_g"] = int(cfg["adm_in_channels"])
        return out
    return None


def dit_blocks(patcher: ModelPatcher) -> list[torch.nn.Module]:
    dm = patcher.model.diffusion_model
    blocks = [b for name in _DIT_BLOCK_LISTS for b in (getattr(dm, name, None) or [])]
    if not blocks:
        raise ValueError(f"{type(dm).__name__} has none of the block lists {_DIT_BLOCK_LISTS}; identity learning "
                         "runs on FLUX.1 and SD3/3.5 transformers")
    return blocks


def patch_size(patcher: ModelPatcher) -> int:
    return int(getattr(patcher.model.diffusion_model, "patch_size", 1) or 1)


def image_tokens(latent: torch.Tensor, patch: int) -> int:
    """How many image tokens a DiT makes of ``latent [B, C, h, w]`` (``patch`` x ``patch`` patches, padded)."""
    return -(-latent.shape[-2] // patch) * -(-latent.shape[-1] // patch)


def dit_conds(patcher: ModelPatcher, context: torch.Tensor, pooled: torch.Tensor | None,
              x_t: torch.Tensor) -> dict[str, torch.Tensor]:
    """``apply_model`` keyword conditioning for a batch ``x_t [B, C, h, w]`` (see the module docstring)."""
    B, _, h, w = x_t.shape
    conds = patcher.model.extra_conds(cross_attn=context, pooled_output=pooled, noise=x_t, device=x_t.device,
                                      width=w * 8, height=h * 8)
    return {name: cond.process_cond(batch_size=B, device=x_t.device).cond for name, cond in conds.items()}
