"""DreamID_InjectIDTokens and DreamID_SaveIDEmbedding: S* into a prompt, or into a reusable file."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import folder_paths

from ..dreamid_core import check_trigger, sanitize_name, write_embedding
from ..dreamid_core.errors import TriggerNotFoundError
from ..dreamid_core.identities.embeds import IdentityEmbeds
from .adapters.comfy_tokens import is_common_word, tokenize_with_identities

if TYPE_CHECKING:
    from comfy.sd import CLIP

logger = logging.getLogger(__name__)
CATEGORY = "DreamIdentity"


MAX_IDENTITIES = 3


def _identity_inputs() -> dict:
    """Optional extra identities: id_embeds_2 / trigger_2, id_embeds_3 / trigger_3."""
    extra = {}
    for i in range(2, MAX_IDENTITIES + 1):
        extra[f"id_embeds_{i}"] = ("DREAMID_EMBEDS", {"tooltip": (
            f"Optional: identity number {i}, for a second or third person in the same prompt.")})
        extra[f"trigger_{i}"] = ("STRING", {"default": f"S{i}*", "tooltip": (
            f"The word that stands for identity {i}; it must differ from the other triggers.")})
    return extra


class DreamIDInjectIDTokens:
    DESCRIPTION = ("Encodes a prompt with the identity in it: every occurrence of the trigger word (default S*) is "
                   "replaced by the k S* vectors before the text encoder, exactly where ComfyUI would put "
                   "'embedding:NAME', keeping its prompt weight. 'S*,', \"S*\", S*'s and (S*:1.2) all work; long "
                   "prompts, CLIPSetLastLayer, LoRAs and any sampler or ControlNet work as with plain text. Up to "
                   f"{MAX_IDENTITIES} people, each with their own trigger.")

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "clip": ("CLIP", {"tooltip": "The checkpoint's CLIP (SD1.x, SD2.x or SDXL), LoRAs applied or not."}),
                "id_embeds": ("DREAMID_EMBEDS", {"tooltip": "S* from DreamID_EncodeFace (or a learned identity)."}),
                "text": ("STRING", {"multiline": True, "dynamicPrompts": True,
                                    "default": "a photo of S*, looking at the camera, detailed face",
                                    "tooltip": "The prompt. Write the trigger word where the person goes."}),
                "trigger": ("STRING", {"default": "S*", "tooltip": (
                    "The word that stands for the identity (case does not matter; punctuation may touch it: "
                    "'S*,' and '(S*:1.2)' work). It must appear in the text at least once.")}),
            },
            "optional": _identity_inputs(),
        }

    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("Conditioning with the identity, for any sampler.",)
    FUNCTION = "encode"
    CATEGORY = CATEGORY

    def encode(self, clip: CLIP | None, id_embeds: IdentityEmbeds, text: str, trigger: str,
               **extra: IdentityEmbeds | str) -> dict[str, Any]:
        if clip is None:
            raise RuntimeError("the clip input is None: this checkpoint has no text encoder. Load one with a "
                               "CLIPLoader node and connect it here.")
        identities = {check_trigger(trigger): id_embeds}
        for i in range(2, MAX_IDENTITIES + 1):
            embeds = extra.get(f"id_embeds_{i}")
            if embeds is None:
                continue
            word = check_trigger(extra.get(f"trigger_{i}", f"S{i}*"))
            if word.casefold() in {t.casefold() for t in identities}:
                raise TriggerNotFoundError(
                    f"identity {i} uses the trigger {word!r}, which another identity already uses; give each "
                    "person their own trigger word (e.g. S1* and S2*).")
            identities[word] = embeds
        tokens, found = tokenize_with_identities(clip, text, {t: e.parts for t, e in identities.items()})
        notes = []
        for word, embeds in identities.items():
            n = found.counts.get(word, 0)
            notes.append(f"{word}: {n} occurrence(s), {embeds.num_tokens} vector(s) each")
            if is_common_word(clip, word):
                logger.warning("DreamIdentity: the trigger %r is a common word; all %d occurrences in the prompt were "
                               "replaced by the identity. If some of them mean the ordinary word, choose a rare "
                               "trigger such as S* or sks.", word, n)
                notes[-1] += f" (common word: all {n} replaced)"
        logger.info("DreamIdentity prompt: %s", "; ".join(notes))
        return {"ui": {"text": notes}, "result": (clip.encode_from_tokens_scheduled(tokens),)}


class DreamIDSaveIDEmbedding:
    DESCRIPTION = ("Saves S* as a standard textual-inversion file in models/embeddings, so 'embedding:NAME' in any "
                   "prompt (any CLIPTextEncode, and other SD tools) brings the identity back with no DreamIdentity "
                   "node in the graph.")

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "id_embeds": ("DREAMID_EMBEDS", {"tooltip": "S* from DreamID_EncodeFace (its strength is kept)."}),
                "name": ("STRING", {"default": "my_identity", "tooltip": (
                    "File name without extension: letters and digits of any script, '-', '_' (anything else "
                    "becomes '_'). Windows device names (CON, NUL, COM1...) and folders are refused.")}),
                "overwrite": ("BOOLEAN", {"default": False, "tooltip": "Replace an existing file of that name."}),
            }
        }

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("embedding_token",)
    OUTPUT_TOOLTIPS = ("'embedding:NAME', ready to paste into a prompt.",)
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = CATEGORY

    def save(self, id_embeds: IdentityEmbeds, name: str, overwrite: bool) -> dict[str, Any]:
        if id_embeds.num_tokens == 0:
            raise ValueError("this identity has no vectors (strength 0 switches it off), so there is nothing to save; "
                             "set strength above 0 in DreamID_EncodeFace.")
        clean = sanitize_name(name)
        folder = Path(folder_paths.get_folder_paths("embeddings")[0])
        path = write_embedding(folder / clean, id_embeds.parts, overwrite=overwrite, metadata=id_embeds.info,
                               label=f"models/embeddings/{clean}.safetensors")
        token = f"embedding:{clean}"
        if clean != name:
            logger.info("embedding name %r saved as %r", name, clean)
        return {"ui": {"text": [f"saved models/embeddings/{path.name}: use {token} in a prompt"]}, "result": (token,)}
