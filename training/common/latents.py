"""VAE latents of the training images, encoded once and reused ("memory" or "disk"), or every step ("off").

A latent is ``vae.encode(x).latent_dist.mode() * scaling_factor`` (the mean, not a sample), in
float32, so cached and uncached training see the same numbers. With caching on, each image is
encoded on its own (batch of one): its latent then depends on nothing but the image, and a
resumed run that re-encodes it (memory cache, new process) gets the same bits as the first run.

Disk entries live under ``<cache_dir>/<key[:2]>/<key>.safetensors``; the key hashes the image
file (path, size, mtime), the resolution and the VAE (its source and config), so a different
base model or resolution never reads stale latents.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from dreamid_core import DreamIDError
from dreamid_core.errors import ConfigError
from dreamid_core.fileio import atomic_write

logger = logging.getLogger(__name__)


def vae_identity(vae: torch.nn.Module, source: str) -> str:
    config = json.dumps(dict(vae.config), sort_keys=True, default=str) if hasattr(vae, "config") else ""
    return hashlib.sha1(f"{source}|{config}".encode()).hexdigest()[:16]


@torch.no_grad()
def encode_latents(vae: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """Images ``[B, 3, H, W]`` in -1..1 -> latents ``[B, C, H/8, W/8]`` float32 (scaled)."""
    param = next(vae.parameters())
    dist = vae.encode(pixels.to(param.device, param.dtype)).latent_dist
    latents = dist.mode().float()
    shift = getattr(vae.config, "shift_factor", None)
    if shift:
        latents = latents - shift
    return latents * float(vae.config.scaling_factor)


class NonFiniteLatentError(DreamIDError, ValueError):
    """The VAE gave NaN or inf for a training image; it is not cached and the run stops."""


class LatentCache:
    """``mode``: "off" (encode every step), "memory" (per process) or "disk" (``folder``)."""

    def __init__(self, mode: str, *, resolution: int, vae_id: str, folder: str | Path | None = None) -> None:
        if mode not in ("off", "memory", "disk"):
            raise ConfigError(f"latent cache mode must be 'off', 'memory' or 'disk', got {mode!r}")
        if mode == "disk" and folder is None:
            raise ValueError("the disk latent cache needs a folder")
        self.mode = mode
        self.resolution = resolution
        self.vae_id = vae_id
        self.folder = Path(folder) if folder is not None else None
        self.memory: dict[str, torch.Tensor] = {}
        self.hits = 0
        self.encoded = 0

    def key(self, image_id: str) -> str:
        return hashlib.sha1(f"{image_id}|{self.resolution}|{self.vae_id}".encode()).hexdigest()

    def item_key(self, item) -> str:
        """The key of a :class:`~training.train.data.FaceItem`'s target image."""
        return self.key(item.image_id)

    def __getstate__(self) -> dict:  # DataLoader workers (spawn) get the settings, not the memory cache
        return {**self.__dict__, "memory": {}}

    def _path(self, key: str) -> Path:
        assert self.folder is not None
        return self.folder / key[:2] / f"{key}.safetensors"

    def load_disk(self, key: str) -> torch.Tensor | None:
        """The disk entry, or None (safe to call in DataLoader workers)."""
        if self.mode != "disk":
            return None
        path = self._path(key)
        if not path.is_file():
            return None
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            latent = load_file(str(path))["latent"]
        except (SafetensorError, OSError, KeyError, ValueError):
            logger.warning("latent cache entry %s is unreadable; encoding again", path)
            return None
        if not bool(torch.isfinite(latent).all()):
            logger.warning("latent cache entry %s holds NaN/inf (a damaged file); encoding again", path)
            return None
        return latent

    def _store(self, key: str, latent: torch.Tensor, image: str | None = None) -> None:
        latent = latent.detach().to("cpu", torch.float32).contiguous()
        if not bool(torch.isfinite(latent).all()):
            raise NonFiniteLatentError(
                f"the VAE latent of {image or key} is not finite ({int((~torch.isfinite(latent)).sum())} NaN/inf "
                "values); it was not cached. Check that image (re-save it as an 8-bit RGB PNG/JPEG) or drop it; a VAE "
                "run in fp16 also overflows (the trainer keeps it in float32).")
        if self.mode == "memory":
            self.memory[key] = latent
        elif self.mode == "disk":
            from safetensors.torch import save_file

            with atomic_write(self._path(key)) as tmp:
                save_file({"latent": latent}, str(tmp))

    def latents_for(self, batch: dict, vae: torch.nn.Module, device: torch.device) -> torch.Tensor:
        """The batch's latents ``[B, C, h, w]`` on ``device``: cached ones reused, the rest encoded."""
        keys, given, pixels = batch["latent_key"], batch["latent"], batch["pixels"]
        images = batch.get("image") or [None] * len(keys)
        if self.mode == "off":
            stacked = torch.stack(pixels).to(device)  # [B, 3, R, R]
            self.encoded += len(keys)
            return encode_latents(vae, stacked)
        out: list[torch.Tensor] = []
        for key, lat, pix, image in zip(keys, given, pixels, images, strict=True):
            if lat is None:
                lat = self.memory.get(key)
            if lat is None:
                if pix is None:
                    raise RuntimeError(f"latent {key} is neither cached nor loaded as pixels")
                lat = encode_latents(vae, pix[None].to(device))[0]  # batch of one: see the module docstring
                self._store(key, lat, image)
                self.encoded += 1
            else:
                self.hits += 1
            out.append(lat.to(device))
        return torch.stack(out)
