"""Where the evaluation's S* comes from: an identity source gives, for a test face crop, the k
pseudo-words of each text encoder (``parts(crop) -> {"clip_h": [k, D], ...}``), plus ``k`` and
``fixed`` (True when every face gets the same S*, as with one textual-inversion embedding).

- :class:`EncoderIdentity`: a DreamIdentity encoder (one forward per face);
- :class:`EmbeddingIdentity`: one textual-inversion file, read by :func:`read_embedding`: this pack's
  ``.safetensors`` (``emb_params``; ``clip_l`` + ``clip_g`` for SDXL), diffusers ``learned_embeds``
  (``{"<token>": [D] or [k, D]}``, ``.safetensors`` or ``.bin``) and A1111 ``.pt``
  (``string_to_param``). Pickled files are read with ``torch.load(weights_only=True)`` only.

A new way to obtain identities (e.g. identities learned per person) is another class with the same
three members, chosen in :func:`training.evaluate.identity_source`.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from dreamid_core import IncompatibleEncoderError, WeightFormatError
from dreamid_core.identity import parts_from_crops

from .text import PART_FOR_ENCODER

EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")


class EncoderIdentity:
    """S* of each test face from a DreamIdentity encoder."""

    fixed = False

    def __init__(self, encoder: Any, widths: dict[str, int], scale: float = 1.0) -> None:
        if dict(encoder.config.widths) != dict(widths):
            raise IncompatibleEncoderError(f"the encoder makes S* for {dict(encoder.config.widths)} but the base model's "
                                           f"text encoder(s) take {dict(widths)}; evaluate it on the base model it "
                                           f"was trained for (target {encoder.config.target!r})")
        self.encoder, self.scale = encoder, scale
        self.k = encoder.config.num_tokens

    def parts(self, crop: torch.Tensor) -> dict[str, torch.Tensor]:
        return parts_from_crops(self.encoder, crop[None], scale=self.scale)  # the node's and CLI's path


def _load_pickled(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
        raise WeightFormatError(f"{path.name} could not be read with torch.load(weights_only=True) ({exc}); only "
                                "files of plain tensors, numbers and strings are opened (a pickle can run code). "
                                "Convert it to .safetensors.") from exc


def read_embedding(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a textual-inversion file, as ``{"emb_params": [k, D]}`` or ``{"clip_l", "clip_g"}``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"embedding not found: {path}")
    if path.suffix not in EMBEDDING_SUFFIXES:
        raise WeightFormatError(f"{path.name}: unsupported embedding type {path.suffix!r}; expected "
                                f"{', '.join(EMBEDDING_SUFFIXES)}")
    if path.suffix == ".safetensors":
        try:
            data: Any = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise WeightFormatError(f"{path.name} is not a readable safetensors file ({exc})") from exc
    else:
        data = _load_pickled(path)
    if isinstance(data, dict) and isinstance(data.get("string_to_param"), dict):  # A1111 .pt
        params = data["string_to_param"]
        if len(params) != 1:
            raise WeightFormatError(f"{path.name} (A1111) holds {len(params)} embeddings {sorted(params)}; expected one")
        data = {"emb_params": next(iter(params.values()))}
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise WeightFormatError(f"{path.name} holds {type(data).__name__} {sorted(data) if isinstance(data, dict) else ''}"
                                "; expected tensors (emb_params, clip_l/clip_g, string_to_param or {'<token>': t})")
    if "emb_params" not in data and not {"clip_l", "clip_g"} & set(data) and len(data) == 1:
        data = {"emb_params": next(iter(data.values()))}  # diffusers learned_embeds: {"<token>": t}
    return {k: (v[None] if v.ndim == 1 else v).detach().float() for k, v in data.items()}


class EmbeddingIdentity:
    """One textual-inversion embedding, used for every test face."""

    fixed = True

    def __init__(self, path: str | Path, family: str, widths: dict[str, int]) -> None:
        path = Path(path)
        tensors = read_embedding(path)
        keys = PART_FOR_ENCODER[family]
        if "emb_params" in tensors and len(keys) == 1:
            parts = {keys[0]: tensors["emb_params"]}
        elif all(k in tensors for k in keys):
            parts = {k: tensors[k] for k in keys}
        else:
            want = "emb_params" if len(keys) == 1 else " and ".join(keys)
            raise WeightFormatError(f"{path.name} holds {sorted(tensors)}; a {family} textual-inversion file holds "
                                    f"{want} ([k, width] each)")
        for key, t in parts.items():
            if t.ndim != 2 or t.shape[1] != widths[key]:
                raise IncompatibleEncoderError(f"{path.name}: {key} is {tuple(t.shape)} but the base model's {key} "
                                               f"takes [k, {widths[key]}]; use an embedding made for this base model")
        if len({t.shape[0] for t in parts.values()}) != 1:
            raise WeightFormatError(f"{path.name}: its tensors disagree on k: {[tuple(t.shape) for t in parts.values()]}")
        self._parts = parts
        self.k = next(iter(parts.values())).shape[0]

    def parts(self, crop: torch.Tensor) -> dict[str, torch.Tensor]:
        return self._parts
