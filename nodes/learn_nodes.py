"""DreamID_LearnIdentity: learn an identity in minutes on the user's own checkpoint (Beyond Inserting's
face-wise attention loss and per-stage K/V tokens; E4T-style init from the encoder when one is given).

Runs the way ComfyUI's TrainLoraNode does: ``torch.inference_mode(False)``, clones of MODEL and CLIP
(the inputs never change), ``load_models_gpu``, ComfyUI's devices, a ProgressBar step and an interruption
check per step; on Cancel or an error nothing is left on the models (``try/finally``).
"""

from __future__ import annotations

import dataclasses
import logging
import math

import comfy.model_management as mm
import comfy.utils
import torch

from ..dreamid_core.detectors import make_detector
from ..dreamid_core.errors import IncompatibleEncoderError
from ..dreamid_core.faces import FacePipeline
from ..dreamid_core.identity import encode_identity
from ..dreamid_core.learned_identity import LAYOUTS, IdentityConfig, LearnedIdentity
from ..dreamid_core.learning import LearnSettingsError, check_learn_settings, tile_tokens
from ..dreamid_core.stages import STAGE_KINDS
from .comfy_tokens import tokenizer_keys
from .identity_nodes import apply_per_stage, representative_embeds
from .learn_loop import Learner, PromptSide, checkpointed_blocks, prepare_photos
from .loss_plot import loss_curve_image
from .validation import NodeInputError, require_finite

logger = logging.getLogger(__name__)
CATEGORY = "DreamIdentity"
NODE = "DreamID_LearnIdentity"
FAMILIES = {("l",): "sd1", ("h",): "sd2", ("g", "l"): "sdxl"}
_PIPELINE: dict[str, FacePipeline] = {}


def _face_pipeline(encoder) -> FacePipeline:
    if encoder is not None:
        return encoder.pipeline
    device = str(mm.get_torch_device())
    if device not in _PIPELINE:  # the built-in MTCNN: weights from the facenet-pytorch wheel, no download
        _PIPELINE[device] = FacePipeline(make_detector("mtcnn", device=device))
    return _PIPELINE[device]


def check_models(model, clip, vae) -> str:
    """The model family; clear errors for a missing VAE/CLIP and MODEL/CLIP of different families."""
    if model is None:
        raise NodeInputError(f"{NODE}: the model input is None; connect the checkpoint's MODEL.")
    if clip is None:
        raise NodeInputError(f"{NODE}: the clip input is None (this checkpoint has no text encoder); connect a CLIP "
                             "from CheckpointLoaderSimple or a CLIPLoader.")
    if vae is None:
        raise NodeInputError(f"{NODE}: the vae input is None; connect the checkpoint's VAE (or a VAELoader): the "
                             "photos are encoded into latents with it.")
    keys = tuple(sorted(tokenizer_keys(clip)))
    family = FAMILIES.get(keys, "unknown")
    want = model.model.model_config.unet_config.get("context_dim")
    cond, _ = clip.encode_from_tokens(clip.tokenize(""), return_pooled=True)
    if want is not None and int(cond.shape[-1]) != int(want):
        raise NodeInputError(
            f"{NODE}: the MODEL ({type(model.model.model_config).__name__}) expects text features {want} wide, but "
            f"this CLIP ({family}, {type(clip.cond_stage_model).__name__}) gives {cond.shape[-1]}. Connect the MODEL "
            "and CLIP of the same checkpoint (SD1.x 768, SD2.x 1024, SDXL 2048).")
    return family


def _check_parts(parts: dict, clip, source: str) -> None:
    want = {f"clip_{k}" for k in tokenizer_keys(clip)}
    if set(parts) != want:
        raise IncompatibleEncoderError(f"{NODE}: the {source} is for {sorted(parts)}, but this CLIP has "
                                       f"{sorted(want)}. Use one made for this model family.")


