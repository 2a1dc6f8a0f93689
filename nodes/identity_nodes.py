"""DreamID_ApplyPerStageIdentity, DreamID_LoadIdentity, DreamID_SaveLearnedIdentity.

A learned identity travels as DREAMID_IDENTITY (``dreamid_core.identities.learned_identity.LearnedIdentity``, both
layouts). ``per_stage`` files go to ``models/dreamidentity/identities``: their tensors are ``[S, 2, k, D]``,
which ComfyUI's ``embedding:NAME`` loader would misread, so they must not sit in ``models/embeddings``;
``words`` identities are standard textual-inversion files and go to ``models/embeddings``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import folder_paths

from ..dreamid_core import sanitize_name
from ..dreamid_core.identities.embeds import IdentityEmbeds
from ..dreamid_core.identities.learned_identity import LearnedIdentity, load_learned_identity, save_learned_identity
from .adapters.paths import IDENTITY_FOLDER, identity_files, identity_path
from .adapters.per_stage import apply_per_stage, clip_single_key, representative_embeds

if TYPE_CHECKING:
    from comfy.model_patcher import ModelPatcher
    from comfy.sd import CLIP

logger = logging.getLogger(__name__)
CATEGORY = "DreamIdentity"


class DreamIDApplyPerStageIdentity:
    DESCRIPTION = ("Generates with a per-stage identity: for the positive prompt, every cross-attention layer gets "
                   "the keys from the stage's KEY tokens and the values from its VALUE tokens (stages by denoising "
                   "time, or by UNet block, as the identity was learned). On FLUX.1 / SD3 the prompt runs as two "
                   "text streams, the stage's KEY prompt and its VALUE prompt, and the image reads its keys from the "
                   "first and its values from the second. Connect the MODEL and the positive CONDITIONING to a "
                   "sampler. A words identity works too (then it equals DreamID_InjectIDTokens).")

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "model": ("MODEL", {"tooltip": "The checkpoint's MODEL; a patched clone is returned."}),
            "clip": ("CLIP", {"tooltip": "The checkpoint's CLIP."}),
            "identity": ("DREAMID_IDENTITY", {"tooltip": "From DreamID_LearnIdentity or DreamID_LoadIdentity."}),
            "text": ("STRING", {"multiline": True, "dynamicPrompts": True,
                                "default": "a photo of S*, looking at the camera, detailed face",
                                "tooltip": "The positive prompt; write the trigger where the person goes."}),
            "trigger": ("STRING", {"default": "S*", "tooltip": "The word that stands for the identity."}),
        }}

    RETURN_TYPES = ("MODEL", "CONDITIONING")
    RETURN_NAMES = ("model", "positive")
    OUTPUT_TOOLTIPS = ("MODEL with the per-stage patch (the input MODEL is unchanged).",
                       "The positive conditioning to use with that MODEL.")
    FUNCTION = "apply"
    CATEGORY = CATEGORY

    def apply(self, model: ModelPatcher, clip: CLIP | None, identity: LearnedIdentity, text: str,
              trigger: str) -> tuple[ModelPatcher, list[list]]:
        if clip is None:
            raise RuntimeError("the clip input is None: connect the checkpoint's CLIP (or a CLIPLoader).")
        return apply_per_stage(model, clip, identity, text, trigger)


class DreamIDLoadIdentity:
    DESCRIPTION = ("Loads an identity file: a per-stage identity from models/dreamidentity/identities, or any "
                   "textual-inversion embedding from models/embeddings (.safetensors; .pt/.bin only if they load "
                   "with weights_only, i.e. hold no code). Use it as the identity, or as the init of a learning run.")

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "identity_name": (identity_files(), {"tooltip": "identities/... = per-stage or learned files; "
                                                            "embeddings/... = textual-inversion files."}),
        }, "optional": {
            "clip": ("CLIP", {"tooltip": "Only for single-tensor embeddings whose width does not say which text "
                                         "encoder they are for: the CLIP they were made for."}),
        }}

    RETURN_TYPES = ("DREAMID_IDENTITY", "DREAMID_EMBEDS")
    RETURN_NAMES = ("identity", "id_embeds")
    OUTPUT_TOOLTIPS = ("The identity (words or per_stage).", "S* (a per-stage identity gives its first sampling "
                       "stage's key vectors).")
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, identity_name: str, clip: CLIP | None = None) -> tuple[LearnedIdentity, IdentityEmbeds]:
        ident = load_learned_identity(identity_path(identity_name), single_key=clip_single_key(clip),
                                      label=identity_name)
        logger.info("DreamIdentity: loaded %s identity %s (k=%d)", ident.layout, identity_name, ident.num_tokens)
        embeds = representative_embeds(ident)
        embeds.info["source"] = identity_name
        embeds.info["identity"] = ident  # the whole identity (and a snapshot's resume state) for the learner
        ident.config.extra.setdefault("source", identity_name)
        return (ident, embeds)


class DreamIDSaveLearnedIdentity:
    DESCRIPTION = ("Saves a learned identity with its settings as metadata. words: a standard textual-inversion "
                   "file in models/embeddings ('embedding:NAME' works in any prompt). per_stage: one .safetensors in "
                   "models/dreamidentity/identities, for DreamID_LoadIdentity + DreamID_ApplyPerStageIdentity.")

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "identity": ("DREAMID_IDENTITY", {"tooltip": "From DreamID_LearnIdentity."}),
            "name": ("STRING", {"default": "my_identity", "tooltip": "File name without extension."}),
            "overwrite": ("BOOLEAN", {"default": False, "tooltip": "Replace an existing file of that name."}),
        }}

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("file",)
    OUTPUT_TOOLTIPS = ("Where it was saved: 'embedding:NAME' (words) or 'identities/NAME.safetensors'.",)
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = CATEGORY

    def save(self, identity: LearnedIdentity, name: str, overwrite: bool) -> dict[str, Any]:
        clean = sanitize_name(name)
        if identity.layout == "words":
            folder, shown = Path(folder_paths.get_folder_paths("embeddings")[0]), "embeddings"
            path = save_learned_identity(folder / clean, identity, overwrite=overwrite,
                                         label=f"models/{shown}/{clean}.safetensors")
            label = f"embedding:{clean}"
        else:
            folder, shown = Path(folder_paths.get_folder_paths(IDENTITY_FOLDER)[0]), "dreamidentity/identities"
            path = save_learned_identity(folder / clean, identity, overwrite=overwrite,
                                         label=f"models/{shown}/{clean}.safetensors")
            label = f"identities/{path.name}"
        return {"ui": {"text": [f"saved models/{shown}/{path.name}: {label}"]}, "result": (label,)}
