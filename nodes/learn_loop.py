"""The identity-learning loop on ComfyUI's own objects (MODEL, CLIP, VAE). The maths (loss, masks,
augmentation, stages) is ``dreamid_core``'s; this file adapts ComfyUI to it.

Three ComfyUI facts shape it (checked on 0.3.64):
- The prompt runs under ``torch.inference_mode()``, so a checkpoint's weights are inference tensors, which
  autograd refuses to save. :func:`grad_ready` adds a pass-through weight wrapper on the CLONES (ComfyUI's
  own mechanism, as TrainLoraNode uses): ComfyUI then copies each weight per forward, and the copy is a
  normal tensor. The modules' weights themselves are never written.
- ComfyUI's CLIP layers add their residuals in place (``x += ...``), which breaks autograd through the
  text encoder; :func:`saved_copies` stores copies of the tensors autograd saves while the prompt is
  encoded (``torch.autograd.graph.saved_tensors_hooks``), so gradients reach S* without touching a forward.
- The diffusion loss goes through the model's own ``model_sampling`` (``sigma``, ``noise_scaling``,
  ``calculate_input`` / ``calculate_denoised`` inside ``apply_model``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from ..dreamid_core.attention_loss import face_attention_loss, face_mass, resize_mask
from ..dreamid_core.face_mask import Crop, face_mask, map_through, random_crop, scale_crop
from ..dreamid_core.faces import FacePipeline
from ..dreamid_core.learned_identity import IdentityConfig
from ..dreamid_core.learning import LEARN_PROMPTS, context_pairs, noise_prediction_loss, sample_timesteps
from ..dreamid_core.stages import stage_for_timestep
from .attention_patches import (
    AttentionRecorder,
    PerStagePatch,
    add_recorder,
    stage_selector,
    unused_unet_stages,
)
from .comfy_tokens import text_encoder, tokenize_with_identities, tokenizer_keys

logger = logging.getLogger(__name__)
TRIGGER = "S*"


class _PassThrough:
    """A weight wrapper that returns the weight: its presence makes ComfyUI cast (copy) the weight."""

    def __call__(self, weight):
        return weight


def grad_ready(patcher) -> None:
    """Pass-through wrappers on every castable weight of ``patcher`` (a clone) except embedding tables."""
    for name, m in patcher.model.named_modules():
        if isinstance(m, torch.nn.Embedding):
            continue
        for kind in ("weight", "bias"):
            if hasattr(m, f"{kind}_function") and getattr(m, kind, None) is not None:
                patcher.add_weight_wrapper(f"{name}.{kind}", _PassThrough())


def remove_pass_through(module: torch.nn.Module) -> int:
    """Remove :class:`_PassThrough` wrappers ComfyUI put on ``module``'s layers; returns how many."""
    removed = 0
    for m in module.modules():
        for kind in ("weight_function", "bias_function"):
            funcs = getattr(m, kind, None)
            if isinstance(funcs, list):
                kept = [f for f in funcs if not isinstance(f, _PassThrough)]
                removed += len(funcs) - len(kept)
                funcs[:] = kept
    return removed


@contextlib.contextmanager
def saved_copies() -> Iterator[None]:
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
        yield


@contextlib.contextmanager
def checkpointed_blocks(patcher, enabled: bool) -> Iterator[None]:
    """Gradient checkpointing per UNet block, as ComfyUI's TrainLoraNode does it (an instance-level
    ``forward`` on the top-level blocks for the duration of the loop), always removed on exit."""
    dm = patcher.model.diffusion_model
    blocks = [*dm.input_blocks, dm.middle_block, *dm.output_blocks] if enabled else []
    try:
        for b in blocks:
            inner = b.forward
            b.forward = lambda *a, _f=inner, **k: torch.utils.checkpoint.checkpoint(_f, *a, use_reentrant=False, **k)
        yield
    finally:
        for b in blocks:
            b.__dict__.pop("forward", None)


@dataclass
class Photos:
    latents: torch.Tensor  # [N, C, h, w] float32, model latent space (process_latent_in applied)
    boxes: list[tuple[float, float, float, float]]  # face boxes in latent cells
    landmarks: list[np.ndarray]  # [5, 2] in latent cells
    image_indices: list[int]


