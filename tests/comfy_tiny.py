"""Tiny REAL ComfyUI models, seeded, built from ComfyUI's own classes (import ComfyUI first, see
``comfy_env.import_comfyui``; the server-side test node pack imports this file too).

- :func:`tiny_clip` → a real ``comfy.sd.CLIP`` (real tokenizer, real 77-token chunks, real BPE) with a
  narrow, shallow text transformer. SD2 and both SDXL towers read the penultimate layer, and ComfyUI
  asserts ``abs(layer_idx) < num_layers``, so they need at least 3 layers.
- :func:`write_tiny_sd2_checkpoint` → a ``.safetensors`` that ``CheckpointLoaderSimple`` detects as
  SD2.0 (eps): a one-level 320-channel UNet with context width 1024 and a TAESD-sized VAE, no text
  encoder (a tiny text encoder inside a checkpoint would be rebuilt at the real width and fail).
  Use it with :func:`server_sd2_clip` (1024 wide, 3 layers) whose output width matches the UNet.
- :func:`write_tiny_controlnet` → an SD2 ControlNet for that UNet (``ControlNetLoader``).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# Widths of the in-process tiny text encoders (distinct on purpose, so width mix-ups fail loudly).
SD1_WIDTH = 64
SD2_WIDTH = 96
SDXL_L_WIDTH = 64
SDXL_G_WIDTH = 96
TINY_WIDTHS = {"sd1": SD1_WIDTH, "sd2": SD2_WIDTH, "sdxl": (SDXL_L_WIDTH, SDXL_G_WIDTH)}
TINY_LAYERS = 3  # >= 3: penultimate layer (layer_idx -2) must satisfy abs(-2) < num_layers

# The tiny SD2 checkpoint: SD2.0 detection needs context 1024 and 320 model channels exactly.
SD2_CONTEXT_WIDTH = 1024
SERVER_SD2_WIDTH = SD2_CONTEXT_WIDTH
SERVER_SD2_LAYERS = 3
SERVER_SD2_MLP = 256
UNET_CHANNELS = 320
LATENT_CHANNELS = 4

_CLIP_PARTS = {  # kind -> (module, tokenizer class, model class, [(model_config key, tokenizer attr)])
    "sd1": ("comfy.sd1_clip", "SD1Tokenizer", "SD1ClipModel", [("clip_l", "clip_l")]),
    "sd2": ("comfy.text_encoders.sd2_clip", "SD2Tokenizer", "SD2ClipModel", [("clip_h", "clip_h")]),
    "sdxl": ("comfy.sdxl_clip", "SDXLTokenizer", "SDXLClipModel", [("clip_l", "clip_l"), ("clip_g", "clip_g")]),
}


def _generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(int(seed))


@torch.no_grad()
def init_weights_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Deterministic init: matrices ~ N(0, 1/fan_in), 1-D weights (norms) 1, biases 0.

    ComfyUI builds models with ``disable_weight_init`` layers, i.e. uninitialised memory."""
    gen = _generator(seed)
    for name, p in module.named_parameters():
        if p.ndim >= 2:
            fan_in = math.prod(p.shape[1:])
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
        elif name.endswith("bias"):
            p.zero_()
        elif name.endswith("weight"):
            p.fill_(1.0)
    return module


def _text_config(width: int, layers: int, intermediate: int | None) -> dict:
    heads = width // 32 if width % 32 == 0 else 1
    return {"hidden_size": width, "intermediate_size": intermediate or 2 * width,
            "num_attention_heads": heads, "num_hidden_layers": layers, "projection_dim": width}


def tiny_clip(kind: str, width: int | tuple[int, int] | None = None, *, layers: int = TINY_LAYERS,
              intermediate: int | None = None, seed: int = 0, dtype: torch.dtype | None = None,
              embedding_directory: str | None = None):
    """A real ``comfy.sd.CLIP`` of ``kind`` ("sd1", "sd2", "sdxl") with a tiny text transformer.

    ``width``: hidden width (default :data:`TINY_WIDTHS`); for "sdxl" an ``(l, g)`` pair or one int
    for both (conditioning is ``l + g`` wide, pooled output ``g`` wide). ``dtype`` None keeps
    ComfyUI's choice (fp16 text encoder weights, even on CPU). The tokenizers' ``embedding_size`` is
    set to the tiny width so ``embedding:NAME`` files of that width load.
    """
    import importlib

    import comfy.sd
    import comfy.supported_models_base

    if kind not in _CLIP_PARTS:
        raise ValueError(f"kind must be one of {sorted(_CLIP_PARTS)}, got {kind!r}")
    if kind != "sd1" and layers < 3:
        raise ValueError(f"{kind} reads the penultimate layer; ComfyUI needs layers >= 3, got {layers}")
    width = TINY_WIDTHS[kind] if width is None else width
    widths = tuple(width) if isinstance(width, (tuple, list)) else (width,) * len(_CLIP_PARTS[kind][3])
    module_name, tok_cls, model_cls, towers = _CLIP_PARTS[kind]
    if len(widths) != len(towers):
        raise ValueError(f"{kind} has {len(towers)} text towers, got widths {widths}")
    module = importlib.import_module(module_name)
    target = comfy.supported_models_base.ClipTarget(getattr(module, tok_cls), getattr(module, model_cls))
    options = {f"{key}_model_config": _text_config(w, layers, intermediate)
               for (key, _), w in zip(towers, widths, strict=True)}
    if dtype is not None:
        options["dtype"] = dtype
    clip = comfy.sd.CLIP(target, embedding_directory=embedding_directory, model_options=options)
    init_weights_(clip.cond_stage_model, seed)
    for (_, attr), w in zip(towers, widths, strict=True):
        getattr(clip.tokenizer, attr).embedding_size = w
    log.debug("tiny %s CLIP: widths %s, %d layers", kind, widths, layers)
    return clip


