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
from dreamid_core.identities.families import UNET_FAMILIES

logger = logging.getLogger(__name__)

FAMILIES = UNET_FAMILIES
SUPPORTED = "sd1 (Stable Diffusion 1.x), sd2 (2.x, 2.1-base in the paper), sdxl (SDXL base 1.0)"
#: the family's usual size, when a model's own (:func:`native_resolution`) cannot be read from its configs
DEFAULT_RESOLUTION = {"sd1": 512, "sd2": 512, "sdxl": 1024}
_SD_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline")
_SDXL_PIPELINES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline")
#: UNets that take more than the 4 noisy latent channels (inpainting: + mask + masked image; instruct-pix2pix:
#: + image); the trainer and the evaluation feed 4 and would crash in the first UNet call
_CONDITIONED_UNETS = {"StableDiffusionInpaintPipeline": "an inpainting", "StableDiffusionXLInpaintPipeline":
                      "an inpainting", "StableDiffusionInstructPix2PixPipeline": "an instruct-pix2pix",
                      "StableDiffusionXLInstructPix2PixPipeline": "an instruct-pix2pix"}


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
    _check_unet_inputs(_read_json(folder / "unet" / "config.json").get("in_channels", 4), folder, name)
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


def _read_json(path: Path) -> dict[str, Any]:
    """A config file's JSON object, or {} when it is missing or unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _check_unet_inputs(in_channels: Any, folder: Path | str, name: str = "") -> None:
    """Refuse a UNet that needs more than the noisy latents (an inpainting model's 9 input channels)."""
    kind = _CONDITIONED_UNETS.get(name)
    if kind is None and in_channels == 4:
        return
    kind = kind or ("an inpainting" if in_channels == 9 else "a conditioned")
    raise ModelFilesError(
        f"{folder} is {kind} model ({name or 'pipeline'}, its UNet takes {in_channels} input channels, not the 4 "
        f"latent channels of a text-to-image model). DreamIdentity trains and samples text-to-image UNets: use the "
        f"text-to-image base model this one was made from (e.g. stable-diffusion-2-1-base rather than "
        f"stable-diffusion-2-inpainting). Supported: {SUPPORTED}.")


def native_resolution(folder: str | Path, family: str) -> int:
    """A model's own image size from its config files (no weights): the UNet's ``sample_size`` times the
    VAE's factor (2 per down block after the first). 512 for SD 1.x and 2.x-base, 768 for SD 2.x-768 (the
    v-prediction models), 1024 for SDXL; the family's usual size when the configs do not say."""
    folder = Path(folder)
    sample = _read_json(folder / "unet" / "config.json").get("sample_size")
    blocks = _read_json(folder / "vae" / "config.json").get("block_out_channels")
    if isinstance(sample, list):  # [height, width] in some configs
        sample = sample[0] if sample and sample[0] == sample[-1] else None
    if not isinstance(sample, int) or sample < 1 or not isinstance(blocks, list) or not blocks:
        return DEFAULT_RESOLUTION[family]
    return sample * 2 ** (len(blocks) - 1)


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
    _check_unet_inputs(pipe.unet.config.in_channels, path)  # also when the family was given, not detected
    text_encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if fam == "sdxl" else [])
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if fam == "sdxl" else [])
    pipe.to(dtype=dtype)
    noise = d.DDPMScheduler.from_config(pipe.scheduler.config)
    base = BaseModel(family=fam, unet=pipe.unet, vae=pipe.vae, text_encoders=text_encoders, tokenizers=tokenizers,
                     noise_scheduler=noise, source=str(path))
    logger.info("loaded %s base model from %s (%s prediction)", fam, path, base.prediction_type)
    return base.freeze()


def base_resolution(base_model: str | Path, *, family: str | None = None, config: str | Path | None = None) -> int:
    """The native size (:func:`native_resolution`) of a base model folder, or of a single-file checkpoint's
    config folder."""
    fam = base_family(base_model, family=family, config=config)
    path = Path(base_model).expanduser()
    return native_resolution(Path(config) if path.is_file() else path, fam)


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
