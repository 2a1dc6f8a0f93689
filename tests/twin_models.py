"""One tiny seeded model, loaded twice: by diffusers/transformers (the command line's host) and by
ComfyUI (the node's host), with the same weights, for the learner contract tests.

The diffusers side is built from config (:mod:`tiny_diffusers`' tokenizer); ComfyUI gets its weights
through ComfyUI's own converters: the UNet's keys by ``comfy.utils.unet_to_diffusers`` (an ldm
``unet_config`` written here to match the diffusers config: ComfyUI cannot detect a tiny config from
a state dict), the VAE by ``comfy.sd.VAE`` (it converts a diffusers VAE itself; ComfyUI only builds SD's
real VAE shape, 128-512 channels), the text encoders by key (ComfyUI's CLIP uses transformers' names).

- ``twin("sd1" | "sdxl", seed)`` -> :class:`Twin` with ``base`` (``training.common.base_model.BaseModel``)
  and ``model``, ``clip``, ``vae`` (ComfyUI ModelPatcher, CLIP, VAE; loaded under inference mode as
  ComfyUI loads checkpoints). Import ComfyUI first (``comfy_env.import_comfyui``).
- ``save_diffusers(twin, folder)``: the diffusers side as a pipeline folder (for ``training.learn_identity``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from comfy_tiny import init_weights_, tiny_clip
from tiny_diffusers import clip_tokenizer

SD1_CLIP = 64
SDXL_L, SDXL_G = 64, 96
TIME_EMBED = 256  # ComfyUI's SDXL size embedder is Timestep(256)


@dataclass
class Twin:
    family: str
    base: Any  # training.common.base_model.BaseModel
    model: Any  # comfy ModelPatcher
    clip: Any  # comfy.sd.CLIP
    vae: Any  # comfy.sd.VAE
    pipe: Any  # the diffusers pipeline object (for save_pretrained)


def _unet_configs(family: str) -> tuple[dict, dict]:
    """(diffusers UNet2DConditionModel kwargs, ComfyUI ldm unet_config) of the same tiny UNet."""
    if family == "sd1":
        ctx = SD1_CLIP
        diff = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=ctx,
                    attention_head_dim=4, norm_num_groups=32)
        ldm = {"image_size": 8, "in_channels": 4, "out_channels": 4, "model_channels": 32, "num_res_blocks": [1, 1],
               "channel_mult": [1, 2], "transformer_depth": [1, 0], "transformer_depth_output": [1, 1, 0, 0],
               "transformer_depth_middle": 1, "context_dim": ctx, "use_linear_in_transformer": False,
               "num_heads": 4, "num_head_channels": -1, "use_spatial_transformer": True, "legacy": False,
               "adm_in_channels": None, "use_checkpoint": False, "use_temporal_resblock": False,
               "use_temporal_attention": False}
        return diff, ldm
    ctx = SDXL_L + SDXL_G
    diff = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=ctx, attention_head_dim=4,
                norm_num_groups=32, use_linear_projection=True, addition_embed_type="text_time",
                addition_time_embed_dim=TIME_EMBED, projection_class_embeddings_input_dim=SDXL_G + 6 * TIME_EMBED)
    ldm = {"image_size": 8, "in_channels": 4, "out_channels": 4, "model_channels": 32, "num_res_blocks": [1, 1],
           "channel_mult": [1, 2], "transformer_depth": [0, 1], "transformer_depth_output": [0, 0, 1, 1],
           "transformer_depth_middle": 1, "context_dim": ctx, "use_linear_in_transformer": True, "num_heads": 4,
           "num_head_channels": -1, "use_spatial_transformer": True, "legacy": False,
           "adm_in_channels": SDXL_G + 6 * TIME_EMBED, "num_classes": "sequential", "use_checkpoint": False,
           "use_temporal_resblock": False, "use_temporal_attention": False}
    return diff, ldm


def _hf_text(comfy_text_model, width: int, act: str, projection: bool):
    """A transformers CLIP text model with the ComfyUI tower's weights."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    sd = comfy_text_model.state_dict()
    layers = len({k.split(".")[3] for k in sd if k.startswith("text_model.encoder.layers.")})
    inter = sd["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=width // 32 if width % 32 == 0 else 1, max_position_embeddings=77,
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_act=act,
                         projection_dim=width, layer_norm_eps=1e-5)
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)
    keep = {k: v.float() for k, v in sd.items()
            if k.startswith("text_model.") or (projection and k == "text_projection.weight")}
    if not any(k.startswith("text_model.") for k in model.state_dict()):  # transformers 5 names them without it
        keep = {k.removeprefix("text_model."): v for k, v in keep.items()}
    missing, unexpected = model.load_state_dict(keep, strict=False)
    missing = [k for k in missing if "position_ids" not in k]
    assert not missing and not unexpected, (missing, unexpected)
    return model.eval()


def twin(family: str, seed: int = 0) -> Twin:
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models
    import comfy.utils
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from training.common.base_model import BaseModel

    diff_cfg, ldm_cfg = _unet_configs(family)
    torch.manual_seed(seed)
    unet = init_weights_(UNet2DConditionModel(**diff_cfg), seed).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=2, norm_num_groups=32, sample_size=64,
                        scaling_factor=0.18215 if family == "sd1" else 0.13025).eval()
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                          prediction_type="epsilon", clip_sample=False, steps_offset=1)
    with torch.inference_mode():
        clip = tiny_clip(family, (SDXL_L, SDXL_G) if family == "sdxl" else SD1_CLIP, seed=seed + 1, dtype=torch.float32)
        config = (comfy.supported_models.SD15 if family == "sd1" else comfy.supported_models.SDXL)(dict(ldm_cfg))
        config.unet_config.update(num_heads=ldm_cfg["num_heads"], num_head_channels=-1)
        config.set_inference_dtype(torch.float32, None)
        model = config.get_model({})
        to_ldm = comfy.utils.unet_to_diffusers(config.unet_config)
        sd = {to_ldm[k]: v for k, v in unet.state_dict().items()}
        model.diffusion_model.load_state_dict(sd, strict=True)
        cpu = torch.device("cpu")
        patcher = comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)
        comfy_vae = comfy.sd.VAE(sd=vae.state_dict())
    cm = clip.cond_stage_model
    if family == "sd1":
        from diffusers import StableDiffusionPipeline

        te = [_hf_text(cm.clip_l.transformer, SD1_CLIP, "quick_gelu", False)]
        toks = [clip_tokenizer()]
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=te[0], tokenizer=toks[0], unet=unet, scheduler=sched,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    else:
        from diffusers import StableDiffusionXLPipeline

        te = [_hf_text(cm.clip_l.transformer, SDXL_L, "quick_gelu", False),
              _hf_text(cm.clip_g.transformer, SDXL_G, "gelu", True)]
        toks = [clip_tokenizer(), clip_tokenizer("!")]
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te[0], text_encoder_2=te[1], tokenizer=toks[0],
                                         tokenizer_2=toks[1], unet=unet, scheduler=sched)
    base = BaseModel(family=family, unet=unet, vae=vae, text_encoders=te, tokenizers=toks, noise_scheduler=sched,
                     source="twin")
    return Twin(family, base, patcher, clip, comfy_vae, pipe)


def save_diffusers(tw: Twin, folder: Path) -> Path:
    tw.pipe.save_pretrained(str(folder))
    return folder
