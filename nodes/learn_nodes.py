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

import hashlib
import logging
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import comfy.model_management as mm
import comfy.utils
import folder_paths
import torch

from ..dreamid_core import sanitize_name
from ..dreamid_core.encoder.identity import parts_from_crops
from ..dreamid_core.faces.detectors import make_detector
from ..dreamid_core.faces.pipeline import ON_MISSING, FacePipeline, FaceResult
from ..dreamid_core.identities.embeds import IdentityEmbeds, fit_parts
from ..dreamid_core.identities.families import DIT_FAMILIES, UNET_FAMILIES, family_name, family_of
from ..dreamid_core.identities.learned_identity import LAYOUTS, NORMS, STAGE_KINDS, IdentityConfig, LearnedIdentity
from ..dreamid_core.identities.trigger import find_triggers
from ..dreamid_core.learning import (
    IdentityLearner,
    LearnSettingsError,
    RunOptions,
    StepStats,
    check_settings,
    from_word_rows,
)
from ..dreamid_core.learning.resume import check_resume
from .adapters.comfy_tokens import part_widths
from .adapters.dit_model import expected_widths, is_dit, model_family
from .adapters.learn_host import ComfyHost, encode_photos
from .adapters.learn_watch import PREVIEW_MAX_SIDE, Previews, Snapshots
from .adapters.loss_plot import loss_curve_image
from .adapters.paths import IDENTITY_FOLDER
from .adapters.per_stage import representative_embeds
from .adapters.validation import NodeInputError, require_finite

if TYPE_CHECKING:
    from comfy.model_patcher import ModelPatcher
    from comfy.sd import CLIP, VAE

    from .encoder_nodes import EncoderBundle

logger = logging.getLogger(__name__)
CATEGORY = "DreamIdentity"
NODE = "DreamID_LearnIdentity"
LEARNABLE = UNET_FAMILIES + DIT_FAMILIES
PREVIEW_PROMPT = "a portrait photo of S*, looking at the camera"
_PIPELINE: dict[str, FacePipeline] = {}


def _face_pipeline(encoder: EncoderBundle | None) -> FacePipeline:
    if encoder is not None:
        return encoder.pipeline
    device = str(mm.get_torch_device())
    if device not in _PIPELINE:  # the built-in MTCNN: weights from the facenet-pytorch wheel, no download
        _PIPELINE[device] = FacePipeline(make_detector("mtcnn", device=device))
    return _PIPELINE[device]


def check_models(model: ModelPatcher | None, clip: CLIP | None, vae: VAE | None) -> str:
    """The model family; clear errors for a missing VAE/CLIP and MODEL/CLIP of different families."""
    if model is None:
        raise NodeInputError(f"{NODE}: the model input is None; connect the checkpoint's MODEL.")
    if clip is None:
        raise NodeInputError(f"{NODE}: the clip input is None (this checkpoint has no text encoder); connect a CLIP "
                             "from CheckpointLoaderSimple or a CLIPLoader.")
    if vae is None:
        raise NodeInputError(f"{NODE}: the vae input is None; connect the checkpoint's VAE (or a VAELoader): the "
                             "photos are encoded into latents with it.")
    widths = part_widths(clip)
    family = family_of(widths)
    clip_desc = f"this CLIP ({family_name(family)}, {type(clip.cond_stage_model).__name__}, text encoders " \
                f"{', '.join(f'{k} {w}' for k, w in widths.items())})"
    if family not in LEARNABLE:
        raise NodeInputError(f"{NODE}: {clip_desc} cannot learn an identity; learning works on "
                             f"{', '.join(family_name(f) for f in LEARNABLE)} checkpoints. Identities of other "
                             "families load and apply, see the README.")
    model_fam = model_family(model)
    dit_model, dit_clip = is_dit(model), family in DIT_FAMILIES
    if dit_model != dit_clip or (dit_model and model_fam != family):
        raise NodeInputError(f"{NODE}: the MODEL is {family_name(model_fam)} but {clip_desc}. Connect the CLIP "
                             f"that belongs to this MODEL ({family_name(model_fam)}), e.g. from the same "
                             "checkpoint or a DualCLIPLoader / TripleCLIPLoader of that type.")
    want = expected_widths(model)
    if want is not None:  # a DiT: each text input has its own width
        got = dict(widths)
        if "clip_l+clip_g" in want:
            got["clip_l+clip_g"] = widths.get("clip_l", 0) + widths.get("clip_g", 0)
        bad = {k: (w, got.get(k)) for k, w in want.items() if got.get(k) != w}
        if bad:
            raise NodeInputError(
                f"{NODE}: the MODEL ({family_name(model_fam)}) reads " + ", ".join(
                    f"{k} {w} wide" for k, (w, _) in bad.items()) + f" but {clip_desc} gives " + ", ".join(
                    f"{k} {g}" for k, (_, g) in bad.items()) + ". Connect the text encoders of this MODEL.")
        return family
    want_ctx = model.model.model_config.unet_config.get("context_dim")
    got_ctx = sum(widths.values())
    if want_ctx is not None and int(got_ctx) != int(want_ctx):
        raise NodeInputError(
            f"{NODE}: the MODEL ({type(model.model.model_config).__name__}) expects text features {want_ctx} wide, "
            f"but {clip_desc} gives {got_ctx}. Connect the MODEL and CLIP of the same checkpoint (SD1.x 768, "
            "SD2.x 1024, SDXL 2048).")
    return family