def _face_square(w: int, h: int, box) -> tuple[int, int, int]:
    """The largest square of the photo centred on the face as far as the borders allow: (x0, y0, side)."""
    side = min(w, h)
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    x0 = int(round(min(max(cx - side / 2, 0), w - side)))
    y0 = int(round(min(max(cy - side / 2, 0), h - side)))
    return x0, y0, side


def prepare_photos(vae, model_patcher, images: torch.Tensor, pipeline: FacePipeline, resolution: int,
                   on_missing: str = "error") -> Photos:
    """Detect the face in each photo, crop a square around it, VAE-encode ONCE at ``resolution``."""
    report = pipeline.process(images, on_missing=on_missing)
    pixels, boxes, lms, idx = [], [], [], []
    lat = resolution // 8
    for face in report.faces:
        w, h = face.image_size
        x0, y0, side = _face_square(w, h, face.detection.box)
        square = images[face.image_index, y0:y0 + side, x0:x0 + side, :3].float()  # [side, side, 3]
        px = F.interpolate(square.permute(2, 0, 1)[None], size=(resolution, resolution), mode="bilinear",
                           antialias=side > resolution, align_corners=False)[0].permute(1, 2, 0)
        pixels.append(px.clamp(0, 1))
        chain = [Crop(x0, y0, side, side, resolution, resolution), scale_crop(resolution, resolution, lat, lat)]
        (bx1, by1), (bx2, by2) = map_through([face.detection.box[:2], face.detection.box[2:]], chain)
        boxes.append((bx1, by1, bx2, by2))
        lms.append(map_through(face.detection.landmarks, chain))
        idx.append(face.image_index)
    with torch.no_grad():
        encoded = vae.encode(torch.stack(pixels))  # [N, C, h, w], VAE latent space
    latents = model_patcher.model.process_latent_in(encoded.float()).to(model_patcher.load_device)
    if latents.shape[-1] != lat:
        raise ValueError(f"the VAE gave latents {tuple(latents.shape)} for {resolution} px photos; expected an "
                         f"8x-downscaling SD VAE ({lat} px latents)")
    return Photos(latents.clone(), boxes, lms, idx)


class PromptSide:
    """Prompts with the identity (trainable vectors, gradients flow) and the class-word reference."""

    def __init__(self, clip, class_word: str) -> None:
        self.clip = clip
        self.key = tokenizer_keys(clip)[0]
        self.class_parts = self._word_parts(class_word)
        self._ref: dict[str, tuple] = {}

    def _word_parts(self, word: str) -> dict[str, torch.Tensor]:
        parts = {}
        for key in tokenizer_keys(self.clip):
            tok, model = text_encoder(self.clip, key)
            ids = [t for chunk in tok.tokenize_with_weights(word, False, disable_weights=True) for t, _ in chunk
                   if t not in (tok.start_token, tok.end_token, tok.pad_token)]
            if not ids:
                raise ValueError(f"the word {word!r} gives no tokens; use an ordinary word such as 'person'")
            table = model.transformer.get_input_embeddings().weight
            parts[f"clip_{key}"] = table[ids].detach().float().clone()
        return parts

    def word_vectors(self, word: str) -> dict[str, torch.Tensor]:
        return self._word_parts(word)

    def _end(self, tokens: dict) -> int:
        tok, _ = text_encoder(self.clip, self.key)
        chunk = tokens[self.key][0]
        ends = [i for i, item in enumerate(chunk) if i > 0 and isinstance(item[0], int) and item[0] == tok.end_token]
        return ends[0] - 1 if ends else len(chunk) - 1  # last content position

    def encode(self, parts: dict[str, torch.Tensor], template: str) -> tuple[torch.Tensor, torch.Tensor, list, int]:
        """(context [1, L, C], pooled, identity positions, last content position) with autograd."""
        tokens, info = tokenize_with_identities(self.clip, template.format(TRIGGER), {TRIGGER: parts})
        with saved_copies():
            cond, pooled = self.clip.encode_from_tokens(tokens, return_pooled=True)
        return cond, pooled, info.positions[self.key][TRIGGER], self._end(tokens)

    def reference(self, template: str) -> tuple[torch.Tensor, torch.Tensor, list, int]:
        if template not in self._ref:
            with torch.no_grad():
                self._ref[template] = self.encode(self.class_parts, template)
        return self._ref[template]


