"""What an artist sees and keeps while DreamID_LearnIdentity runs: previews and snapshots (ComfyUI side).

- :class:`Previews`: every ``every`` steps one image of the identity so far, sampled through the user's own
  MODEL/VAE with the preview prompt (the same seed, sampler and size every time, so only the identity
  changes), shown on the node as ComfyUI shows sampler previews (the ProgressBar's preview) and
  collected, step-labelled, for the node's IMAGE output.
- :class:`Snapshots`: every ``every`` steps, and on Cancel or an error, the identity so far with its
  resume state, written atomically as ``models/dreamidentity/identities/NAME_STEP.safetensors``
  (``DreamID_LoadIdentity`` lists them; connected to the learner's ``init_identity`` they continue the run).
  With ``keep_last`` > 0 only that many of THIS run's periodic snapshots are kept; files of other runs are
  never touched, and a run refuses to start where its snapshots would replace another run's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import comfy.sample
import numpy as np
import torch
from PIL import Image, ImageDraw

from ...dreamid_core.identities.learned_identity import LearnedIdentity, load_learned_identity, save_learned_identity
from .dit_model import model_family
from .per_stage import apply_per_stage
from .validation import NodeInputError

if TYPE_CHECKING:
    from comfy.model_patcher import ModelPatcher
    from comfy.sd import CLIP, VAE

logger = logging.getLogger(__name__)
PREVIEW_STEPS = 12
PREVIEW_CFG = 5.0
PREVIEW_SAMPLER = ("euler", "normal")
#: (cfg, sampler, scheduler) where a family samples differently: FLUX.1 is guidance-distilled (cfg 1, its
#: guidance embedding at ComfyUI's default), SD3 samples on the sgm_uniform schedule
PREVIEW_BY_FAMILY = {"flux": (1.0, ("euler", "simple")), "sd3": (4.5, ("euler", "sgm_uniform"))}
PREVIEW_MAX_SIDE = 512  # the size ComfyUI's own sampler previews are sent at


def label(image: torch.Tensor, text: str) -> torch.Tensor:
    """``[H, W, 3]`` float 0..1 with ``text`` in a dark box at the bottom left."""
    pil = Image.fromarray((image.clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    x0, y0, x1, y1 = draw.textbbox((0, 0), text)
    h = pil.height
    draw.rectangle([0, h - (y1 - y0) - 8, x1 - x0 + 8, h], fill=(0, 0, 0))
    draw.text((4, h - (y1 - y0) - 5), text, fill=(255, 255, 255))
    return torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0)


class Previews:
    """Renders and collects previews (see the module docstring)."""

    def __init__(self, model: ModelPatcher, clip: CLIP, vae: VAE, prompt: str, *, every: int, seed: int,
                 resolution: int) -> None:
        self.model, self.clip, self.vae, self.prompt = model, clip, vae, prompt
        self.every, self.seed, self.resolution = every, seed, resolution
        self.images: list[torch.Tensor] = []
        self.steps: list[int] = []
        self._negative: list[list] | None = None

    def due(self, step: int, total: int) -> bool:
        return self.every > 0 and (step % self.every == 0 or step == total)

    @torch.no_grad()
    def render(self, ident: LearnedIdentity, step: int) -> tuple[torch.Tensor, Image.Image]:
        """The preview of ``ident`` (``[H, W, 3]``, step-labelled) and the same as a PIL image for the node."""
        if self._negative is None:
            self._negative = self.clip.encode_from_tokens_scheduled(self.clip.tokenize(""))
        model, positive = apply_per_stage(self.model, self.clip, ident, self.prompt, "S*")
        cfg, sampler = PREVIEW_BY_FAMILY.get(model_family(model), (PREVIEW_CFG, PREVIEW_SAMPLER))
        lat = self.resolution // 8
        latent = torch.zeros(1, 4, lat, lat)
        latent = comfy.sample.fix_empty_latent_channels(model, latent)
        noise = comfy.sample.prepare_noise(latent, self.seed)
        samples = comfy.sample.sample(model, noise, PREVIEW_STEPS, cfg, *sampler, positive,
                                      self._negative, latent, seed=self.seed, disable_pbar=True)
        image = label(self.vae.decode(samples)[0], f"step {step}")
        self.images.append(image)
        self.steps.append(step)
        pil = Image.fromarray((image.numpy() * 255).round().astype(np.uint8))
        return image, pil

    def output(self) -> torch.Tensor:
        """The previews as one IMAGE batch, or a small grey image that says they were off."""
        if self.images:
            return torch.stack(self.images)
        return label(torch.full((64, 256, 3), 0.25), "previews off (preview_every 0)")[None]


class Snapshots:
    """Writes, lists and prunes one run's snapshots (see the module docstring)."""

    def __init__(self, folder: Path, name: str, *, every: int, keep_last: int, run: dict) -> None:
        self.folder, self.name, self.every, self.keep_last, self.run = Path(folder), name, every, keep_last, run
        self.written: list[Path] = []

    def path(self, step: int) -> Path:
        return self.folder / f"{self.name}_{step:05d}.safetensors"

    def label(self, path: Path) -> str:
        return f"identities/{path.name}"

    def check_free(self, first: int, total: int) -> None:
        """Refuse before learning when a periodic snapshot of this run would replace a file of another run."""
        if self.every <= 0:
            return
        taken = [self.path(s) for s in range(first + 1, total + 1) if s % self.every == 0 and self.path(s).exists()]
        if taken:
            raise NodeInputError(
                f"DreamID_LearnIdentity: snapshots named {self.name!r} already exist ("
                f"{', '.join(self.label(p) for p in taken[:3])}{' ...' if len(taken) > 3 else ''}); another run wrote "
                "them. Choose another name, delete them, or resume from one (DreamID_LoadIdentity -> init_identity).")

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def write(self, ident_fn: Callable[[dict], LearnedIdentity], step: int, *, periodic: bool) -> Path:
        path = self.path(step)
        if path.exists() and path not in self.written and not self._ours(path):
            path = path.with_name(f"{path.stem}-{self.run['run_id'][:6]}.safetensors")
        save_learned_identity(path, ident_fn(self.run), overwrite=True)
        if path not in self.written:
            self.written.append(path)
        if periodic and self.keep_last > 0:
            for old in self.written[:-self.keep_last]:
                old.unlink(missing_ok=True)
                logger.info("DreamIdentity: removed snapshot %s (keep_last %d)", self.label(old), self.keep_last)
            self.written = self.written[-self.keep_last:]
        logger.info("DreamIdentity: snapshot of step %d written: %s", step, self.label(path))
        return path

    def _ours(self, path: Path) -> bool:
        try:
            ident = load_learned_identity(path)
        except Exception:  # noqa: BLE001 - unreadable: someone else's file, keep it
            return False
        return ident.resume is not None and ident.resume.run.get("run_id") == self.run["run_id"]
