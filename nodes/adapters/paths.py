"""Model folders the pack registers with ComfyUI, merged so extra_model_paths.yaml keeps working, and the
files the loaders list.

- :func:`register_folders`: ``dreamidentity`` (encoders, backbones), ``insightface`` and
  ``dreamid_identities`` (= ``identities/`` inside every ``dreamidentity`` folder, so an
  extra_model_paths.yaml entry for dreamidentity carries over), each merged with what the user registered.
- :func:`encoder_files`, :func:`backbone_files`, :func:`identity_files` + :func:`identity_path`.
"""

from __future__ import annotations

import functools
import logging
import os

import folder_paths

from ...dreamid_core.encoder.weights import is_backbone_checkpoint

logger = logging.getLogger(__name__)

ENCODER_FOLDER = "dreamidentity"
INSIGHTFACE_FOLDER = "insightface"
IDENTITY_FOLDER = "dreamid_identities"
NO_FILES = "(no files in models/dreamidentity)"
NO_IDENTITIES = "(no identity files)"
BACKBONE_IN_FILE = "(from encoder file)"
IDENTITY_EXTS = {".safetensors", ".pt", ".bin"}
_EXTENSIONS = {ENCODER_FOLDER: {".safetensors", ".pt", ".pth"}, INSIGHTFACE_FOLDER: {".onnx"},
               IDENTITY_FOLDER: IDENTITY_EXTS}


def _defaults(name: str) -> list[str]:
    if name != IDENTITY_FOLDER:
        return [os.path.join(folder_paths.models_dir, name)]
    return [os.path.join(b, "identities") for b in folder_paths.get_folder_paths(ENCODER_FOLDER)]


def register_folders() -> None:
    """Register the pack's model folders WITHOUT dropping paths the user's extra_model_paths.yaml already
    registered (it is applied before packs are imported); the default folders are added after the user's."""
    for name, exts in _EXTENSIONS.items():  # dreamidentity first: the identities folders are inside it
        if name in folder_paths.folder_names_and_paths:
            paths, known = folder_paths.folder_names_and_paths[name]
            merged = set(known) | exts if known else set()  # an empty set means "every extension"
        else:
            paths, merged = [], set(exts)
        paths = list(paths) + [d for d in _defaults(name) if d not in paths]
        folder_paths.folder_names_and_paths[name] = (paths, merged)


def identity_files() -> list[str]:
    """``identities/NAME`` (per-stage identities, snapshots) and ``embeddings/NAME`` (textual inversion)."""
    names = [f"identities/{n}" for n in folder_paths.get_filename_list(IDENTITY_FOLDER)]
    names += [f"embeddings/{n}" for n in folder_paths.get_filename_list("embeddings")
              if os.path.splitext(n)[1] in IDENTITY_EXTS]
    return names or [NO_IDENTITIES]


def identity_path(name: str) -> str:
    folder, _, rest = name.partition("/")
    source = {"identities": IDENTITY_FOLDER, "embeddings": "embeddings"}.get(folder)
    if name == NO_IDENTITIES or source is None or not rest:
        raise FileNotFoundError(f"identity {name!r}: pick a file from the list (models/dreamidentity/identities or "
                                "models/embeddings); press R to refresh it after adding files.")
    return folder_paths.get_full_path_or_raise(source, rest)


def encoder_files() -> list[str]:
    """Encoder files in models/dreamidentity (learned per-stage identities live in its identities/ folder)."""
    names = [n for n in folder_paths.get_filename_list(ENCODER_FOLDER)
             if n.endswith(".safetensors") and not n.replace("\\", "/").startswith("identities/")]
    return names or [NO_FILES]


def backbone_files() -> list[str]:
    """Only arcface_torch backbone checkpoints, decided from each file's header (encoder and embedding
    files are left out); see :func:`dreamid_core.encoder.weights.is_backbone_checkpoint`."""
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
