"""Where the identity starts: the encoder's S* (E4T-style), a word's embedding, or an identity file.

All three give ``{key: [k, D]}`` (words) or ``{key: [S, 2, k, D]}`` (per-stage file), float32 CPU,
checked against the base model's text encoders. A words start becomes a per-stage start by
setting every stage's key and value to it (:func:`as_layout`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from dreamid_core import IncompatibleEncoderError, TriggerNotFoundError, load_encoder
from dreamid_core.identity import encode_identity
from dreamid_core.learned_identity import load_learned_identity

from ..common.prompt_encoding import PART_FOR_ENCODER

logger = logging.getLogger(__name__)


def check_widths(parts: dict[str, torch.Tensor], widths: dict[str, int], what: str) -> None:
    if sorted(parts) != sorted(widths):
        raise IncompatibleEncoderError(f"{what} holds vectors for {sorted(parts)} but the base model's text encoder(s) "
                                       f"are {sorted(widths)}; use one made for this model family")
    for key, t in parts.items():
        if t.shape[-1] != widths[key]:
            raise IncompatibleEncoderError(f"{what}: {key} vectors are {t.shape[-1]} wide but the base model's {key} "
                                           f"takes {widths[key]}; use one made for this base model")


def from_word(base: Any, word: str, k: int) -> dict[str, torch.Tensor]:
    """Each text encoder's embedding of ``word``: its tokens when it has k of them, else their mean k times."""
    parts = {}
    for key, te, tok in zip(PART_FOR_ENCODER[base.family], base.text_encoders, base.tokenizers, strict=True):
        ids = tok(word, add_special_tokens=False).input_ids
        if not ids:
            raise TriggerNotFoundError(f"init word {word!r} tokenizes to nothing; use a word such as 'person'")
        table = te.get_input_embeddings().weight.detach().to("cpu", torch.float32)
        rows = table[ids]  # [m, D]
        parts[key] = rows.clone() if len(ids) == k else rows.mean(0, keepdim=True).repeat(k, 1)
    return parts


def from_encoder(path: str | Path, photos: list, pipeline: Any, widths: dict[str, int], *,
                 backbone: str | Path | None = None, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """S* of the photos from a DreamIdentity encoder file (the face pipeline runs as in the node)."""
    encoder = load_encoder(path, backbone_path=backbone, device=device)
    embeds, _ = encode_identity(encoder, pipeline, photos, device=device)
    check_widths(embeds.parts, widths, f"encoder {Path(path).name}")
    return embeds.parts


def from_file(path: str | Path, widths: dict[str, int]) -> tuple[str, dict[str, torch.Tensor]]:
    """(layout, tensors) of an identity file or a plain textual-inversion file."""
    key = next(iter(widths)) if len(widths) == 1 else None
    ident = load_learned_identity(path, single_key=key)
    check_widths(ident.tensors, widths, f"identity file {Path(path).name}")
    return ident.layout, ident.tensors


def as_layout(layout: str, tensors: dict[str, torch.Tensor], source_layout: str, *, k: int,
              num_stages: int) -> dict[str, torch.Tensor]:
    """Start tensors for ``layout`` from ``tensors`` of ``source_layout``."""
    got = next(iter(tensors.values())).shape[-2]
    if got != k:
        raise ValueError(f"the init holds {got} token(s) but --num-tokens is {k}; match them (an encoder gives its "
                         "own k, usually 2)")
    if layout == source_layout:
        if layout == "per_stage" and next(iter(tensors.values())).shape[0] != num_stages:
            raise ValueError(f"the init file has {next(iter(tensors.values())).shape[0]} stages but --num-stages is "
                             f"{num_stages}")
        return {key: t.float().clone() for key, t in tensors.items()}
    if source_layout == "words" and layout == "per_stage":
        return {key: t.float()[None, None].expand(num_stages, 2, -1, -1).clone() for key, t in tensors.items()}
    raise ValueError("a per_stage identity cannot start a words identity (it has no single S*); use --layout "
                     "per_stage or another init")
