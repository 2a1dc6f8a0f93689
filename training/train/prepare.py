"""Build what a run needs from its :class:`~training.train.config.ExperimentConfig`: the frozen base model,
the ID encoder (frozen backbone unless ``backbone_lr``), the optimizer, and the data."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from dreamid_core import BackboneConfig, EncoderConfig, IDEncoder, load_arcface_backbone
from dreamid_core.errors import ConfigError

from ..common.base_model import BaseModel, load_base_model
from ..common.latents import LatentCache, vae_identity
from .config import ExperimentConfig
from .data import DataReport, FaceItem, TrainingData, load_edit_manifest, write_report
from .recon import align_recon, collect_recon
from .sampler import MixSampler

logger = logging.getLogger(__name__)

_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def weight_dtype_for(mixed_precision: str) -> torch.dtype:
    """dtype of the frozen UNet and text encoders (the trained encoder always stays float32)."""
    return _DTYPES[mixed_precision]


def load_base(cfg: ExperimentConfig, device: torch.device | str, dtype: torch.dtype = torch.float32, *,
              channels_last: bool = False) -> BaseModel:
    """The frozen base model on ``device``: UNet and text encoders in ``dtype``, the VAE in float32
    (it runs once per image when latents are cached, and SD's VAE is unstable in fp16)."""
    base = load_base_model(cfg.base_model, family=cfg.family, config=cfg.base_config)
    base.freeze()
    for module, want in [(base.unet, dtype), *((te, dtype) for te in base.text_encoders), (base.vae, torch.float32)]:
        current = next(module.parameters()).dtype
        module.to(device=device, dtype=None if current == want else want)  # no cast, no diffusers warning
    if channels_last:
        base.unet.to(memory_format=torch.channels_last)
    return base


def backbone_config(cfg: ExperimentConfig) -> BackboneConfig | None:
    """The config's ``backbone`` dict as a BackboneConfig (``{"preset": "vit_s", ...}`` accepted)."""
    if cfg.backbone is None:
        return None
    fields = dict(cfg.backbone)
    try:
        if "preset" in fields:
            return BackboneConfig.preset(fields.pop("preset"), **fields)
        return BackboneConfig(**fields)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"ExperimentConfig.backbone = {cfg.backbone!r}: {exc}") from exc


def build_encoder(cfg: ExperimentConfig, base: BaseModel) -> IDEncoder:
    """IDEncoder for the base model's text encoder widths, seeded by ``cfg.seed``; backbone loaded
    from ``backbone_path`` (or random) and frozen unless ``backbone_lr`` is set."""
    bb_config = backbone_config(cfg)
    backbone = None
    if cfg.backbone_path is not None:
        backbone = load_arcface_backbone(cfg.backbone_path, bb_config)
        bb_config = backbone.config
    bb_config = bb_config or BackboneConfig()
    taps = cfg.tap_layers or bb_config.default_taps()
    enc_config = EncoderConfig(backbone=bb_config, target=base.family, token_widths=tuple(base.widths.items()),
                               num_tokens=cfg.num_tokens, tap_layers=taps, hidden_dim=cfg.hidden_dim)
    generator_state = torch.get_rng_state()
    torch.manual_seed(cfg.seed)
    encoder = IDEncoder(enc_config)
    torch.set_rng_state(generator_state)
    if backbone is not None:
        encoder.backbone.load_state_dict(backbone.state_dict())
    encoder.backbone.mask_token.requires_grad_(False)  # unused in forward (arcface's masking); DDP needs all used
    if cfg.backbone_lr is None:
        encoder.freeze_backbone()
    encoder.train()
    n_train = sum(p.numel() for p in encoder.parameters() if p.requires_grad)
    logger.info("ID encoder for %s %s: k=%d, taps %s, %.2fM trainable parameters (backbone %s)", base.family,
                dict(enc_config.token_widths), cfg.num_tokens, taps, n_train / 1e6,
                "trained" if cfg.backbone_lr else "frozen")
    return encoder


