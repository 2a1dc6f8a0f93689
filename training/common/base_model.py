"""The frozen base model (SD1.x, SD2.x — SD2.1-base by default — or SDXL) from local files only.

A diffusers folder (``model_index.json``) or a single ``.safetensors`` checkpoint with a local
diffusers config folder of the same architecture (``config``). Nothing is downloaded.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dreamid_core import MissingDependencyError, ModelFilesError

logger = logging.getLogger(__name__)

FAMILIES = ("sd1", "sd2", "sdxl")
SUPPORTED = "sd1 (Stable Diffusion 1.x), sd2 (2.x, 2.1-base in the paper), sdxl (SDXL base 1.0)"
#: training resolution when the config leaves ``resolution`` null: the family's native size
DEFAULT_RESOLUTION = {"sd1": 512, "sd2": 512, "sdxl": 1024}
_SD_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline")
_SDXL_PIPELINES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline",
                   "StableDiffusionXLInpaintPipeline")


def _diffusers():
    try:
        import diffusers
        import transformers  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError(f"training needs the 'train' extra ({exc}): pip install -e '.[train]'") from exc
    return diffusers


@dataclass
class BaseModel:
    family: str
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list[torch.nn.Module]
    tokenizers: list[Any]
    noise_scheduler: Any
    source: str

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    @property
    def widths(self) -> dict[str, int]:
        """S* part key -> text-encoder word-embedding width (what the ID encoder must produce)."""
        from .prompt_encoding import PART_FOR_ENCODER

        return {key: te.get_input_embeddings().weight.shape[1]
                for key, te in zip(PART_FOR_ENCODER[self.family], self.text_encoders, strict=True)}

    @property
    def vae_scale(self) -> float:
        return float(self.vae.config.scaling_factor)

    def freeze(self) -> BaseModel:
        for m in [self.unet, self.vae, *self.text_encoders]:
            m.requires_grad_(False)
            m.eval()
        return self

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> BaseModel:
        for m in [self.unet, self.vae, *self.text_encoders]:
            m.to(device=device, dtype=dtype)
        return self

    def pipeline(self, scheduler: str = "ddim"):
        """A diffusers pipeline over these components (no safety checker; DDIM by default)."""
        d = _diffusers()
        sched_cls = {"ddim": d.DDIMScheduler, "ddpm": d.DDPMScheduler, "euler": d.EulerDiscreteScheduler}[scheduler]
        sched = sched_cls.from_config(self.noise_scheduler.config)
        if self.family == "sdxl":
            return d.StableDiffusionXLPipeline(vae=self.vae, text_encoder=self.text_encoders[0],
                                               text_encoder_2=self.text_encoders[1], tokenizer=self.tokenizers[0],
                                               tokenizer_2=self.tokenizers[1], unet=self.unet, scheduler=sched)
        return d.StableDiffusionPipeline(vae=self.vae, text_encoder=self.text_encoders[0], tokenizer=self.tokenizers[0],
                                         unet=self.unet, scheduler=sched, safety_checker=None, feature_extractor=None,
                                         requires_safety_checker=False)


def detect_family(folder: str | Path) -> str:
    """``sd1`` | ``sd2`` | ``sdxl`` from a diffusers folder's config files; anything else (SD3, Flux, a
    video model) is refused with the list of supported families."""
    folder = Path(folder)
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise ModelFilesError(f"{folder} has no model_index.json: not a diffusers folder. Expected unet/, vae/, "
                              "text_encoder/, tokenizer/, scheduler/ and model_index.json of one of: " + SUPPORTED)
    try:
        index = json.loads(index_path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelFilesError(f"{index_path} is not valid JSON ({exc})") from exc
    name = index.get("_class_name", "")
    if name in _SDXL_PIPELINES:
        return "sdxl"
    if name not in _SD_PIPELINES or not (folder / "text_encoder" / "config.json").is_file() \
            or not (folder / "unet").is_dir():
        raise ModelFilesError(f"{folder} is a {name or 'unnamed'} model (model_index.json, components "
                              f"{sorted(k for k in index if not k.startswith('_'))}); DreamIdentity trains only on "
                              f"UNet + CLIP text encoder models: {SUPPORTED}. Use such a base model, or set family "
                              "explicitly if this folder is one of them with a renamed pipeline class.")
    te = json.loads((folder / "text_encoder" / "config.json").read_text())
    width = te.get("hidden_size")
    if width == 768:
        return "sd1"
    if width == 1024:
        return "sd2"
    unet = json.loads((folder / "unet" / "config.json").read_text())
    return "sd2" if unet.get("use_linear_projection") else "sd1"


def load_base_model(path: str | Path, *, family: str | None = None, config: str | Path | None = None,
                    dtype: torch.dtype = torch.float32) -> BaseModel:
    """Load and freeze the base model's UNet, VAE, text encoder(s), tokenizer(s), noise scheduler."""
    d = _diffusers()
    if family is not None and family not in FAMILIES:
        raise ModelFilesError(f"family {family!r} is not supported; choose one of {SUPPORTED}")
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelFilesError(f"base model not found: {path}. Give a local diffusers folder (with "
                              "model_index.json) or a .safetensors checkpoint plus --base-config.")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ModelFilesError(f"{path.name}: only .safetensors checkpoints are loaded (pickled .ckpt files "
                                  "can run code); convert it or use a diffusers folder.")
        if config is None:
            raise ModelFilesError(f"{path.name} is a single-file checkpoint: also give --base-config, a local "
                                  "diffusers folder of the same architecture (no hub is reachable).")
        fam = family or detect_family(Path(config))
        cls = d.StableDiffusionXLPipeline if fam == "sdxl" else d.StableDiffusionPipeline
        pipe = cls.from_single_file(str(path), config=str(config), local_files_only=True)
    else:
        fam = family or detect_family(path)
        cls = d.StableDiffusionXLPipeline if fam == "sdxl" else d.StableDiffusionPipeline
        kw = {} if fam == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
        pipe = cls.from_pretrained(str(path), local_files_only=True, **kw)
    text_encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if fam == "sdxl" else [])
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if fam == "sdxl" else [])
    pipe.to(dtype=dtype)
    noise = d.DDPMScheduler.from_config(pipe.scheduler.config)
    base = BaseModel(family=fam, unet=pipe.unet, vae=pipe.vae, text_encoders=text_encoders, tokenizers=tokenizers,
                     noise_scheduler=noise, source=str(path))
    logger.info("loaded %s base model from %s (%s prediction)", fam, path, base.prediction_type)
    return base.freeze()


def base_family(base_model: str | Path, *, family: str | None = None, config: str | Path | None = None) -> str:
    """The family of a base model from its config files only (no weights loaded)."""
    if family is not None:
        return family
    path = Path(base_model).expanduser()
    if path.is_file():
        if config is None:
            raise ModelFilesError(f"{path.name} is a single-file checkpoint: also give base_config, a local diffusers "
                                  "folder of the same architecture (no hub is reachable).")
        return detect_family(Path(config))
    if not path.exists():
        raise ModelFilesError(f"base model not found: {path}. Give a local diffusers folder (with model_index.json) "
                              "or a .safetensors checkpoint plus base_config.")
    return detect_family(path)
