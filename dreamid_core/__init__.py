"""DreamIdentity core: pure PyTorch (never imports comfy).

Face photo -> face pipeline (detect, align) -> face ViT taps [v3, v6, v9, v12, v_final] -> k MLPs
-> S*, k pseudo-words in the text encoder's word-embedding space -> spliced into the prompt.
"""

from .encoder.backbone import FaceViT, FaceViTOutput
from .encoder.config import BACKBONE_PRESETS, FORMAT_VERSION, TEXT_ENCODER_PRESETS, BackboneConfig, EncoderConfig
from .encoder.model import COMBINE_MODES, IDEncoder
from .encoder.weights import load_arcface_backbone, load_encoder, read_encoder_config, save_encoder
from .errors import (
    ConfigError,
    DreamIDError,
    FaceNotFoundError,
    FaceSelectionError,
    ImageInputError,
    IncompatibleEncoderError,
    MissingDependencyError,
    ModelFilesError,
    TriggerNotFoundError,
    WeightFormatError,
)
from .faces.detection import Detection, FaceDetector
from .faces.detectors import detector_names, make_detector
from .faces.pipeline import FacePipeline, FaceResult, PipelineReport
from .identities.embedding_io import sanitize_name
from .identities.learned_identity import (
    IdentityConfig,
    LearnedIdentity,
    load_learned_identity,
    save_learned_identity,
    write_embedding,
)
from .identities.tokens import ChunkLayout, PromptTokens, chunk_groups, prompt_groups, tokenize_prompt
from .identities.trigger import TriggerMatch, check_trigger, find_triggers, split_on_triggers

__version__ = "0.1.0"

__all__ = [
    "BACKBONE_PRESETS", "COMBINE_MODES", "ChunkLayout", "PromptTokens", "TriggerMatch", "check_trigger",
    "chunk_groups", "find_triggers", "prompt_groups", "split_on_triggers", "tokenize_prompt",
    "FORMAT_VERSION", "TEXT_ENCODER_PRESETS", "BackboneConfig", "Detection",
    "ConfigError", "DreamIDError", "EncoderConfig", "FaceDetector", "FaceNotFoundError", "FacePipeline", "FaceResult",
    "FaceSelectionError", "FaceViT", "FaceViTOutput", "IDEncoder", "ImageInputError", "IncompatibleEncoderError",
    "MissingDependencyError", "ModelFilesError", "PipelineReport", "TriggerNotFoundError", "WeightFormatError",
    "detector_names", "load_arcface_backbone", "load_encoder", "make_detector",
    "read_encoder_config", "sanitize_name", "save_encoder", "write_embedding",
    "IdentityConfig", "LearnedIdentity", "load_learned_identity", "save_learned_identity",
]
