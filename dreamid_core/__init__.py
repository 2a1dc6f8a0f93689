"""DreamIdentity core: pure PyTorch (never imports comfy).

Face photo -> face pipeline (detect, align) -> face ViT taps [v3, v6, v9, v12, v_final] -> k MLPs
-> S*, k pseudo-words in the text encoder's word-embedding space -> spliced into the prompt.
"""

from .backbone import FaceViT, FaceViTOutput
from .config import BACKBONE_PRESETS, FORMAT_VERSION, TEXT_ENCODER_PRESETS, BackboneConfig, EncoderConfig
from .detection import Detection, FaceDetector
from .detectors import detector_names, make_detector
from .embedding_io import sanitize_name, write_embedding
from .encoder import COMBINE_MODES, IDEncoder
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
from .faces import FacePipeline, FaceResult, PipelineReport
from .learned_identity import IdentityConfig, LearnedIdentity, load_learned_identity, save_learned_identity
from .tokens import ChunkLayout, PromptTokens, chunk_groups, prompt_groups, tokenize_prompt
from .trigger import TriggerMatch, check_trigger, find_triggers, split_on_triggers
from .weights import load_arcface_backbone, load_encoder, read_encoder_config, save_encoder

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