#: tiny T5 for the DiT CLIPs: SD3 concatenates the CLIP towers (padded to 4096) with T5 along the
#: sequence, so its T5 must be 4096 wide; FLUX keeps T5 apart, so a narrow one is enough there
T5_TINY = {"d_ff": 64, "d_kv": 16, "num_heads": 2, "num_layers": 2}


def tiny_dit_clip(kind: str, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                  embedding_directory: str | None = None, t5_width: int | None = None):
    """A real ``comfy.sd.CLIP`` of a DiT family with ComfyUI's own tokenizers (CLIP BPE and T5's
    sentencepiece): "sd3" (clip_l 64 + clip_g 96 + T5 4096 wide, 2 layers) or "flux" (clip_l 64 + T5 48)."""
    import comfy.sd
    import comfy.supported_models_base
    from comfy.text_encoders import flux, sd3_clip

    if kind == "sd3":
        target = comfy.supported_models_base.ClipTarget(sd3_clip.SD3Tokenizer, sd3_clip.sd3_clip())
        options = {"clip_l_model_config": _text_config(SDXL_L_WIDTH, TINY_LAYERS, None),
                   "clip_g_model_config": _text_config(SDXL_G_WIDTH, TINY_LAYERS, None),
                   "t5xxl_model_config": {**T5_TINY, "d_model": t5_width or 4096}}
    elif kind == "flux":
        target = comfy.supported_models_base.ClipTarget(flux.FluxTokenizer, flux.flux_clip())
        options = {"clip_l_model_config": _text_config(SDXL_L_WIDTH, TINY_LAYERS, None),
                   "t5xxl_model_config": {**T5_TINY, "d_model": t5_width or 48}}
    else:
        raise ValueError(f"kind must be 'sd3' or 'flux', got {kind!r}")
    options["dtype"] = dtype
    clip = comfy.sd.CLIP(target, embedding_directory=embedding_directory, model_options=options)
    init_weights_(clip.cond_stage_model, seed)
    clip.tokenizer.clip_l.embedding_size = SDXL_L_WIDTH
    if kind == "sd3":
        clip.tokenizer.clip_g.embedding_size = SDXL_G_WIDTH
    clip.tokenizer.t5xxl.embedding_size = options["t5xxl_model_config"]["d_model"]
    return clip


def server_sd2_clip(seed: int = 0, dtype: torch.dtype | None = None):
    """The SD2 CLIP that goes with :func:`write_tiny_sd2_checkpoint`: 1024 wide (the UNet's
    context width), 3 layers, MLP 256 (~65 M parameters, mostly the 49408-token embedding)."""
    return tiny_clip("sd2", SERVER_SD2_WIDTH, layers=SERVER_SD2_LAYERS, intermediate=SERVER_SD2_MLP,
                     seed=seed, dtype=dtype)


def tiny_sd2_unet_config() -> dict:
    """UNet config that ComfyUI's detection maps to SD20: one level, one res block + transformer."""
    return {
        "image_size": 32, "in_channels": LATENT_CHANNELS, "out_channels": LATENT_CHANNELS,
        "model_channels": UNET_CHANNELS, "num_res_blocks": [1], "channel_mult": [1],
        "transformer_depth": [1], "transformer_depth_output": [1, 1], "transformer_depth_middle": 1,
        "context_dim": SD2_CONTEXT_WIDTH, "use_linear_in_transformer": True, "num_head_channels": 64,
        "num_heads": -1, "use_spatial_transformer": True, "legacy": False, "adm_in_channels": None,
        "use_checkpoint": False, "use_temporal_resblock": False, "use_temporal_attention": False,
    }


def _save(state: dict, path: str | Path, dtype: torch.dtype) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(dtype).contiguous() for k, v in state.items()}
    save_file(state, str(path), metadata={"format": "pt", "note": "tiny random test model"})
    n = sum(v.numel() for v in state.values())
    log.info("wrote %s: %.1f M parameters, %.1f MB", path, n / 1e6, path.stat().st_size / 1e6)
    return path


