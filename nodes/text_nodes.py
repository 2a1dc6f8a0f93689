"""DreamID_InjectIDTokens and DreamID_SaveIDEmbedding: S* into a prompt, or into a reusable file."""

from __future__ import annotations

import logging
from pathlib import Path

import folder_paths

from ..dreamid_core import sanitize_name, splice_chunks, trigger_ids_from_chunks, write_embedding
from ..dreamid_core.identity import IdentityEmbeds

logger = logging.getLogger(__name__)
CATEGORY = "DreamIdentity"


def _text_encoder(clip, key: str):
    """ComfyUI's tokenizer and text model for tokenizer key ``key`` ("l", "h", "g")."""
    tokenizer = getattr(clip.tokenizer, f"clip_{key}", None)
    model = getattr(clip.cond_stage_model, f"clip_{key}", None)
    if tokenizer is None or model is None:
        raise ValueError(f"this CLIP ({type(clip.cond_stage_model).__name__}) has no clip_{key} text encoder; "
                         "DreamIdentity supports SD1.x, SD2.x and SDXL CLIP models.")
    return tokenizer, model


class DreamIDInjectIDTokens:
    DESCRIPTION = ("Encodes a prompt with the identity in it: every occurrence of the trigger word (default S*) is "
                   "replaced by the k S* vectors before the text encoder, keeping its prompt weight, so (S*:1.2), "
                   "long prompts, CLIPSetLastLayer, LoRAs and any sampler or ControlNet work as with plain text.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clip": ("CLIP", {"tooltip": "The checkpoint's CLIP (SD1.x, SD2.x or SDXL), LoRAs applied or not."}),
                "id_embeds": ("DREAMID_EMBEDS", {"tooltip": "S* from DreamID_EncodeFace."}),
                "text": ("STRING", {"multiline": True, "dynamicPrompts": True,
                                    "default": "a photo of S*, looking at the camera, detailed face",
                                    "tooltip": "The prompt. Write the trigger word where the person goes."}),
                "trigger": ("STRING", {"default": "S*", "tooltip": (
                    "The word that stands for the identity. It must appear in the text at least once.")}),
            }
        }

    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("Conditioning with the identity, for any sampler.",)
    FUNCTION = "encode"
    CATEGORY = CATEGORY

    def encode(self, clip, id_embeds: IdentityEmbeds, text, trigger):
        if clip is None:
            raise RuntimeError("the clip input is None: this checkpoint has no text encoder. Load one with a "
                               "CLIPLoader node and connect it here.")
        tokens = clip.tokenize(text)
        trigger_tokens = clip.tokenize(trigger)
        for key, chunks in tokens.items():
            tok, model = _text_encoder(clip, key)
            width = model.transformer.get_input_embeddings().weight.shape[1]
            vectors = id_embeds.vectors_for(f"clip_{key}", width, where=f"CLIP's clip_{key} text encoder")
            ids = trigger_ids_from_chunks(trigger_tokens[key], tok.start_token, tok.end_token, trigger)
            tokens[key], count = splice_chunks(chunks, ids, vectors, start_token=tok.start_token,
                                               end_token=tok.end_token, pad_token=tok.pad_token, prompt=text)
        logger.info("DreamIdentity: %d occurrence(s) of %r replaced by %d S* vectors", count, trigger,
                    id_embeds.num_tokens)
        return (clip.encode_from_tokens_scheduled(tokens),)


class DreamIDSaveIDEmbedding:
    DESCRIPTION = ("Saves S* as a standard textual-inversion file in models/embeddings, so 'embedding:NAME' in any "
                   "prompt (any CLIPTextEncode, and other SD tools) brings the identity back with no DreamIdentity "
                   "node in the graph.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "id_embeds": ("DREAMID_EMBEDS", {"tooltip": "S* from DreamID_EncodeFace (its strength is kept)."}),
                "name": ("STRING", {"default": "my_identity", "tooltip": (
                    "File name without extension; letters, digits, '-', '_' (anything else becomes '_').")}),
                "overwrite": ("BOOLEAN", {"default": False, "tooltip": "Replace an existing file of that name."}),
            }
        }

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("embedding_token",)
    OUTPUT_TOOLTIPS = ("'embedding:NAME', ready to paste into a prompt.",)
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = CATEGORY

    def save(self, id_embeds: IdentityEmbeds, name, overwrite):
        clean = sanitize_name(name)
        folder = Path(folder_paths.get_folder_paths("embeddings")[0])
        path = write_embedding(folder / clean, id_embeds.parts, overwrite=overwrite, metadata=id_embeds.info)
        token = f"embedding:{clean}"
        if clean != name:
            logger.info("embedding name %r saved as %r", name, clean)
        return {"ui": {"text": [f"saved {path.name}: use {token} in a prompt"]}, "result": (token,)}
