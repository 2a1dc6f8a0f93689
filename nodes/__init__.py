"""ComfyUI node classes of the pack: thin adapters over dreamid_core (no model math here)."""

from ..dreamid_core.runtime import check_onnxruntime
from .encoder_nodes import DreamIDEncodeFace, DreamIDLoadIDEncoder
from .paths import register_folders
from .scene_node import DreamIDScenePosition
from .text_nodes import DreamIDInjectIDTokens, DreamIDSaveIDEmbedding

register_folders()
check_onnxruntime()  # warn at start-up, with the fix, if onnxruntime and onnxruntime-gpu clash

NODE_CLASS_MAPPINGS = {
    "DreamID_LoadIDEncoder": DreamIDLoadIDEncoder,
    "DreamID_EncodeFace": DreamIDEncodeFace,
    "DreamID_InjectIDTokens": DreamIDInjectIDTokens,
    "DreamID_SaveIDEmbedding": DreamIDSaveIDEmbedding,
    "DreamID_ScenePosition": DreamIDScenePosition,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "DreamID_LoadIDEncoder": "DreamIdentity Load Encoder",
    "DreamID_EncodeFace": "DreamIdentity Encode Face",
    "DreamID_InjectIDTokens": "DreamIdentity Prompt with ID (S*)",
    "DreamID_SaveIDEmbedding": "DreamIdentity Save ID as Embedding",
    "DreamID_ScenePosition": "DreamIdentity Scene Position (ControlNet)",
}