def write_tiny_sd2_checkpoint(path: str | Path, seed: int = 0, dtype: torch.dtype = torch.float16) -> Path:
    """Write a tiny SD2.0 (eps) checkpoint: UNet + TAESD-style VAE, no text encoder."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from comfy.taesd.taesd import TAESD

    unet = init_weights_(UNetModel(**tiny_sd2_unet_config(), dtype=torch.float32, device="cpu"), seed)
    vae = init_weights_(TAESD(latent_channels=LATENT_CHANNELS), seed + 1)
    state = {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}
    state.update({f"first_stage_model.{k}": v for k, v in vae.state_dict().items()})
    return _save(state, path, dtype)


def write_tiny_controlnet(path: str | Path, seed: int = 1, dtype: torch.dtype = torch.float16) -> Path:
    """Write an SD2 ControlNet (ldm format, ``control_model.*``) matching the tiny SD2 UNet.

    Zero-convs are random, not zero, so the control visibly changes the result."""
    from comfy.cldm.cldm import ControlNet

    cfg = tiny_sd2_unet_config()
    cfg.pop("out_channels")
    net = init_weights_(ControlNet(**cfg, hint_channels=3, dtype=torch.float32, device="cpu"), seed)
    return _save({f"control_model.{k}": v for k, v in net.state_dict().items()}, path, dtype)


#: tiny DiTs that read tiny_dit_clip's encoders: FLUX.1 (T5 48 wide as the sequence, CLIP-L 64 pooled) and
#: SD3 (the 4096-wide joint sequence, CLIP-L + CLIP-G pooled 160)
TINY_FLUX_CONFIG = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": SDXL_L_WIDTH,
                    "context_in_dim": 48, "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 2, "depth": 2,
                    "depth_single_blocks": 2, "axes_dim": [8, 12, 12], "theta": 10000, "patch_size": 2,
                    "qkv_bias": True, "guidance_embed": True}
TINY_SD3_CONFIG = {"in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 2, "input_size": None,
                   "adm_in_channels": SDXL_L_WIDTH + SDXL_G_WIDTH, "num_patches": 256, "pos_embed_max_size": 16,
                   "context_embedder_config": {"target": "torch.nn.Linear",
                                               "params": {"in_features": 4096, "out_features": 128}},
                   "pos_embed_scaling_factor": None}


def tiny_dit_model(kind: str, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                   manual_cast: torch.dtype | None = None, **config):
    """A ``ModelPatcher`` over a real ComfyUI FLUX.1 ("flux") or SD3 ("sd3") model with tiny widths, seeded,
    on the CPU; ``config`` overrides the tiny config (e.g. ``guidance_embed=False`` for a schnell layout).
    ``dtype=torch.float8_e4m3fn, manual_cast=torch.float32``: fp8 weights cast per layer, as ComfyUI runs
    fp8 checkpoints."""
    import comfy.model_patcher
    import comfy.supported_models

    if kind == "flux":
        import dataclasses

        import comfy.ldm.flux.model

        fields = {f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}
        extra = {"txt_ids_dims": []} if "txt_ids_dims" in fields else {}  # ComfyUI 0.33's FLUX.1 detection sets []
        model_config = comfy.supported_models.Flux({**TINY_FLUX_CONFIG, **extra, **config})
    elif kind == "sd3":
        model_config = comfy.supported_models.SD3({**TINY_SD3_CONFIG, **config})
    else:
        raise ValueError(f"kind must be 'flux' or 'sd3', got {kind!r}")
    model_config.set_inference_dtype(dtype, manual_cast)
    model = model_config.get_model({})
    init_weights_(model.diffusion_model, seed)  # drawn in float32, stored in ``dtype``
    with torch.no_grad():  # RMSNorm/QKNorm gains are named "scale": ones, like the other norms' weights
        for name, p in model.diffusion_model.named_parameters():
            if p.ndim == 1 and name.endswith("scale"):
                p.fill_(1.0)
        gen = _generator(seed + 7)
        for b in model.diffusion_model.buffers():  # SD3's pos_embed: a file holds it, here seeded
            if b.is_floating_point():
                b.copy_(torch.randn(b.shape, generator=gen) * 0.02)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def _tiny_vae16_state(seed: int) -> dict:
    from comfy.taesd.taesd import TAESD

    net = init_weights_(TAESD(latent_channels=16), seed)
    with torch.no_grad():  # weights ~N(0, 1/fan_in) with ReLUs shrink a signal over 20 convs: keep it alive
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.mul_(math.sqrt(2.0))
    return net.state_dict()


def tiny_vae16(seed: int = 1):
    """A real ``comfy.sd.VAE`` with 16 latent channels (a TAESD of FLUX.1/SD3's latent width), seeded."""
    import comfy.sd

    return comfy.sd.VAE(sd=_tiny_vae16_state(seed))


def write_tiny_vae16(path: str | Path, seed: int = 1) -> Path:
    """:func:`tiny_vae16` as a file that ``VAELoader`` loads (ComfyUI detects a TAESD by its keys)."""
    return _save(_tiny_vae16_state(seed), path, torch.float32)
