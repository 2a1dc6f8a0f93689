"""ComfyUI node classes of the pack: thin adapters over dreamid_core (no model math here). The ComfyUI glue
that is not a node class lives in :mod:`.adapters`."""

from ..dreamid_core.faces.runtime import check_onnxruntime
from .adapters.paths import register_folders
from .encoder_nodes import DreamIDEncodeFace, DreamIDLoadIDEncoder
from .identity_nodes import DreamIDApplyPerStageIdentity, DreamIDLoadIdentity, DreamIDSaveLearnedIdentity
from .learn_nodes import DreamIDLearnIdentity
from .region_nodes import DreamIDIdentityRegions
from .scene_node import DreamIDHeadPlacement, DreamIDScenePosition
from .text_nodes import DreamIDInjectIDTokens, DreamIDSaveIDEmbedding

register_folders()
check_onnxruntime()  # warn at start-up, with the fix, if onnxruntime and onnxruntime-gpu clash

NODE_CLASS_MAPPINGS = {
    "DreamID_LoadIDEncoder": DreamIDLoadIDEncoder,
    "DreamID_EncodeFace": DreamIDEncodeFace,
    "DreamID_InjectIDTokens": DreamIDInjectIDTokens,
    "DreamID_SaveIDEmbedding": DreamIDSaveIDEmbedding,
    "DreamID_ScenePosition": DreamIDScenePosition,
    "DreamID_LearnIdentity": DreamIDLearnIdentity,
    "DreamID_ApplyPerStageIdentity": DreamIDApplyPerStageIdentity,
    "DreamID_LoadIdentity": DreamIDLoadIdentity,
    "DreamID_SaveLearnedIdentity": DreamIDSaveLearnedIdentity,
    "DreamID_IdentityRegions": DreamIDIdentityRegions,
    "DreamID_HeadPlacement": DreamIDHeadPlacement,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "DreamID_LoadIDEncoder": "DreamIdentity Load Encoder",
    "DreamID_EncodeFace": "DreamIdentity Encode Face",
    "DreamID_InjectIDTokens": "DreamIdentity Prompt with ID (S*)",
    "DreamID_SaveIDEmbedding": "DreamIdentity Save ID as Embedding",
    "DreamID_ScenePosition": "DreamIdentity Scene Position (ControlNet)",
    "DreamID_LearnIdentity": "DreamIdentity Learn Identity from Photos",
    "DreamID_ApplyPerStageIdentity": "DreamIdentity Apply Per-Stage Identity",
    "DreamID_LoadIdentity": "DreamIdentity Load Identity",
    "DreamID_SaveLearnedIdentity": "DreamIdentity Save Learned Identity",
    "DreamID_IdentityRegions": "DreamIdentity People in Regions",
    "DreamID_HeadPlacement": "DreamIdentity Head Placement (keypoints + masks)",
}
