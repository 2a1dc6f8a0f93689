"""DreamID_LoadIDEncoder and DreamID_EncodeFace: encoder file + photos -> S* (thin over dreamid_core)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import comfy.model_management as mm
import comfy.model_patcher
import comfy.utils
import folder_paths
import torch

from ..dreamid_core import COMBINE_MODES, EncoderConfig, FacePipeline, load_encoder, make_detector
from ..dreamid_core.encoder.identity import encode_identity
from ..dreamid_core.errors import FaceSelectionError, ModelFilesError
from ..dreamid_core.faces.detectors import BUILTIN, detector_names
from ..dreamid_core.faces.insightface_detector import resolve_pack_dir
from ..dreamid_core.faces.pipeline import ON_MISSING, ORDERS, PipelineReport
from ..dreamid_core.faces.runtime import PROVIDER_CHOICES
from .adapters.paths import (
    BACKBONE_IN_FILE,
    ENCODER_FOLDER,
    INSIGHTFACE_FOLDER,
    backbone_files,
    encoder_files,
    encoder_path,
)
from .adapters.validation import require_finite

logger = logging.getLogger(__name__)
CATEGORY = "DreamIdentity"
MAX_PEOPLE = 3


@dataclass
class EncoderBundle:
    """What DREAMID_ENCODER carries: the encoder in a ModelPatcher, the face pipeline, its config."""

    patcher: comfy.model_patcher.ModelPatcher
    pipeline: FacePipeline
    config: EncoderConfig
    name: str


def _insightface_root(pack: str) -> Path:
    tried = []
    for root in folder_paths.get_folder_paths(INSIGHTFACE_FOLDER):
        try:
            resolve_pack_dir(root, pack)
            return Path(root)
        except ModelFilesError as exc:
            tried.append(str(exc))
    raise ModelFilesError(" | ".join(tried) or f"no models/insightface folder is registered for {pack}")


class DreamIDLoadIDEncoder:
    DESCRIPTION = ("Loads a DreamIdentity encoder (face ViT + M² projection) from models/dreamidentity and the face "
                   "detector used to find and align faces. The encoder lives on ComfyUI's devices and is offloaded "
                   "like any model.")

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "encoder_name": (encoder_files(), {"tooltip": "Encoder .safetensors in models/dreamidentity (from "
                                                              "training.export). Its metadata says which model "
                                                              "family it is for."}),
                "face_detector": (detector_names(), {"default": BUILTIN, "tooltip": (
                    "mtcnn: built in, no download. insightface/<pack>: your antelopev2 or buffalo_l files in "
                    "models/insightface/models/<pack>/ (more accurate on hard photos).")}),
                "provider": (list(PROVIDER_CHOICES), {"default": "auto", "tooltip": (
                    "Where face detection runs. insightface: the onnxruntime provider, falling back to the CPU "
                    "with a warning when it is not available. mtcnn: 'cpu' keeps it on the CPU, anything else "
                    "uses ComfyUI's device.")}),
            },
            "optional": {
                "backbone_name": (backbone_files(), {"default": BACKBONE_IN_FILE, "tooltip": (
                    "Only for encoder files exported without their face backbone: the arcface_torch checkpoint "
                    "(.pt, read with weights_only) they were trained with. Only backbone checkpoints found in "
                    "models/dreamidentity are listed.")}),
            },
        }

    RETURN_TYPES = ("DREAMID_ENCODER",)
    RETURN_NAMES = ("encoder",)
    OUTPUT_TOOLTIPS = ("The encoder and face detector, for DreamID_EncodeFace.",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, encoder_name: str, face_detector: str, provider: str,
             backbone_name: str = BACKBONE_IN_FILE) -> tuple[EncoderBundle]:
        path = encoder_path(encoder_name)
        backbone = None
        if backbone_name and backbone_name != BACKBONE_IN_FILE:
            backbone = folder_paths.get_full_path_or_raise(ENCODER_FOLDER, backbone_name)
        encoder = load_encoder(path, backbone_path=backbone).eval()
        load_device, offload = mm.get_torch_device(), mm.unet_offload_device()
        encoder.to(offload)
        patcher = comfy.model_patcher.ModelPatcher(encoder, load_device=load_device, offload_device=offload,
                                                   size=mm.module_size(encoder))
        root = _insightface_root(face_detector.split("/", 1)[1]) if face_detector != BUILTIN else None
        mtcnn_device = "cpu" if provider == "cpu" else str(load_device)
        detector = make_detector(face_detector, insightface_root=root, provider=provider, device=mtcnn_device)
        logger.info("DreamIdentity encoder %s: target %s, k=%d, detector %s", encoder_name, encoder.config.target,
                    encoder.config.num_tokens, detector.name)
        return (EncoderBundle(patcher, FacePipeline(detector), encoder.config, encoder_name),)


class DreamIDEncodeFace:
    DESCRIPTION = ("Finds the face in each photo (several photos of ONE person are combined), aligns it and encodes "
                   "it into S*: k pseudo-words for DreamID_InjectIDTokens or DreamID_SaveIDEmbedding. Also outputs "
                   "the aligned crops (preview) and the face layout for DreamID_ScenePosition.")

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "encoder": ("DREAMID_ENCODER", {"tooltip": "From DreamID_LoadIDEncoder."}),
                "image": ("IMAGE", {"tooltip": "One photo, or a batch of photos of the same person."}),
                "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 3.0, "step": 0.05, "tooltip": (
                    "Multiplies S*. Lower gives the prompt more freedom, higher holds the identity harder; "
                    "0 switches the identity off.")}),
                "combine": (list(COMBINE_MODES), {"default": "average", "tooltip": (
                    "Several photos: average their S* (default), average their face features before the "
                    "projection, or use the first photo only.")}),
                "face_index": ("INT", {"default": 0, "min": 0, "max": 63, "tooltip": (
                    "Which face when a photo shows several: 0 is the largest (or leftmost, see face_order).")}),
                "face_order": (list(ORDERS), {"default": "largest", "tooltip": "How face_index counts faces."}),
                "on_missing": (list(ON_MISSING), {"default": "error", "tooltip": (
                    "A photo without a face: stop with an error, or skip it with a warning. If every photo "
                    "is skipped it is an error anyway.")}),
            },
            "optional": {
                f"face_index_{i}": ("INT", {"default": -1, "min": -1, "max": 63, "tooltip": (
                    f"A person {i} from the SAME photo(s): their face index (counted like face_index); -1 = none. "
                    f"Gives id_embeds_{i} and face_layout_{i}.")})
                for i in range(2, MAX_PEOPLE + 1)
            },
        }

    # new outputs go at the END: saved workflows link outputs by slot index
    RETURN_TYPES = ("DREAMID_EMBEDS", "IMAGE", "DREAMID_FACE_LAYOUT", "STRING", "DREAMID_EMBEDS",
                    "DREAMID_FACE_LAYOUT", "DREAMID_EMBEDS", "DREAMID_FACE_LAYOUT")
    RETURN_NAMES = ("id_embeds", "aligned_faces", "face_layout", "report", "id_embeds_2", "face_layout_2",
                    "id_embeds_3", "face_layout_3")
    OUTPUT_TOOLTIPS = ("S*: the identity as k word embeddings.", "The aligned 112x112 face crops that were encoded.",
                       "Where the first face sits in its photo (for DreamID_ScenePosition).",
                       "Which photos were used and which were skipped (on_missing = skip), and why; also shown "
                       "on the node.", "Person 2 (face_index_2), or nothing.", "Where person 2's face sits.",
                       "Person 3 (face_index_3), or nothing.", "Where person 3's face sits.")
    FUNCTION = "encode"
    CATEGORY = CATEGORY

    def encode(self, encoder: EncoderBundle, image: torch.Tensor, strength: float, combine: str, face_index: int,
               face_order: str, on_missing: str, face_index_2: int = -1, face_index_3: int = -1) -> dict[str, Any]:
        require_finite("DreamID_EncodeFace", strength=strength)
        n = int(image.shape[0])
        indices = [face_index] + [i for i in (face_index_2, face_index_3)]
        wanted = [i for i in indices if i is not None and i >= 0]
        if len(set(wanted)) != len(wanted):
            raise FaceSelectionError(f"face indices {wanted} name the same face twice; give each person their own "
                                     "face_index (or -1 for none).")
        bar = comfy.utils.ProgressBar(n * len(wanted))
        mm.load_models_gpu([encoder.patcher])
        people, texts = [], []
        for person, index in enumerate(indices):
            if index is None or index < 0:
                people.append((None, None))
                continue

            done = len(texts) * n

            def step(i: int, total: int, done: int = done) -> None:
                mm.throw_exception_if_processing_interrupted()
                bar.update_absolute(done + i, n * len(wanted))

            try:
                embeds, report = encode_identity(encoder.patcher.model, encoder.pipeline, image, scale=strength,
                                                 combine=combine, face_index=index, order=face_order,
                                                 on_missing=on_missing, device=encoder.patcher.load_device,
                                                 callback=step)
            except FaceSelectionError as exc:
                if person == 0:
                    raise
                raise FaceSelectionError(f"person {person + 1} (face_index_{person + 1} = {index}): {exc}") from exc
            embeds.info["encoder"] = encoder.name
            layout = report.faces[0].layout()
            layout["image_index"] = report.faces[0].image_index
            people.append((embeds, layout))
            if person == 0:
                crops = torch.stack([f.crop for f in report.faces]).permute(0, 2, 3, 1).contiguous()  # [N, 112, 112, 3]
            prefix = "" if person == 0 else f"person {person + 1} (face {index}): "
            texts.append(prefix + report_text(report, n))  # each skip was already logged by the pipeline
        bar.update_absolute(n * len(wanted), n * len(wanted))
        text = "\n".join(texts)
        (embeds, layout), *others = people
        return {"ui": {"text": [text]},
                "result": (embeds, crops.to(mm.intermediate_device(), torch.float32), layout, text,
                           *[x for pair in others for x in pair])}


def report_text(report: PipelineReport, num_photos: int) -> str:
    """One line per photo: used (and which face), or skipped and why."""
    used = ", ".join(str(f.image_index) for f in report.faces)
    lines = [f"{len(report.faces)} of {num_photos} photo(s) encoded (image {used}); {len(report.skipped)} skipped."]
    lines += [f"skipped image {i}: {reason}" for i, reason in report.skipped]
    return "\n".join(lines)
