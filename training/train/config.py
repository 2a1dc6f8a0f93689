"""The experiment config: everything that decides what a training run computes.

One frozen dataclass, written as JSON into every checkpoint (``config.json``) and, hashed, into the
exported encoder's provenance. Where files go, how often to log and how many loader workers to
use are run flags (``python -m training.train --help``), not part of the experiment.

``from_dict`` refuses unknown fields (a typo would otherwise silently train with a default).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dreamid_core.errors import ConfigError
from dreamid_core.fileio import unknown_fields
from dreamid_core.identities.families import UNET_FAMILIES

MIXED_PRECISION = ("no", "bf16", "fp16")
LATENT_CACHE = ("off", "memory", "disk")
LR_SCHEDULES = ("constant", "cosine", "linear")

DEFAULT_TEMPLATES = (
    "a photo of S*",
    "a close-up photo of S*",
    "a portrait of S*",
    "a photo of S*, looking at the camera",
    "a face photo of S*",
    "a cropped photo of S*",
    "a good photo of S*",
    "a portrait photo of S*, high quality",
)


@dataclass(frozen=True)
class ExperimentConfig:
    # -- base model (frozen) ------------------------------------------------------------------
    base_model: str = ""  # local diffusers folder, or a .safetensors checkpoint (+ base_config)
    base_config: str | None = None  # diffusers config folder for a single-file base model
    family: str | None = None  # "sd1" | "sd2" | "sdxl"; None = detected from the files
    # -- ID encoder (EncoderConfig is derived from these and the base model's widths) -------------
    backbone_path: str | None = None  # arcface_torch model.pt / .safetensors
    random_backbone: bool = False  # True: randomly initialised backbone (tests, smoke runs only)
    backbone: dict[str, Any] | None = None  # BackboneConfig fields; None = read from backbone_path (or vit_s)
    num_tokens: int = 2  # k
    tap_layers: tuple[int, ...] | None = None  # None = the backbone's quarters (3, 6, 9, 12)
    hidden_dim: int = 1024
    trigger: str = "S*"
    # -- optimisation -------------------------------------------------------------------------------
    lr: float = 5e-5  # MLPs and feature norms
    backbone_lr: float | None = None  # None = backbone frozen; else fine-tuned in its own param group
    weight_decay: float = 0.01
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    lr_schedule: str = "constant"
    lr_warmup_steps: int = 0
    reg_weight: float = 1e-4  # lambda of lambda * sum_i ||s_i||_2 (batch mean)
    noise_offset: float = 0.0  # 0 = none
    batch_size: int = 8  # per process and micro-step
    gradient_accumulation_steps: int = 1
    max_steps: int = 60_000  # optimizer steps
    seed: int = 0
    mixed_precision: str = "bf16"  # "no" on CPU
    # -- data -------------------------------------------------------------------------------------------
    recon_dir: str | None = None  # folder of face photos (FFHQ-style), searched recursively
    edit_manifest: str | None = None  # JSONL written by `python -m training.build_dataset`
    recon_fraction: float = 0.5  # share of samples from recon_dir; the rest from edit_manifest
    resolution: int | None = None  # px; None = the base model's own size (512 SD1/SD2-base, 768 SD2-768, 1024 SDXL)
    prompt_templates: tuple[str, ...] = DEFAULT_TEMPLATES  # for recon photos; each contains the trigger
    detector: str = "mtcnn"  # face detector for aligning recon photos (dreamid_core.make_detector)
    min_face_size: int = 64  # px, short side of the detected face box; smaller faces are skipped
    cache_latents: str = "disk"  # "off" | "memory" | "disk"
    # -- checkpoints -------------------------------------------------------------------------------------
    checkpoint_every: int = 1000
    keep_checkpoints: int | None = 3  # newest N kept; None keeps all
    checkpoint_backbone: bool = True  # checkpoints' encoder file carries the backbone (nodes-loadable alone)
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes, copied into provenance

    def __post_init__(self) -> None:
        object.__setattr__(self, "adam_betas", tuple(float(b) for b in self.adam_betas))
        object.__setattr__(self, "prompt_templates", tuple(str(t) for t in self.prompt_templates))
        if self.tap_layers is not None:
            object.__setattr__(self, "tap_layers", tuple(int(t) for t in self.tap_layers))
        self.validate()

    def validate(self) -> None:
        def bad(name: str, hint: str) -> ConfigError:
            return ConfigError(f"ExperimentConfig.{name} = {getattr(self, name)!r}: {hint}")

        if self.family is not None and self.family not in UNET_FAMILIES:
            raise bad("family", "use 'sd1', 'sd2', 'sdxl' or null (detect); SD3, Flux and other transformer "
                                "models are not supported")
        for name in ("num_tokens", "hidden_dim", "batch_size", "gradient_accumulation_steps", "max_steps",
                     "checkpoint_every"):
            if int(getattr(self, name)) < 1:
                raise bad(name, "must be >= 1")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise bad("resolution", "must be a multiple of 8 (the VAE downsamples by 8)")
        if not self.lr > 0:
            raise bad("lr", "must be > 0 (5e-5 in the paper)")
        if self.backbone_lr is not None and not self.backbone_lr > 0:
            raise bad("backbone_lr", "must be > 0, or null to keep the backbone frozen")
        if self.backbone_lr is not None and not self.checkpoint_backbone:
            raise ConfigError(f"ExperimentConfig.backbone_lr = {self.backbone_lr} trains the face backbone, but "
                              "checkpoint_backbone is false: checkpoints (and so --resume and the export) would "
                              "carry the ORIGINAL backbone and lose the fine-tuned one. Set checkpoint_backbone: true, "
                              "or backbone_lr: null to keep the backbone frozen.")
        if self.reg_weight < 0 or self.weight_decay < 0 or self.noise_offset < 0:
            raise ConfigError(f"reg_weight ({self.reg_weight}), weight_decay ({self.weight_decay}) and noise_offset "
                              f"({self.noise_offset}) must be >= 0")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise bad("max_grad_norm", "must be > 0, or null for no clipping")
        if self.mixed_precision not in MIXED_PRECISION:
            raise bad("mixed_precision", f"choose one of {MIXED_PRECISION} ('no' on CPU)")
        if self.cache_latents not in LATENT_CACHE:
            raise bad("cache_latents", f"choose one of {LATENT_CACHE}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise bad("lr_schedule", f"choose one of {LR_SCHEDULES}")
        if not 0.0 <= self.recon_fraction <= 1.0:
            raise bad("recon_fraction", "must be in [0, 1] (share of reconstruction samples)")
        if not self.trigger.strip():
            raise bad("trigger", "must be a word such as 'S*'")
        if not self.prompt_templates:
            raise bad("prompt_templates", "give at least one, e.g. 'a photo of S*'")
        missing = [t for t in self.prompt_templates if self.trigger not in t]
        if missing:
            raise ConfigError(f"ExperimentConfig.prompt_templates {missing} do not contain the trigger "
                              f"{self.trigger!r}; every template must name it once, e.g. 'a photo of {self.trigger}'")
        if self.keep_checkpoints is not None and self.keep_checkpoints < 1:
            raise bad("keep_checkpoints", "must be >= 1, or null to keep every checkpoint")
        if self.backbone_path is None and not self.random_backbone:
            raise ConfigError("ExperimentConfig.backbone_path is null: give the arcface_torch ViT checkpoint "
                              "(model.pt) the encoder builds on, or set random_backbone: true (tests only)")
        if self.backbone_path is not None and self.random_backbone:
            raise ConfigError(f"ExperimentConfig has backbone_path {self.backbone_path!r} and random_backbone: "
                              "true; choose one")

    def resolved(self) -> ExperimentConfig:
        """This config with ``resolution`` set: the base model's own size when null, its UNet's sample
        size times the VAE's factor (512 for SD 1.x/2.x-base, 768 for SD 2.x-768 v-prediction, 1024 for
        SDXL; read from the base model's config files, no weights)."""
        if self.resolution is not None:
            return self
        from ..common.base_model import base_resolution

        return self.replace(resolution=base_resolution(self.base_model, family=self.family, config=self.base_config))

    def check_data(self) -> None:
        """The data fields agree with each other (called before training, not on every load)."""
        if not self.base_model:
            raise ConfigError("ExperimentConfig.base_model is empty: give a local diffusers folder (SD2.1-base in "
                              "the paper) or a .safetensors checkpoint plus base_config")
        if self.recon_fraction > 0 and not self.recon_dir:
            raise ConfigError(f"ExperimentConfig.recon_fraction = {self.recon_fraction} but recon_dir is null: "
                              "give a folder of face photos, or set recon_fraction to 0")
        if self.recon_fraction < 1 and not self.edit_manifest:
            raise ConfigError(f"ExperimentConfig.recon_fraction = {self.recon_fraction} but edit_manifest is null: "
                              "give the manifest.jsonl of `python -m training.build_dataset`, or set recon_fraction to 1.0 "
                              "(reconstruction only)")

    # -- (de)serialisation ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for key, value in d.items():
            if isinstance(value, tuple):
                d[key] = list(value)
        return d

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    def config_hash(self) -> str:
        """sha256 (first 16 hex digits) of the canonical JSON: equal configs, equal hash."""
        return hashlib.sha256(self.to_json(indent=None).encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> ExperimentConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        unknown = unknown_fields(cls, data)
        if unknown:
            known = sorted(f.name for f in dataclasses.fields(cls))
            raise ConfigError(f"{source}: unknown fields {unknown}; known fields are {known}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise ConfigError(f"{source}: {exc}") from exc

    @classmethod
    def from_json(cls, text: str, source: str = "config") -> ExperimentConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{source} is not valid JSON ({exc})") from exc
        return cls.from_dict(data, source)

    @classmethod
    def load(cls, path: str | Path) -> ExperimentConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}; the paper's recipes ship as "
                                    "training/configs/*.json (copy one and edit its paths)")
        return cls.from_json(path.read_text(), source=str(path))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_json() + "\n")
        return path

    def replace(self, **changes: Any) -> ExperimentConfig:
        return dataclasses.replace(self, **changes)

    def differences(self, other: ExperimentConfig) -> dict[str, tuple[Any, Any]]:
        """Fields whose values differ: ``{name: (self's, other's)}``."""
        a, b = self.to_dict(), other.to_dict()
        return {k: (a[k], b[k]) for k in a if a[k] != b[k]}


@dataclass
class RunFlags:
    """How to run (not what to compute): paths, resumption, logging, loader workers. Not hashed, not
    written into checkpoints: a resumed run may change any of these."""

    output_dir: str
    resume: bool = False
    max_steps: int | None = None  # overrides the config's max_steps (the schedule's horizon)
    stop_after_step: int | None = None  # stop (after a checkpoint) at this step; the schedule is unchanged
    cache_dir: str | None = None  # face crops and latents; default <output_dir>/cache
    log_every: int = 10
    num_workers: int = 2
    report_to: str = "tensorboard"  # "tensorboard" | "none"
    channels_last: bool = False
    compile_unet: bool = False  # torch.compile the UNet (GPU; results no longer bit-identical to eager)
    progress: bool = True
    # collectives wait this long for the slowest rank (NCCL's default, 10 min, is shorter than aligning a
    # big recon folder's shard or a slow checkpoint write on a network disk)
    process_group_timeout_min: float = 180.0
    skip_steps: tuple[int, ...] = ()  # these steps draw their samples and drop them (after a divergence)
    allow_batch_change: bool = False  # resume even though the global batch differs from the checkpoint's