def check_dit_settings(family: str, layout: str, stage_kind: str, attention_loss_weight: float, resolution: int,
                       max_queries: int | None) -> None:
    """FLUX.1 and SD3 learn words, or per-stage identities staged by time (they have no UNet blocks); their
    attention loss records joint-attention layers with at most ``max_queries`` image tokens, i.e. up to 512 px."""
    if family not in DIT_FAMILIES:
        return
    if layout == "per_stage" and stage_kind != "time":
        raise NodeInputError(f"{NODE}: stage_kind {stage_kind!r} stages by UNet block, and {family_name(family)} is "
                             "a transformer with no UNet blocks; use stage_kind 'time' (or layout 'words').")
    tokens = (resolution // 16) ** 2
    if attention_loss_weight > 0 and max_queries is not None and tokens > max_queries:
        largest = 16 * int(max_queries ** 0.5)
        raise NodeInputError(f"{NODE}: attention_loss_weight={attention_loss_weight} at resolution {resolution}: "
                             f"{family_name(family)}'s joint attention has {tokens} image tokens there, and the "
                             f"attention loss keeps maps of layers with at most {max_queries}. Use resolution "
                             f"<= {largest}, or attention_loss_weight 0.")


def _snapshot_of(init_identity: IdentityEmbeds | LearnedIdentity | None) -> LearnedIdentity | None:
    """The learned identity behind ``init_identity`` (DREAMID_IDENTITY, or DREAMID_EMBEDS that LoadIdentity
    made from one), for resuming and per-stage starts."""
    if isinstance(init_identity, LearnedIdentity):
        return init_identity
    return getattr(init_identity, "info", {}).get("identity")


def _start(host: ComfyHost, faces: Sequence[FaceResult], encoder: EncoderBundle | None,
           init_identity: IdentityEmbeds | LearnedIdentity | None, init_word: str,
           k: int) -> tuple[dict[str, torch.Tensor], str]:
    """(start vectors, init label): an identity > the encoder's S* of the photos > the init word."""
    widths = {key: int(v.shape[-1]) for key, v in host.word_embeddings("person").items()}
    if init_identity is not None:
        learned = _snapshot_of(init_identity)
        parts = learned.tensors if learned is not None else init_identity.parts
        source = (learned.config.extra.get("source") if learned is not None else None) or \
            getattr(init_identity, "info", {}).get("source") or "init_identity"
        return fit_parts(parts, widths, f"{NODE}: the init identity", "this CLIP"), f"file:{source}"
    if encoder is not None:
        mm.load_models_gpu([encoder.patcher])
        parts = parts_from_crops(encoder.patcher.model, torch.stack([f.crop for f in faces]),
                                 device=encoder.patcher.load_device)
        return fit_parts(parts, widths, f"{NODE}: the encoder {encoder.name!r}", "this CLIP"), "encoder"
    return from_word_rows(_word_rows(host, init_word, "init_word"), k), f"word:{init_word}"


def _word_rows(host: ComfyHost, word: str, name: str) -> dict[str, torch.Tensor]:
    if not isinstance(word, str) or not word.strip():
        raise NodeInputError(f"{NODE}: {name} is empty; write an ordinary word such as 'person'.")
    if word.strip().lower() == "s*":
        raise NodeInputError(f"{NODE}: {name} {word.strip()!r} is the identity's placeholder, not a word; write an "
                             "ordinary word such as 'person'.")
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
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The checkpoint's MODEL (SD1.x, SD2.x, SDXL, SD3/3.5, FLUX.1); frozen."}),
                "clip": ("CLIP", {"tooltip": "The same checkpoint's CLIP; frozen."}),
                "vae": ("VAE", {"tooltip": "The checkpoint's VAE: the photos are encoded once with it."}),
                "image": ("IMAGE", {"tooltip": "One or more photos of ONE person (the largest face is used)."}),
                "steps": ("INT", {"default": 200, "min": 1, "max": 10000, "tooltip": "Optimisation steps."}),
                "learning_rate": ("FLOAT", {"default": 0.005, "min": 1e-6, "max": 1.0, "step": 0.0005,
                                            "tooltip": "Adam learning rate of the tokens (0.005 is the TI norm)."}),
                "attention_loss_weight": ("FLOAT", {"default": 0.003, "min": 0.0, "max": 10.0, "step": 0.001,
                                                    "tooltip": "Face-wise attention loss weight (the paper's best: "
                                                               "0.003). 0 switches it off. FLUX.1/SD3: on their "
                                                               "joint attention, up to 512 px."}),
                "layout": (list(LAYOUTS), {"default": "words", "tooltip": (
                    "words: k word embeddings (a standard embedding file, InjectIDTokens). per_stage: key/value "
                    "token pairs per stage (more faithful; apply with DreamID_ApplyPerStageIdentity; SD1.x/SD2.x/"
                    "SDXL only).")}),
                "num_tokens": ("INT", {"default": 2, "min": 1, "max": 8, "tooltip": (
                    "k, tokens per identity (ignored with an encoder or init identity: theirs is used).")}),
                "init_word": ("STRING", {"default": "person", "tooltip": (
                    "Start from this word's embedding (a word of k tokens: its tokens; otherwise their mean).")}),
                "class_word": ("STRING", {"default": "person", "tooltip": (
                    "The reference prompt's word ('a photo of person'): the attention loss keeps the other words' "
                    "maps as with it and pulls the identity's attention into the face.")}),
                "resolution": ("INT", {"default": 512, "min": 64, "max": 2048, "step": 64, "tooltip": (
                    "Training size (512 for SD1/SD2, 1024 for SDXL, 512-1024 for FLUX.1/SD3). Photos are cropped square "
                    "around the face.")}),
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
                "init_identity": ("DREAMID_EMBEDS,DREAMID_IDENTITY", {"tooltip": (
                    "Start from these vectors (DreamID_LoadIdentity). A snapshot of a run continues that run: "
                    "N steps, then N more, learn what 2N steps in one run learn.")}),
                "num_stages": ("INT", {"default": 5, "min": 1, "max": 20, "tooltip": "per_stage: number of stages."}),
                "stage_kind": (list(STAGE_KINDS), {"default": "time", "tooltip": (
                    "per_stage: time = equal bins of denoising time (every model family, FLUX.1 and SD3 too); unet "
                    "= by UNet block (input levels, middle, output levels; SD1.x/SD2.x/SDXL).")}),
                "offload": ("BOOLEAN", {"default": False, "tooltip": (
                    "Keep as few weights as possible on the GPU; ComfyUI streams them layer by layer (the lowest "
                    "memory, slower). With gradient_checkpointing: SDXL at 1024 px on 12 GB cards.")}),
                "on_missing": (list(ON_MISSING), {"default": "error", "tooltip": (
                    "A photo without a face: error (stop and name it) or skip it (listed in the summary).")}),
                "norm": (list(NORMS), {"default": "vocabulary", "tooltip": (
                    "vocabulary: every vector keeps the median norm of the CLIP's word embeddings and only its "
                    "direction is learned (Directional Textual Inversion: the identity keeps following the rest of "
                    "the prompt). free: plain textual inversion, norms grow as they like.")}),
                "name": ("STRING", {"default": "my_identity", "tooltip": (
                    "Snapshots are saved as models/dreamidentity/identities/NAME_STEP.safetensors.")}),
                "preview_every": ("INT", {"default": 50, "min": 0, "max": 10000, "tooltip": (
                    "Every N steps (and at the last) render the identity so far with the preview prompt, on the "
                    "node and in the previews output. 0 = no previews.")}),
                "preview_prompt": ("STRING", {"default": PREVIEW_PROMPT, "tooltip": (
                    "The prompt of the previews; S* is the identity. Same seed every time: only the identity "
                    "changes.")}),
                "snapshot_every": ("INT", {"default": 50, "min": 0, "max": 10000, "tooltip": (
                    "Every N steps save the identity so far (and on Cancel or an error), with what resuming "
                    "needs: load it with DreamID_LoadIdentity into init_identity to continue. 0 = only on "
                    "Cancel or error.")}),
                "keep_last": ("INT", {"default": 0, "min": 0, "max": 10000, "tooltip": (
                    "Keep only this run's last N periodic snapshots (older ones of THIS run are deleted). "
                    "0 = keep all.")}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    RETURN_TYPES = ("DREAMID_IDENTITY", "DREAMID_EMBEDS", "IMAGE", "IMAGE")
    RETURN_NAMES = ("identity", "id_embeds", "loss_curve", "previews")
    OUTPUT_TOOLTIPS = ("The learned identity (for DreamID_ApplyPerStageIdentity / DreamID_SaveLearnedIdentity).",
                       "S* for InjectIDTokens / SaveIDEmbedding (per_stage: the first sampling stage's keys).",
                       "Loss per step (log scale).",
                       "The previews, one per preview step, labelled with their step (= the snapshots' steps).")
    FUNCTION = "learn"
    CATEGORY = CATEGORY

    def learn(self, model: ModelPatcher, clip: CLIP, vae: VAE, image: torch.Tensor, steps: int, learning_rate: float,
              attention_loss_weight: float, layout: str, num_tokens: int, init_word: str, class_word: str,
              resolution: int, batch_size: int, seed: int, gradient_checkpointing: bool,
              encoder: EncoderBundle | None = None, init_identity: IdentityEmbeds | LearnedIdentity | None = None,
              num_stages: int = 5, stage_kind: str = "time", offload: bool = False, on_missing: str = "error",
              norm: str = "vocabulary", name: str = "my_identity", preview_every: int = 50,
              preview_prompt: str = PREVIEW_PROMPT, snapshot_every: int = 50, keep_last: int = 0,
              unique_id: str | None = None) -> dict[str, Any]:
        # -- every cheap check before a photo is looked at --------------------------------------------
        require_finite(NODE, learning_rate=learning_rate, attention_loss_weight=attention_loss_weight)
        family = check_models(model, clip, vae)
        options = RunOptions(batch_size=batch_size, gradient_checkpointing=bool(gradient_checkpointing))
        check_dit_settings(family, layout, stage_kind, attention_loss_weight, resolution, options.max_queries)
        _intervals(steps, preview_every=preview_every, snapshot_every=snapshot_every, keep_last=keep_last)
        name = _name(name)
        if preview_every and not find_triggers(str(preview_prompt), ["S*"]):
            raise NodeInputError(f"{NODE}: preview_prompt {preview_prompt!r} has no S*; write S* where the person "
                                 "goes, e.g. 'a portrait photo of S*'.")
        config = IdentityConfig(layout=layout, num_tokens=num_tokens, num_stages=num_stages, stage_kind=stage_kind,
                                target=family, init=f"word:{init_word}", class_word=str(class_word).strip(),
                                steps=steps, lr=learning_rate, attn_weight=attention_loss_weight, seed=seed,
                                resolution=resolution, norm=norm)
        host = ComfyHost(model, clip, gradient_checkpointing=bool(gradient_checkpointing), offload=bool(offload),
                         max_queries=options.max_queries)
        try:
            check_settings(config, options, host.resolution_multiple)
        except LearnSettingsError as exc:
            raise NodeInputError(f"{NODE}: {exc}") from exc
        _word_rows(host, class_word, "class_word")
        if init_identity is None and encoder is None:
            _word_rows(host, init_word, "init_word")
        snapshot = _snapshot_of(init_identity)
        resume = snapshot if snapshot is not None and snapshot.resume is not None else None
        run = {"run_id": resume.resume.run.get("run_id") if resume else uuid.uuid4().hex, "batch_size": batch_size,
               "augment": options.augment, "photos": _digest(image), "name": name}
        notes_resume = []
        if resume is not None:
            try:
                notes_resume = check_resume(config, run, resume)
            except LearnSettingsError as exc:
                raise NodeInputError(f"{NODE}: {exc}") from exc
        folder = Path(folder_paths.get_folder_paths(IDENTITY_FOLDER)[0])
        snaps = Snapshots(folder, name, every=snapshot_every, keep_last=keep_last, run=run)
        first = resume.resume.step if resume else 0
        snaps.check_free(first, steps)
        previews = Previews(model, clip, vae, str(preview_prompt), every=preview_every, seed=seed,
                            resolution=resolution)
        # -- the run ---------------------------------------------------------------------------------------
        cancel = mm.throw_exception_if_processing_interrupted
        bar = comfy.utils.ProgressBar(steps)
        bar.update_absolute(first, steps)
        history: list[dict] = []
        learner = None
        try:
            with torch.inference_mode(False), torch.enable_grad():
                pipeline = _face_pipeline(encoder)
                report = pipeline.process(image, on_missing=on_missing, callback=lambda i, n: cancel())
                start, source = _start(host, report.faces, encoder, init_identity, init_word, num_tokens)
                config.init, config.num_tokens = source, int(next(iter(start.values())).shape[-2])
                if resume is not None:
                    config.init = resume.config.init
                photos = encode_photos(vae, host, image, report.faces, resolution, cancel)
                with host:
                    learner = IdentityLearner(host, photos, config, start, options,
                                              resume=resume.resume if resume else None)

                    def on_step(i: int, stats: StepStats) -> None:
                        history.append({"loss": stats.loss, "diffusion": stats.diffusion,
                                        "attention": stats.attention})
                        done = i + 1
                        preview = None
                        if previews.due(done, steps):
                            cancel()  # a preview costs a few steps' time: a Cancel before it is not kept waiting
                            with host.paused():
                                _, pil = previews.render(learner.identity(), done)
                            preview = ("JPEG", pil, PREVIEW_MAX_SIDE)
                        if snaps.due(done):
                            snaps.write(learner.identity, done, periodic=True)
                        bar.update_absolute(done, steps, preview)

                    result = learner.run(on_step=on_step, cancel=cancel)
        except BaseException as exc:
            mm.soft_empty_cache()
            _save_on_stop(exc, learner, snaps, unique_id)
            raise
        mm.soft_empty_cache()
        ident = result.identity
        final = {"loss": history[-1]["loss"]} if history else {"loss": float("nan")}
        norms = ident.config.extra["norms"]
        vocab = ident.config.extra["vocabulary_norm"]
        notes = [f"{steps - first} steps{f' (resumed at {first})' if first else ''}, loss "
                 f"{history[0]['loss'] if history else float('nan'):.4f} -> {final['loss']:.4f}, face attention "
                 f"{_mass(result.initial.face_mass)} -> {_mass(result.final.face_mass)}, {len(photos)} photo(s)"
                 + (f", skipped photos {[i for i, _ in report.skipped]} (no face)" if report.skipped else ""),
                 "norms " + "; ".join(f"{k} {min(v):.3f}-{max(v):.3f} (vocabulary median {vocab[k]:.3f})"
                                      for k, v in norms.items())]
        if notes_resume:
            notes.append("differs from the snapshot: " + ", ".join(notes_resume))
        if snaps.written:
            notes.append(f"snapshots: {', '.join(snaps.label(p) for p in snaps.written[-3:])}")
        return {"ui": {"text": notes}, "result": (ident, representative_embeds(ident), loss_curve_image(history),
                                                   previews.output())}


def _mass(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _intervals(steps: int, **values: int) -> None:
    for key, value in values.items():
        if not isinstance(value, int) or value < 0:
            raise NodeInputError(f"{NODE}: {key}={value!r} must be an integer >= 0 (0 = off).")
        if key != "keep_last" and value > steps:
            raise NodeInputError(f"{NODE}: {key}={value} is more than steps={steps}: it would never happen; set it "
                                 f"to at most {steps}, or 0 for none.")


def _name(name: str) -> str:
    try:
        return sanitize_name(str(name))
    except ValueError as exc:
        raise NodeInputError(f"{NODE}: name: {exc}".replace("embedding name", "snapshot name")) from exc


def _digest(image: torch.Tensor) -> str:
    return hashlib.sha256(image.detach().cpu().float().contiguous().numpy().tobytes()).hexdigest()[:16]


def _save_on_stop(exc: BaseException, learner: IdentityLearner | None, snaps: Snapshots, unique_id: str | None) -> None:
    """On Cancel or an error mid-run: the identity so far as a snapshot, and where it is."""
    if learner is None or learner.next_step == 0:
        return
    try:
        path = snaps.write(learner.identity, learner.next_step, periodic=False)
    except Exception:  # noqa: BLE001 - never hide the original error behind a failed snapshot
        logger.exception("DreamIdentity: the snapshot on stop could not be written")
        return
    where = (f"step {learner.next_step} saved as {snaps.label(path)}: load it with DreamID_LoadIdentity into "
             "init_identity to continue")
    logger.warning("DreamIdentity: learning stopped at %s", where)
    _tell(unique_id, f"stopped at {where}")
    if isinstance(exc, Exception) and exc.args and isinstance(exc.args[0], str):
        exc.args = (f"{exc.args[0]} (The identity of {where}.)", *exc.args[1:])


def _tell(unique_id: str | None, text: str) -> None:
    """Text on the node (ComfyUI's progress text), where the server is running."""
    try:
        from server import PromptServer

        if unique_id is not None and PromptServer.instance is not None:
            PromptServer.instance.send_progress_text(text, unique_id)
    except Exception:  # noqa: BLE001 - in-process use without a server
        logger.debug("no server to show %r on", text)