def build_optimizer(cfg: ExperimentConfig, encoder: IDEncoder) -> torch.optim.AdamW:
    """AdamW: MLPs + feature norms at ``lr``; the backbone at ``backbone_lr`` when it trains."""
    head = [p for n, p in encoder.named_parameters() if not n.startswith("backbone.") and p.requires_grad]
    groups = [{"params": head, "lr": cfg.lr, "name": "projection"}]
    if cfg.backbone_lr is not None:
        groups.append({"params": [p for p in encoder.backbone.parameters() if p.requires_grad],
                       "lr": cfg.backbone_lr, "name": "backbone"})
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps,
                             weight_decay=cfg.weight_decay)


def lr_factor(step: int, *, schedule: str, warmup: int, total: int) -> float:
    factor = min(1.0, (step + 1) / warmup) if warmup else 1.0
    progress = min(1.0, max(0, step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        factor *= 0.5 * (1.0 + math.cos(math.pi * progress))
    elif schedule == "linear":
        factor *= 1.0 - progress
    return factor


def build_lr_scheduler(cfg: ExperimentConfig, optimizer: torch.optim.Optimizer):
    fn = partial(lr_factor, schedule=cfg.lr_schedule, warmup=cfg.lr_warmup_steps, total=cfg.max_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


@dataclass
class TrainData:
    dataset: TrainingData
    sampler: MixSampler
    latents: LatentCache
    reports: list[DataReport]


def build_data(cfg: ExperimentConfig, base: BaseModel, *, cache_dir: Path, report_path: Path | None,
               crop_size: int = 112, detector=None, device: torch.device | str = "cpu",
               align_faces: bool = True) -> TrainData:
    """Datasets, sampler and latent cache. ``crop_size``: the face backbone's input size; ``detector``:
    a FaceDetector to use instead of ``cfg.detector`` (built on ``device`` when photos need aligning).
    ``align_faces`` False: the recon photos were aligned by :func:`align_faces` (every rank its shard)."""
    items: dict[str, list[FaceItem]] = {"recon": [], "edit": []}
    reports = []
    if cfg.recon_dir and cfg.recon_fraction > 0:
        if align_faces:
            align_recon(cfg.recon_dir, cache_dir / "faces", crop_size=crop_size, min_face_size=cfg.min_face_size,
                        detector=detector or cfg.detector, detector_device=str(device))
        items["recon"], rep = collect_recon(cfg.recon_dir, cache_dir / "faces", crop_size=crop_size,
                                            min_face_size=cfg.min_face_size, detector=detector or cfg.detector)
        reports.append(rep)
    if cfg.edit_manifest and cfg.recon_fraction < 1:
        items["edit"], rep = load_edit_manifest(cfg.edit_manifest, trigger=cfg.trigger, crop_size=crop_size)
        reports.append(rep)
    if report_path is not None:
        write_report(reports, report_path)
    latents = LatentCache(cfg.cache_latents, resolution=cfg.resolution, folder=cache_dir / "latents",
                          vae_id=vae_identity(base.vae, base.source))
    dataset = TrainingData(items, resolution=cfg.resolution, crop_size=crop_size, templates=cfg.prompt_templates,
                           latent_key=latents.item_key,
                           cached_latent=latents.load_disk if cfg.cache_latents == "disk" else None)
    sampler = MixSampler(sizes=dataset.sizes(), recon_fraction=cfg.recon_fraction, seed=cfg.seed,
                         num_templates=len(cfg.prompt_templates))
    return TrainData(dataset=dataset, sampler=sampler, latents=latents, reports=reports)


def align_faces(cfg: ExperimentConfig, *, cache_dir: Path, crop_size: int, shard: int, num_shards: int,
                device: torch.device | str = "cpu", progress: bool = False, detector=None) -> None:
    """This process's shard of the recon folder's face alignment (nothing to do without recon data)."""
    if cfg.recon_dir and cfg.recon_fraction > 0:
        align_recon(cfg.recon_dir, cache_dir / "faces", crop_size=crop_size, min_face_size=cfg.min_face_size,
                    detector=detector or cfg.detector, detector_device=str(device), shard=shard,
                    num_shards=num_shards, progress=progress)
