"""Where the identity starts: the encoder's S* (E4T-style), a word's embedding, or an identity file.

All three give ``{key: [k, D]}`` (words) or ``{key: [S, 2, k, D]}`` (per-stage file), float32 CPU,
fitted to the base model's text encoders by the pack's one rule
(:func:`dreamid_core.identities.embeds.fit_parts`); :func:`dreamid_core.learning.start_tensors` turns them
into the run's layout.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from dreamid_core import load_encoder
from dreamid_core.encoder.identity import encode_identity
from dreamid_core.identities.embeds import fit_parts
from dreamid_core.identities.learned_identity import load_learned_identity
from dreamid_core.learning import from_word_rows

logger = logging.getLogger(__name__)


def from_word(host, word: str, k: int) -> dict[str, torch.Tensor]:
    """The word's embedding per text encoder, by the learner's one rule (:func:`from_word_rows`)."""
    return from_word_rows(host.word_embeddings(word), k)


def from_encoder(path: str | Path, photos: list, pipeline, widths: dict[str, int], *,
                 backbone: str | Path | None = None, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """S* of the photos from a DreamIdentity encoder file (the face pipeline runs as in the node)."""
    encoder = load_encoder(path, backbone_path=backbone, device=device)
    embeds, _ = encode_identity(encoder, pipeline, photos, device=device)
    return fit_parts(embeds.parts, widths, f"encoder {Path(path).name}", "the base model")


def from_file(path: str | Path, widths: dict[str, int]) -> dict[str, torch.Tensor]:
    """The tensors of an identity file or a plain textual-inversion file."""
    key = next(iter(widths)) if len(widths) == 1 else None
    ident = load_learned_identity(path, single_key=key)
    return fit_parts(ident.tensors, widths, f"identity file {Path(path).name}", "the base model")
