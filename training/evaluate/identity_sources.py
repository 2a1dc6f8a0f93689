"""Where the evaluation's S* comes from: an identity source gives, for a test face crop, the k
pseudo-words of each text encoder (``parts(crop) -> {"clip_h": [k, D], ...}``), plus ``k`` and
``fixed`` (True when every face gets the same S*, as with one textual-inversion embedding).

- :class:`EncoderIdentity`: a DreamIdentity encoder (one forward per face);
- :class:`EmbeddingIdentity`: one textual-inversion file, read by :func:`dreamid_core.embedding_io.read_embedding`
  (the reader beside the writer, shared with the nodes' LoadIdentity): this pack's ``.safetensors``
  (``emb_params``; ``clip_l`` + ``clip_g`` for SDXL), diffusers ``learned_embeds`` (``{"<token>": [D] or
  [k, D]}``, ``.safetensors`` or ``.bin``) and A1111 ``.pt`` (``string_to_param``). Pickled files are read
  with ``torch.load(weights_only=True)`` only.

A new way to obtain identities (e.g. identities learned per person) is another class with the same
three members, chosen in :func:`training.evaluate.cli.identity_source`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dreamid_core import IncompatibleEncoderError, WeightFormatError
from dreamid_core.embedding_io import read_embedding
from dreamid_core.identity import parts_from_crops

from ..common.prompt_encoding import PART_FOR_ENCODER


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


class EmbeddingIdentity:
    """One textual-inversion embedding, used for every test face."""

    fixed = True

    def __init__(self, path: str | Path, family: str, widths: dict[str, int]) -> None:
        path = Path(path)
        keys = PART_FOR_ENCODER[family]
        tensors = read_embedding(path, single_key=keys[0] if len(keys) == 1 else None)
        if all(k in tensors for k in keys):
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