class Learner:
    """One learning run on clones of MODEL and CLIP (the inputs are never changed)."""

    def __init__(self, model, clip, photos: Photos, config: IdentityConfig, init: dict[str, torch.Tensor], *,
                 batch: int = 1, max_queries: int = 1024, measure_seed: int = 1234) -> None:
        self.config, self.photos, self.batch = config, photos, batch
        self.mp = model.clone()
        self.clip = clip.clone()
        grad_ready(self.mp)
        grad_ready(self.clip.patcher)
        self.recorder = AttentionRecorder(max_queries)
        add_recorder(self.mp, self.recorder)
        self.sampling = self.mp.get_model_object("model_sampling")
        self.prompts = PromptSide(self.clip, config.class_word)
        self.device = self.mp.load_device
        S = config.num_stages
        self.patch = None
        if config.layout == "per_stage":
            self.patch = PerStagePatch([None] * S, [None] * S, stage_selector(self.mp, S, config.stage_kind))
            self.mp.set_model_attn2_patch(self.patch)
            unused = unused_unet_stages(self.mp, S) if config.stage_kind == "unet" else []
            if unused:
                logger.warning("DreamIdentity: this UNet has fewer attention levels than %d stages; stages %s are never "
                               "used (they keep their init). Lower num_stages or use stage_kind 'time'.", S, unused)
            init = {k: v.float()[None, None].expand(S, 2, -1, -1) for k, v in init.items()}
        self.params = {k: torch.nn.Parameter(v.detach().float().clone().to(self.clip.patcher.load_device))
                       for k, v in init.items()}
        self.optimizer = torch.optim.Adam(self.params.values(), lr=config.lr)
        self.gen = torch.Generator().manual_seed(config.seed)
        self.measure_seed = measure_seed
        self.resolution = photos.latents.shape[-1] * 8

    # -- contexts -----------------------------------------------------------------------------------
    def _parts(self, stage: int, kv: int) -> dict[str, torch.Tensor]:
        if self.config.layout == "words":
            return dict(self.params)
        return {k: p[stage, kv] for k, p in self.params.items()}

    def _contexts(self, t: int, template: str):
        """Context for c_crossattn (+ the per-stage patch's K/V contexts set), pooled, positions, end."""
        if self.config.layout == "words":
            return self.prompts.encode(self._parts(0, 0), template)
        S = self.config.num_stages
        stages = [stage_for_timestep(t, S)] if self.config.stage_kind == "time" else list(range(S))
        enc = {(s, kv): self.prompts.encode(self._parts(s, kv), template) for s in stages for kv in (0, 1)}
        for s in range(S):
            src = s if s in stages else stages[0]
            self.patch.keys[s], self.patch.values[s] = enc[(src, 0)][0], enc[(src, 1)][0]
        return enc[(stages[0], 0)]

    def _denoise(self, x_t, sigma, cond, pooled, identity: bool):
        B = x_t.shape[0]
        to = dict(self.mp.model_options["transformer_options"])
        to["cond_or_uncond"] = [0 if identity else 1]  # the reference pass is not the identity: no K/V swap
        to["sigmas"] = sigma
        extra = {}
        y = self.mp.model.encode_adm(pooled_output=pooled, width=self.resolution, height=self.resolution,
                                     target_width=self.resolution, target_height=self.resolution, device=x_t.device)
        if y is not None:
            extra["y"] = y.expand(B, -1).to(x_t.device)
        return self.mp.model.apply_model(x_t, sigma, c_crossattn=cond.expand(B, -1, -1).to(x_t.device),
                                         transformer_options=to, **extra)

    # -- batches ------------------------------------------------------------------------------------
    def _batch(self, augment: bool, gen: torch.Generator, indices=None):
        ph = self.photos
        n, lat = ph.latents.shape[0], ph.latents.shape[-1]
        if indices is None:
            indices = torch.randint(0, n, (self.batch,), generator=gen).tolist()
        x0, masks = [], []
        for i in indices:
            crop = random_crop(gen, lat, lat, keep_box=ph.boxes[i]) if augment else Crop(0, 0, lat, lat, lat, lat)
            x0.append(crop.apply(ph.latents[i]))
            masks.append(face_mask(crop.map_box(ph.boxes[i]), crop.map_points(ph.landmarks[i]), lat, lat))
        return torch.stack(x0), torch.stack(masks).to(self.device)

    def _noised(self, x0: torch.Tensor, t: int, gen: torch.Generator):
        sigma = self.sampling.sigma(torch.tensor([float(t)])).to(self.device).expand(x0.shape[0])
        noise = torch.randn(x0.shape, generator=gen).to(self.device)
        return self.sampling.noise_scaling(sigma, noise, x0, False), sigma, noise

    # -- the step -----------------------------------------------------------------------------------
    def step(self, index: int) -> dict[str, float]:
        template = LEARN_PROMPTS[index % len(LEARN_PROMPTS)]
        x0, mask = self._batch(True, self.gen)
        t = int(sample_timesteps(self.gen, 1)[0])
        x_t, sigma, noise = self._noised(x0, t, self.gen)
        cond, pooled, ids, end = self._contexts(t, template)
        w = self.config.attn_weight
        self.recorder.recording = w > 0
        denoised = self._denoise(x_t, sigma, cond, pooled, identity=True)
        maps = self.recorder.take()
        diffusion = noise_prediction_loss(x_t, denoised, noise, sigma)
        attn = torch.zeros((), device=diffusion.device)
        if w > 0:
            ref_cond, ref_pooled, cls, ref_end = self.prompts.reference(template)
            with torch.no_grad():
                self._denoise(x_t, sigma, ref_cond, ref_pooled, identity=False)
                ref_maps = self.recorder.take()
            self.recorder.recording = False
            pairs = context_pairs(ids, cls, end, ref_end)
            terms = [face_attention_loss(m, r, resize_mask(mask, m.shape[2]), ids, cls, pairs)[0]
                     for m, r in zip(maps, ref_maps, strict=True)]
            attn = torch.stack(terms).mean().to(diffusion.device)
        self.recorder.recording = False
        loss = diffusion + w * attn
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"loss": float(loss.detach()), "diffusion": float(diffusion.detach()), "attention": float(attn.detach())}

    @torch.no_grad()
    def measure(self, timesteps: tuple[int, ...] = (100, 300, 500, 700, 900)) -> dict[str, float]:
        """Diffusion loss and identity-token face mass on every photo, unaugmented, with fixed noise,
        averaged over ``timesteps``."""
        gen = torch.Generator().manual_seed(self.measure_seed)
        x0, mask = self._batch(False, gen, indices=list(range(self.photos.latents.shape[0])))
        losses, masses = [], []
        for t in timesteps:
            x_t, sigma, noise = self._noised(x0, t, gen)
            cond, pooled, ids, _ = self._contexts(t, LEARN_PROMPTS[0])
            self.recorder.recording = True
            try:
                denoised = self._denoise(x_t, sigma, cond, pooled, identity=True)
                maps = self.recorder.take()
            finally:
                self.recorder.recording = False
            losses.append(float(noise_prediction_loss(x_t, denoised, noise, sigma)))
            masses += [float(face_mass(m, ids, resize_mask(mask, m.shape[2])).mean()) for m in maps]
        return {"diffusion": sum(losses) / len(losses), "face_mass": sum(masses) / len(masses)}

    def vectors(self) -> dict[str, torch.Tensor]:
        return {k: p.detach().to("cpu", torch.float32).clone() for k, p in self.params.items()}

    def close(self) -> None:
        """Take the pass-through wrappers off the shared modules and drop the run's tensors. The attention
        patches live only in the clone's model_options, which go with the clone."""
        self.recorder.recording = False
        self.recorder.maps.clear()
        for patcher in (self.mp, self.clip.patcher):
            remove_pass_through(patcher.model)
        self.optimizer = None
        self.params = {}
