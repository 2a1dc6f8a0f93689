"""DreamID_LearnIdentity: learn an identity in minutes on the user's own checkpoint (Beyond Inserting's
face-wise attention loss and per-stage K/V tokens; E4T-style init from the encoder when one is given).

The node only adapts: every cheap input is checked first (before a photo is looked at), then the
learner of ``dreamid_core.learning`` runs on :class:`~.learn_host.ComfyHost` (clones of MODEL and CLIP,
nothing left on them afterwards, also on Cancel or an error), with a ProgressBar step and an
interruption check per step. The generation prompt is not an input: a new prompt must not re-run
the learning (connect ``identity`` to DreamID_ApplyPerStageIdentity, or ``id_embeds`` to
DreamID_InjectIDTokens, to write it).
"""

from __future__ import annotations

import logging

import comfy.model_management as mm
import comfy.utils
import torch

from ..dreamid_core.detectors import make_detector
from ..dreamid_core.faces import ON_MISSING, FacePipeline
from ..dreamid_core.identity import fit_parts, parts_from_crops
from ..dreamid_core.learned_identity import LAYOUTS, STAGE_KINDS, IdentityConfig
from ..dreamid_core.learning import (
    IdentityLearner,
    LearnSettingsError,
    RunOptions,
    check_settings,
    from_word_rows,
)
from .comfy_tokens import tokenizer_keys
from .identity_nodes import representative_embeds
from .learn_host import ComfyHost, encode_photos
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
    widths = {k: getattr(clip.cond_stage_model, f"clip_{k}").transformer.get_input_embeddings().weight.shape[1]
              for k in keys}
    got = sum(widths.values())
    if want is not None and int(got) != int(want):
        raise NodeInputError(
            f"{NODE}: the MODEL ({type(model.model.model_config).__name__}) expects text features {want} wide, but "
            f"this CLIP ({family}, {type(clip.cond_stage_model).__name__}) gives {got}. Connect the MODEL "
            "and CLIP of the same checkpoint (SD1.x 768, SD2.x 1024, SDXL 2048).")
    return family


def _start(host: ComfyHost, faces, encoder, init_identity, init_word: str, k: int):
    """(start vectors, init label): an identity > the encoder's S* of the photos > the init word."""
    widths = {key: int(v.shape[-1]) for key, v in host.word_embeddings("person").items()}
    if init_identity is not None:
        parts = fit_parts(init_identity.parts, widths, f"{NODE}: the init identity", "this CLIP")
        return parts, "file:" + str(init_identity.info.get("source") or "init_identity")
    if encoder is not None:
        mm.load_models_gpu([encoder.patcher])
        parts = parts_from_crops(encoder.patcher.model, torch.stack([f.crop for f in faces]),
                                 device=encoder.patcher.load_device)
        return fit_parts(parts, widths, f"{NODE}: the encoder {encoder.name!r}", "this CLIP"), "encoder"
    return from_word_rows(_word_rows(host, init_word, "init_word"), k), f"word:{init_word}"


def _word_rows(host: ComfyHost, word: str, name: str) -> dict[str, torch.Tensor]:
    if not isinstance(word, str) or not word.strip():
        raise NodeInputError(f"{NODE}: {name} is empty; write an ordinary word such as 'person'.")
    try:
        return host.word_embeddings(word.strip())
    except ValueError as exc:
        raise NodeInputError(f"{NODE}: {name}={word!r}: {exc}") from exc


