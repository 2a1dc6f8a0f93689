"""Tiny, seeded stand-ins of the real models, built from config and saved like the real ones.

- a real CLIP BPE tokenizer (vocab from the open-clip-torch wheel's bpe_simple_vocab_16e6.txt.gz),
- a local diffusers "base model" folder (SD1/SD2/SDXL layout) with a tiny UNet, VAE, text encoder(s),
- a tiny transformers CLIPModel folder (for CLIP scores),
- a tiny arcface_torch-style ViT checkpoint (a plain state dict ``.pt``).
"""

from __future__ import annotations

import gzip
import importlib.metadata as md
import json
from functools import lru_cache
from pathlib import Path

import torch

from dreamid_core import BackboneConfig, FaceViT

TINY_TEXT_WIDTH = 32
TINY_TEXT_WIDTH_G = 48
TINY_IMAGE = 32  # px; the VAE halves it once -> 16x16 latents


def bpe_vocab_path() -> Path | None:
    try:
        dist = md.distribution("open_clip_torch")
    except md.PackageNotFoundError:
        return None
    path = Path(dist.locate_file("open_clip/bpe_simple_vocab_16e6.txt.gz"))
    return path if path.is_file() else None


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def write_clip_tokenizer(folder: Path) -> Path:
    """vocab.json + merges.txt of OpenAI CLIP's BPE (49408 tokens), from the open-clip wheel."""
    src = bpe_vocab_path()
    if src is None:
        raise RuntimeError("open-clip-torch is not installed (pip install --no-deps open-clip-torch)")
    lines = gzip.open(src).read().decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]
    base = list(_bytes_to_unicode().values())
    vocab = base + [v + "</w>" for v in base] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({v: i for i, v in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder


@lru_cache(maxsize=4)
def clip_tokenizer(pad: str = "<|endoftext|>"):
    import tempfile

    from transformers import CLIPTokenizer

    folder = write_clip_tokenizer(Path(tempfile.mkdtemp(prefix="clip_tok_")))
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token=pad, model_max_length=77)


def _text_config(width: int, projection: int | None = None):
    from transformers import CLIPTextConfig

    kw = dict(vocab_size=49408, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
              pad_token_id=49407, hidden_act="quick_gelu")
    if projection:
        kw["projection_dim"] = projection
    return CLIPTextConfig(**kw)


def make_tiny_sd(folder: Path, family: str = "sd2", *, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """A diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    sdxl = family == "sdxl"
    ctx = TINY_TEXT_WIDTH + (TINY_TEXT_WIDTH_G if sdxl else 0)
    unet_kw = dict(sample_size=TINY_IMAGE // 2, in_channels=4, out_channels=4, layers_per_block=1,
                   block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=ctx,
                   attention_head_dim=8, norm_num_groups=8)
    if family == "sd2":
        unet_kw["use_linear_projection"] = True
    if sdxl:
        unet_kw.update(addition_embed_type="text_time", addition_time_embed_dim=8,
                       projection_class_embeddings_input_dim=8 * 6 + TINY_TEXT_WIDTH_G)
    unet = UNet2DConditionModel(**unet_kw)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=TINY_IMAGE)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, prediction_type=prediction_type, clip_sample=False, steps_offset=1)
    tok = clip_tokenizer()
    folder.mkdir(parents=True, exist_ok=True)
    if sdxl:
        from diffusers import StableDiffusionXLPipeline

        te1 = CLIPTextModel(_text_config(TINY_TEXT_WIDTH))
        te2 = CLIPTextModelWithProjection(_text_config(TINY_TEXT_WIDTH_G, projection=TINY_TEXT_WIDTH_G))
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok,
                                         tokenizer_2=clip_tokenizer("!"), unet=unet, scheduler=scheduler)
    else:
        from diffusers import StableDiffusionPipeline

        te = CLIPTextModel(_text_config(TINY_TEXT_WIDTH))
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok if family == "sd1" else
                                       clip_tokenizer("!"), unet=unet, scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(folder))
    return folder


def make_tiny_clip_model(folder: Path, seed: int = 0) -> Path:
    """A transformers CLIPModel folder (tiny text + vision towers) with the real tokenizer."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=16)
    cfg = CLIPConfig(text_config=_text_config(32).to_dict(), vision_config=vision.to_dict(), projection_dim=16)
    model = CLIPModel(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    write_clip_tokenizer(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77, "pad_token": "<|endoftext|>"}))
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "crop_size": {"height": 32, "width": 32},
        "size": {"shortest_edge": 32}, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "image_mean": [0.4815, 0.4578, 0.4082], "image_std": [0.2686, 0.2613, 0.2758], "resample": 3}))
    return folder


def tiny_backbone_config(cls_token: bool = False) -> BackboneConfig:
    return BackboneConfig(image_size=112, patch_size=28, width=32, depth=4, num_heads=4, num_features=24,
                          cls_token=cls_token)


def make_tiny_arcface(path: Path, seed: int = 0, cls_token: bool = False) -> Path:
    """An arcface_torch-style plain state dict saved with torch.save (what model.pt files are)."""
    torch.manual_seed(seed)
    model = FaceViT(tiny_backbone_config(cls_token)).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path
