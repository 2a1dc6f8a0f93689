"""Model folders the pack registers with ComfyUI, merged so extra_model_paths.yaml keeps working."""

from __future__ import annotations

import functools
import logging
import os

import folder_paths

from ..dreamid_core.weights import is_backbone_checkpoint

logger = logging.getLogger(__name__)

ENCODER_FOLDER = "dreamidentity"
INSIGHTFACE_FOLDER = "insightface"
NO_FILES = "(no files in models/dreamidentity)"
BACKBONE_IN_FILE = "(from encoder file)"
_EXTENSIONS = {ENCODER_FOLDER: {".safetensors", ".pt", ".pth"}, INSIGHTFACE_FOLDER: {".onnx"}}


def register_folders() -> None:
    """Add ``models/dreamidentity`` and ``models/insightface`` WITHOUT dropping paths the user's
    extra_model_paths.yaml already registered (it is applied before packs are imported)."""
    for name, exts in _EXTENSIONS.items():
        default = os.path.join(folder_paths.models_dir, name)
        if name in folder_paths.folder_names_and_paths:
            paths, known = folder_paths.folder_names_and_paths[name]
            if default not in paths:
                paths.append(default)
            merged = set(known) | exts if known else set()  # an empty set means "every extension"
            folder_paths.folder_names_and_paths[name] = (paths, merged)
        else:
            folder_paths.folder_names_and_paths[name] = ([default], set(exts))


def encoder_files() -> list[str]:
    """Encoder files in models/dreamidentity (learned per-stage identities live in its identities/ folder)."""
    names = [n for n in folder_paths.get_filename_list(ENCODER_FOLDER)
             if n.endswith(".safetensors") and not n.replace("\\", "/").startswith("identities/")]
    return names or [NO_FILES]


def backbone_files() -> list[str]:
    """Only arcface_torch backbone checkpoints, decided from each file's header (encoder and embedding
    files are left out); see :func:`dreamid_core.weights.is_backbone_checkpoint`."""
    names = []
    for name in folder_paths.get_filename_list(ENCODER_FOLDER):
        if name.endswith((".pt", ".pth", ".safetensors")):
            path = folder_paths.get_full_path(ENCODER_FOLDER, name)
            if path and _is_backbone(path, *_stamp(path)):
                names.append(name)
    return [BACKBONE_IN_FILE] + names


def _stamp(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_mtime_ns, st.st_size


@functools.lru_cache(maxsize=1024)
def _is_backbone(path: str, mtime_ns: int, size: int) -> bool:  # cached per (file, mtime, size)
    return is_backbone_checkpoint(path)


def folder_list(name: str) -> str:
    return ", ".join(folder_paths.get_folder_paths(name)) or f"models/{name}"


def encoder_path(name: str) -> str:
    if name == NO_FILES or not name:
        raise FileNotFoundError(
            f"no DreamIdentity encoder file: put one (.safetensors) in {folder_list(ENCODER_FOLDER)} and press R "
            "to refresh the list. Encoders come from `python -m training.export` (see the README's model table).")
    path = folder_paths.get_full_path(ENCODER_FOLDER, name)
    if path is None:
        raise FileNotFoundError(f"encoder file {name!r} is not in {folder_list(ENCODER_FOLDER)}; refresh (R) and "
                                "pick one from the list.")
    return path