class DreamIDLearnIdentity:
    DESCRIPTION = ("Learns the person in the photos on YOUR checkpoint in a few hundred steps: textual-inversion "
                   "style tokens plus the face-wise attention loss (the tokens attend to the face, not the layout), "
                   "as k words or as per-stage key/value pairs. With an encoder connected it starts from the "
                   "encoder's S* (fast); otherwise from the init word. Attention weight 0 + words = plain textual "
                   "inversion. The MODEL and CLIP given are never changed. Generate with the identity through "
                   "DreamID_ApplyPerStageIdentity (or id_embeds through DreamID_InjectIDTokens): changing that "
                   "prompt does not learn again.")

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
                "init_word": ("STRING", {"default": "person", "tooltip": (
                    "Start from this word's embedding (a word of k tokens: its tokens; otherwise their mean).")}),
                "class_word": ("STRING", {"default": "person", "tooltip": (
                    "The reference prompt's word ('a photo of person'): the attention loss keeps the other words' "
                    "maps as with it and pulls the identity's attention into the face.")}),
                "resolution": ("INT", {"default": 512, "min": 64, "max": 2048, "step": 64, "tooltip": (
                    "Training size (512 for SD1/SD2, 1024 for SDXL). Photos are cropped square around the face.")}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 16, "tooltip": (
                    "Photos (augmented) per step; 1 fits artists' cards.")}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "tooltip": (
                    "Seeds the augmentation, prompts, timesteps and noise: the same seed gives the same identity.")}),
                "gradient_checkpointing": ("BOOLEAN", {"default": False, "tooltip": (
                    "Recompute UNet blocks and text encodings in the backward pass: less memory, ~30 % more time.")}),
            },
            "optional": {
                "encoder": ("DREAMID_ENCODER", {"tooltip": "Init from the encoder's S* (E4T style) and use its "
                                                           "face detector."}),
                "init_identity": ("DREAMID_EMBEDS", {"tooltip": "Init from these vectors (e.g. DreamID_LoadIdentity)."}),
                "num_stages": ("INT", {"default": 5, "min": 1, "max": 20, "tooltip": "per_stage: number of stages."}),
                "stage_kind": (list(STAGE_KINDS), {"default": "time", "tooltip": (
                    "per_stage: time = equal bins of denoising time (same for every model family); unet = by UNet "
                    "block (input levels, middle, output levels).")}),
                "offload": ("BOOLEAN", {"default": False, "tooltip": (
                    "Keep as few weights as possible on the GPU; ComfyUI streams them layer by layer (the lowest "
                    "memory, slower). With gradient_checkpointing: SDXL at 1024 px on 12 GB cards.")}),
                "on_missing": (list(ON_MISSING), {"default": "error", "tooltip": (
                    "A photo without a face: error (stop and name it) or skip it (listed in the summary).")}),
            },
        }

    RETURN_TYPES = ("DREAMID_IDENTITY", "DREAMID_EMBEDS", "IMAGE")
    RETURN_NAMES = ("identity", "id_embeds", "loss_curve")
    OUTPUT_TOOLTIPS = ("The learned identity (for DreamID_ApplyPerStageIdentity / DreamID_SaveLearnedIdentity).",
                       "S* for InjectIDTokens / SaveIDEmbedding (per_stage: the first sampling stage's keys).",
                       "Loss per step (log scale).")
    FUNCTION = "learn"
    CATEGORY = CATEGORY

    def learn(self, model, clip, vae, image, steps, learning_rate, attention_loss_weight, layout, num_tokens,
              init_word, class_word, resolution, batch_size, seed, gradient_checkpointing, encoder=None,
              init_identity=None, num_stages=5, stage_kind="time", offload=False, on_missing="error"):
        require_finite(NODE, learning_rate=learning_rate, attention_loss_weight=attention_loss_weight)
        family = check_models(model, clip, vae)
        config = IdentityConfig(layout=layout, num_tokens=num_tokens, num_stages=num_stages, stage_kind=stage_kind,
                                target=family, init=f"word:{init_word}", class_word=str(class_word).strip(),
                                steps=steps, lr=learning_rate, attn_weight=attention_loss_weight, seed=seed,
                                resolution=resolution)
        options = RunOptions(batch_size=batch_size, gradient_checkpointing=bool(gradient_checkpointing))
        host = ComfyHost(model, clip, gradient_checkpointing=bool(gradient_checkpointing), offload=bool(offload),
                         max_queries=options.max_queries)
        try:
            check_settings(config, options, host.resolution_multiple)
        except LearnSettingsError as exc:
            raise NodeInputError(f"{NODE}: {exc}") from exc
        _word_rows(host, class_word, "class_word")
        if init_identity is None and encoder is None:
            _word_rows(host, init_word, "init_word")
        cancel = mm.throw_exception_if_processing_interrupted
        bar = comfy.utils.ProgressBar(steps)
        history = []
        try:
            with torch.inference_mode(False), torch.enable_grad():
                pipeline = _face_pipeline(encoder)
                report = pipeline.process(image, on_missing=on_missing, callback=lambda i, n: cancel())
                start, source = _start(host, report.faces, encoder, init_identity, init_word, num_tokens)
                config.init, config.num_tokens = source, int(next(iter(start.values())).shape[-2])
                photos = encode_photos(vae, host, image, report.faces, resolution, cancel)
                with host:
                    learner = IdentityLearner(host, photos, config, start, options)

                    def on_step(i, stats):
                        history.append({"loss": stats.loss, "diffusion": stats.diffusion,
                                        "attention": stats.attention})
                        bar.update_absolute(i + 1, steps)

                    result = learner.run(on_step=on_step, cancel=cancel)
        finally:
            mm.soft_empty_cache()
        ident = result.identity
        skipped = [i for i, _ in report.skipped]
        notes = [f"{steps} steps, loss {history[0]['loss']:.4f} -> {history[-1]['loss']:.4f}, face attention "
                 f"{result.initial.face_mass:.3f} -> {result.final.face_mass:.3f}, {len(photos)} photo(s)"
                 + (f", skipped photos {skipped} (no face)" if skipped else "")]
        return {"ui": {"text": notes}, "result": (ident, representative_embeds(ident), loss_curve_image(history))}