class DreamIDLearnIdentity:
    DESCRIPTION = ("Learns the person in the photos on YOUR checkpoint in a few hundred steps: textual-inversion "
                   "style tokens plus the face-wise attention loss (the tokens attend to the face, not the layout), "
                   "as k words or as per-stage key/value pairs. With an encoder connected it starts from the "
                   "encoder's S* (fast); otherwise from the init word. Attention weight 0 + words = plain textual "
                   "inversion. The MODEL and CLIP given are never changed.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The checkpoint's MODEL (SD1.x, SD2.x, SDXL); frozen."}),
                "clip": ("CLIP", {"tooltip": "The same checkpoint's CLIP; frozen."}),
                "vae": ("VAE", {"tooltip": "The checkpoint's VAE: the photos are encoded once with it."}),
                "image": ("IMAGE", {"tooltip": "One or more photos of ONE person (the largest face is used)."}),
                "steps": ("INT", {"default": 200, "min": 1, "max": 10000, "tooltip": "Optimisation steps."}),
                "learning_rate": ("FLOAT", {"default": 0.005, "min": 1e-6, "max": 1.0, "step": 0.0005,
                                            "tooltip": "Adam learning rate of the tokens (0.005 is the TI norm)."}),
                "attention_loss_weight": ("FLOAT", {"default": 0.003, "min": 0.0, "max": 10.0, "step": 0.001,
                                                    "tooltip": "Face-wise attention loss weight (the paper's best: "
                                                               "0.003). 0 switches it off."}),
                "layout": (list(LAYOUTS), {"default": "words", "tooltip": (
                    "words: k word embeddings (a standard embedding file, InjectIDTokens). per_stage: key/value "
                    "token pairs per stage (more faithful; apply with DreamID_ApplyPerStageIdentity).")}),
                "num_tokens": ("INT", {"default": 2, "min": 1, "max": 8, "tooltip": (
                    "k, tokens per identity (ignored with an encoder or init identity: theirs is used).")}),
                "init_word": ("STRING", {"default": "person", "tooltip": "Start from this word's embedding."}),
                "class_word": ("STRING", {"default": "person", "tooltip": (
                    "The reference prompt's word ('a photo of person'): the attention loss keeps the other words' "
                    "maps as with it and pulls the identity's attention into the face.")}),
                "resolution": ("INT", {"default": 512, "min": 64, "max": 2048, "step": 64, "tooltip": (
                    "Training size (512 for SD1/SD2, 1024 for SDXL). Photos are cropped square around the face.")}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 16, "tooltip": (
                    "Photos (augmented) per step; 1 fits artists' cards.")}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "tooltip": (
                    "Seeds the augmentation, timesteps and noise: the same seed gives the same identity.")}),
                "gradient_checkpointing": ("BOOLEAN", {"default": False, "tooltip": (
                    "Recompute UNet activations in the backward pass: less memory, more time.")}),
            },
            "optional": {
                "encoder": ("DREAMID_ENCODER", {"tooltip": "Init from the encoder's S* (E4T style) and use its "
                                                           "face detector."}),
                "init_identity": ("DREAMID_EMBEDS", {"tooltip": "Init from these vectors (e.g. DreamID_LoadIdentity)."}),
                "num_stages": ("INT", {"default": 5, "min": 1, "max": 20, "tooltip": "per_stage: number of stages."}),
                "stage_kind": (list(STAGE_KINDS), {"default": "time", "tooltip": (
                    "per_stage: time = equal bins of denoising time (same for every model family); unet = by UNet "
                    "block (input levels, middle, output levels).")}),
                "prompt": ("STRING", {"multiline": True, "default": "a photo of S*, looking at the camera, detailed face",
                                      "tooltip": "The generation prompt for the MODEL/positive outputs."}),
                "trigger": ("STRING", {"default": "S*", "tooltip": "The identity's word in that prompt."}),
            },
        }

    RETURN_TYPES = ("DREAMID_IDENTITY", "DREAMID_EMBEDS", "MODEL", "CONDITIONING", "IMAGE")
    RETURN_NAMES = ("identity", "id_embeds", "model", "positive", "loss_curve")
    OUTPUT_TOOLTIPS = ("The learned identity (for DreamID_SaveLearnedIdentity / ApplyPerStageIdentity).",
                       "S* for InjectIDTokens / SaveIDEmbedding (per_stage: the first sampling stage's keys).",
                       "words: the input MODEL; per_stage: a clone with the per-stage patch for the prompt.",
                       "The prompt encoded with the identity, for the sampler.",
                       "Loss per step (log scale).")
    FUNCTION = "learn"
    CATEGORY = CATEGORY

    def learn(self, model, clip, vae, image, steps, learning_rate, attention_loss_weight, layout, num_tokens,
              init_word, class_word, resolution, batch_size, seed, gradient_checkpointing, encoder=None,
              init_identity=None, num_stages=5, stage_kind="time",
              prompt="a photo of S*, looking at the camera, detailed face", trigger="S*"):
        require_finite(NODE, learning_rate=learning_rate, attention_loss_weight=attention_loss_weight)
        try:
            check_learn_settings(steps=steps, lr=learning_rate, attn_weight=attention_loss_weight, batch=batch_size,
                                 resolution=resolution)
        except LearnSettingsError as exc:
            raise NodeInputError(f"{NODE}: {exc}") from exc
        family = check_models(model, clip, vae)
        pipeline = _face_pipeline(encoder)
        ident, history, final = self._run(model, clip, vae, image, pipeline, encoder, init_identity, IdentityConfig(
            layout=layout, num_tokens=num_tokens, num_stages=num_stages, stage_kind=stage_kind, target=family,
            init=f"word:{init_word}", class_word=class_word, steps=steps, lr=learning_rate,
            attn_weight=attention_loss_weight, seed=seed, resolution=resolution), batch_size, gradient_checkpointing)
        out_model, positive = (apply_per_stage(model, clip, ident, prompt, trigger) if layout == "per_stage"
                               else (model, apply_per_stage(model, clip, ident, prompt, trigger)[1]))
        notes = [f"{steps} steps, loss {history[0]['loss']:.4f} -> {history[-1]['loss']:.4f}, "
                 f"face attention {final['face_mass']:.3f}"]
        return {"ui": {"text": notes}, "result": (ident, representative_embeds(ident), out_model, positive,
                                                   loss_curve_image(history))}

    def _init_parts(self, clip, image, encoder, init_identity, prompts: PromptSide, config: IdentityConfig):
        if init_identity is not None:
            _check_parts(init_identity.parts, clip, "init identity")
            return init_identity.parts, "file:" + str(init_identity.info.get("source") or "init_identity")
        if encoder is not None:
            mm.load_models_gpu([encoder.patcher])
            embeds, _ = encode_identity(encoder.patcher.model, encoder.pipeline, image, device=encoder.patcher.load_device)
            _check_parts(embeds.parts, clip, f"encoder {encoder.name!r}")
            return embeds.parts, "encoder"
        word = config.init.split(":", 1)[1]
        return {k: tile_tokens(v, config.num_tokens) for k, v in prompts.word_vectors(word).items()}, config.init

    def _run(self, model, clip, vae, image, pipeline, encoder, init_identity, config, batch, checkpointing):
        bar = comfy.utils.ProgressBar(config.steps)
        learner = None
        history: list[dict[str, float]] = []
        with torch.inference_mode(False), torch.enable_grad():
            try:
                photos = prepare_photos(vae, model, image.clone(), pipeline, config.resolution)
                init, source = self._init_parts(clip, image.clone(), encoder, init_identity, PromptSide(clip, "person"),
                                                config)
                k = next(iter(init.values())).shape[0]
                config = dataclasses.replace(config, init=source, num_tokens=k)
                learner = Learner(model, clip, photos, config, init, batch=batch)
                mm.load_models_gpu([learner.mp, learner.clip.patcher])
                initial = learner.measure()
                with checkpointed_blocks(learner.mp, checkpointing):
                    for i in range(config.steps):
                        mm.throw_exception_if_processing_interrupted()
                        history.append(learner.step(i))
                        if not math.isfinite(history[-1]["loss"]):
                            raise LearnSettingsError(
                                f"{NODE}: the loss became {history[-1]['loss']} at step {i + 1}; lower learning_rate "
                                f"(now {config.lr}) or attention_loss_weight.")
                        bar.update_absolute(i + 1, config.steps)
                    final = learner.measure()
                vectors = learner.vectors()
            finally:
                if learner is not None:
                    learner.close()
                mm.soft_empty_cache()
        config.extra = {"initial_diffusion_loss": initial["diffusion"], "initial_face_mass": initial["face_mass"],
                        "final_diffusion_loss": final["diffusion"], "face_mass": final["face_mass"],
                        "num_photos": int(photos.latents.shape[0])}
        ident = LearnedIdentity.words(vectors, config) if config.layout == "words" else LearnedIdentity(config, vectors)
        logger.info("DreamIdentity learned a %s identity: %d steps, loss %.4f -> %.4f, face attention %.3f",
                    config.layout, config.steps, history[0]["loss"], history[-1]["loss"], final["face_mass"])
        return ident, history, final
